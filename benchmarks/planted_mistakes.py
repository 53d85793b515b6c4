"""Plant each mistake issues 20 and 28 name (a one-line change) in a scratch worktree and run the tests
that should catch it; prints one line per mistake: caught (the tests failed) or MISSED.

    python benchmarks/planted_mistakes.py [--only NAME ...]

Runs from a ``git worktree`` of HEAD in a temporary folder, so the checkout is never touched.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, the line as it is, the line with the mistake, the tests that must fail)
MISTAKES = {
    "window off by one": ("swa_patch/masks.py", "inside = inside & (diff < spec.span)",
                          "inside = inside & (diff <= spec.span)", ["tests/test_masks.py", "tests/test_patch.py"]),
    "skipped frame rebase": ("swa_patch/cache.py", "            layer.shift_frame(-delta, rope)",
                             "            pass", ["tests/test_cache.py"]),
    "doubled sink": ("swa_patch/masks.py", "sink_part = is_sink_slot & valid & (j <= i) & ~in_band",
                     "sink_part = is_sink_slot & valid & (j <= i)", ["tests/test_backends.py"]),
    "cache keeps every step's keys": (
        "swa_patch/cache.py", "        sink_index = self._store_sinks(key_states, value_states, step, real)",
        "        sink_index = self._store_sinks(key_states, value_states, step, real); "
        "self.__dict__.setdefault('_kept', []).append(key_states.clone())",
        ["tests/test_memory.py"]),
    "recipe does not hand the model to accelerate": (
        "recipes/finetune_lora.py",
        "    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)",
        "    optimizer, train_dl, eval_dl = accelerator.prepare(optimizer, train_dl, eval_dl)",
        ["tests/test_recipe.py"]),
    "decode='full' boundary one row late": ("swa_patch/generation.py", "    full_from = (ends - 1).to(tokens.device)",
                                           "    full_from = ends.to(tokens.device)", ["tests/test_decode_full.py"]),
    "packed documents see each other": ("swa_patch/generation.py",
                                        "    documents = _documents(state, args, kwargs, cache, prompt_lengths)",
                                        "    documents = None", ["tests/test_packed.py"]),
    "a nested generate() clears the outer call's state": ("swa_patch/generation.py",
                                                          "            _GENERATE_CALLS.reset(token)",
                                                          "            _GENERATE_CALLS.set(())",
                                                          ["tests/test_per_forward.py"]),
    "the backbone called directly skips the hook": ("swa_patch/generation.py",
                                                    "    backbone.register_forward_pre_hook(_begin_forward, with_kwargs=True)",
                                                    "    model.register_forward_pre_hook(_begin_forward, with_kwargs=True); "
                                                    "setattr(model, BACKBONE_ATTR, patch_state(model))",
                                                    ["tests/test_per_forward.py"]),
    "sink count off by one": ("swa_patch/attention.py",
                              "    index = first[:, None] + torch.arange(spec.sinks, device=key.device)",
                              "    index = first[:, None] + torch.arange(spec.sinks - 1, device=key.device)",
                              ["tests/test_backends.py", "tests/test_patch.py"]),
}


def plant(tree: str, name: str) -> bool:
    """True when the tests fail with the mistake in place (the suite catches it)."""
    path, good, bad, tests = MISTAKES[name]
    file = os.path.join(tree, path)
    text = open(file).read()
    if text.count(good) != 1:
        raise SystemExit(f"{name}: the line to change is not (exactly once) in {path}: {good!r}")
    open(file, "w").write(text.replace(good, bad))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=tree, capture_output=True, text=True)
    finally:
        open(file, "w").write(text)
    return run.returncode != 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(MISTAKES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tree = os.path.join(scratch, "tree")
        subprocess.run(["git", "worktree", "add", "--detach", tree, "HEAD"], cwd=ROOT, check=True, capture_output=True)
        try:
            missed = []
            for name in args.only or MISTAKES:
                start = time.perf_counter()
                caught = plant(tree, name)
                print(f"{'caught' if caught else 'MISSED':7s} {name} ({time.perf_counter() - start:.0f} s)", flush=True)
                missed += [] if caught else [name]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, capture_output=True)
    sys.exit(f"missed: {', '.join(missed)}" if missed else 0)


if __name__ == "__main__":
    main()
