"""What produced a figure, for the CSVs the package and its benchmarks write: the command line,
the code (package version, and the git commit when run from a checkout), the date, the machine
and the library versions.  One value per CSV column, the same in every row."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys


def git_commit(path: str) -> str | None:
    """The checkout's short commit, ``+dirty`` with uncommitted changes to tracked files other
    than benchmark results (a run of several benchmarks rewrites those as it goes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"):
            commit += "+dirty"
        return commit or None
    except OSError:
        return None


def _program(path: str, root: str) -> str:
    """How to run it again: ``swa-patch`` for the CLI module, a script by its path in the checkout."""
    if not path:
        return "python"
    path = os.path.abspath(path)
    if path == os.path.join(root, "swa_patch", "cli.py"):
        return "swa-patch"
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.basename(path)


def run_info() -> dict:
    import torch
    import transformers

    from . import __version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [_program(sys.argv[0] if sys.argv else "", root), *sys.argv[1:]]
    return {"command": " ".join(shlex.quote(a) for a in argv),
            "commit": git_commit(root) or f"swa_patch {__version__}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}
