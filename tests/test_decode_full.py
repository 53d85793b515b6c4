"""decode="full": the prompt is windowed, the queries that predict answer tokens (rows >= P - 1)
attend every earlier token.  Every backend, the cache, generate() and training agree with the
dense reference built from the same predicate (``reference_mask(..., full_from=P - 1)``)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

import swa_patch
from attn_cases import assert_close_valid, dense_attention, left_padding, random_qkv
from models import (FAMILY_CONFIGS, assert_matches_reference_only, reference_attention, reference_logits,
                    tiny_model)
from swa_patch import SWAConfig, make_cache, original_attention, patch_model, unpatch_model
from swa_patch.attention import LayerPlan, MaskInfo, run_plan
from swa_patch.compat import enable_activation_checkpointing
from swa_patch.backends import flash
from swa_patch.generation import label_prompt_ends
from swa_patch.masks import LayerSpec, reference_mask
from swa_patch.patch import layer_specs
from test_backends import flash_stand_in

W = 6
ATOL = 1e-5


def _ids(n, b=2, seed=0):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def _reference(q, k, v, spec, padding, full_from):
    mask = reference_mask(spec, q.shape[2], padding, full_from=full_from)
    mask = mask[:, None] if mask.dim() == 3 else mask
    return dense_attention(q, k, v, mask, q.shape[-1] ** -0.5).transpose(1, 2)


def _run(backend, q, k, v, spec, padding, full_from):
    info = MaskInfo(0, padding, full_from=full_from)
    return run_plan(LayerPlan(spec, backend), q, k, v, info, scaling=q.shape[-1] ** -0.5)


# ---- attention level: every backend == the predicate ------------------------------------------
@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 70), window=st.integers(1, 24), sinks=st.integers(0, 3),
       dilation=st.sampled_from([1, 1, 2, 3, (1, 2, 2, 1)]), kv=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       pad=st.booleans(), same=st.booleans(), backend=st.sampled_from(["eager", "sdpa"]),
       data=st.data())
def test_random_boundaries_match_reference(n, window, sinks, dilation, kv, pad, same, backend, data):
    spec = LayerSpec(window, dilation, sinks, decode_full=True)
    q, k, v = random_qkv(2, kv[0], kv[1], n, 8, seed=n)
    padding = left_padding(2, n, seed=n) if pad else None
    edge = st.integers(0, n + 2)                 # boundaries before, inside, at and past the end
    first = data.draw(edge)
    full_from = torch.tensor([first, first if same else data.draw(edge)])
    out = _run(backend, q, k, v, spec, padding, full_from)
    assert_close_valid(out, _reference(q, k, v, spec, padding, full_from), padding, atol=2e-5)


@pytest.mark.parametrize("n,window,sinks,boundaries,pad", [(300, 32, 0, (200, 200), False),
                                                          (300, 32, 4, (150, 260), True),
                                                          (257, 64, 2, (0, 256), False)])
def test_flex_and_flash_paths_match_reference(monkeypatch, n, window, sinks, boundaries, pad):
    monkeypatch.setattr(flash, "flash_attn_func", flash_stand_in)
    spec = LayerSpec(window, 1, sinks, decode_full=True)
    q, k, v = random_qkv(2, 4, 2, n, 16)
    padding = left_padding(2, n) if pad else None
    full_from = torch.tensor(boundaries)
    ref = _reference(q, k, v, spec, padding, full_from)
    for backend in ("flex", "flash"):
        with torch.no_grad():
            out = _run(backend, q, k, v, spec, padding, full_from)
        assert_close_valid(out, ref, padding, atol=2e-5)


def test_band_kernel_gradients_match_reference():
    spec = LayerSpec(24, 1, 2, decode_full=True)
    q, k, v = random_qkv(2, 4, 2, 200, 16, grad=True)
    full_from = torch.tensor([120, 170])
    weight = torch.randn(2, 200, 4, 16)
    grads = []
    for fn in (lambda: _run("sdpa", q, k, v, spec, None, full_from),
               lambda: _reference(q, k, v, spec, None, full_from)):
        (fn() * weight).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_boundary_rows_differ_from_window_and_from_dense():
    """The guard that makes the comparisons above mean something: moving the boundary by
    one row, or dropping it, changes the output."""
    spec = LayerSpec(8, 1, 2, decode_full=True)
    q, k, v = random_qkv(1, 4, 2, 64, 8)
    at = lambda b: _run("sdpa", q, k, v, spec, None, torch.tensor([b]))
    base = at(40)
    assert (base[:, 40] - at(41)[:, 40]).abs().max() > 1e-3       # row 40 full vs windowed
    assert (base[:, 39] - at(39)[:, 39]).abs().max() > 1e-3
    torch.testing.assert_close(base[:, :40], at(64)[:, :40])       # rows before are the window


# ---- model level: every family ---------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_every_family_matches_reference_with_per_row_boundaries(model_type, backend):
    """(flex: test_each_cpu_backend_in_a_model; flash: the stand-in at attention level.)"""
    model = tiny_model(model_type)
    n = 70
    ids = _ids(n)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0                                         # left padding in row 1
    prompt = torch.tensor([40, 55])
    with torch.no_grad():
        patch_model(model, window=W, sinks=2, decode="full", backend=backend)
        out = model(ids, attention_mask=mask, prompt_lengths=prompt).logits
        specs = layer_specs(model)
        unpatch_model(model)
    # the reference with the same boundary; the tolerance rejects W-1, W+1 and the dense model ...
    assert_matches_reference_only(model, out, specs, ids, mask, full_from=prompt - 1, atol=ATOL, rtol=ATOL)
    real = mask.bool()
    for moved in (prompt - 2, prompt):                      # ... and a boundary one row early or late
        other = reference_logits(model, specs, ids, mask, moved)[real]
        assert ((out[real] - other).abs() - ATOL * (1 + other.abs())).max() > 0, moved


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_each_cpu_backend_in_a_model(backend):
    model = tiny_model("llama")
    n = 150
    ids = _ids(n, b=2, seed=1)
    prompt = torch.tensor([90, 120])
    with torch.no_grad():
        patch_model(model, window=16, sinks=3, decode="full", backend=backend)
        out = model(ids, prompt_lengths=prompt).logits
        specs = layer_specs(model)
        unpatch_model(model)
    assert_matches_reference_only(model, out, specs, ids, full_from=prompt - 1, atol=ATOL, rtol=ATOL)


def test_a_forward_without_a_boundary_windows_all_but_its_last_query():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(30)
    with torch.no_grad():
        implicit = model(ids).logits
        explicit = model(ids, prompt_lengths=30).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


def test_a_list_of_layers_decodes_fully_and_the_others_keep_the_window():
    model = tiny_model("llama", num_hidden_layers=4)
    n = 60
    ids = _ids(n)
    prompt = torch.tensor([35, 48])
    with torch.no_grad():
        patch_model(model, window=W, sinks=1, decode=[1, 3], backend="sdpa")
        specs = layer_specs(model)
        assert [s.decode_full for s in specs] == [False, True, False, True]
        out = model(ids, prompt_lengths=prompt).logits
        unpatch_model(model)
    assert_matches_reference_only(model, out, specs, ids, full_from=prompt - 1, atol=ATOL, rtol=ATOL)


# ---- the cache: prefill + decode == the parallel forward, chunking never moves the boundary ------
@torch.no_grad()
def _through_cache(model, ids, sizes, mask=None, **cache_options):
    cache = make_cache(model, **cache_options)
    out, i = [], 0
    for size in sizes:
        kw = {} if mask is None else {"attention_mask": mask[:, :i + size]}
        out.append(model(ids[:, i:i + size], cache=cache, **kw).logits)
        i += size
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3_text", "qwen2", "gpt2", "gpt_oss"])
@pytest.mark.parametrize("sizes", [[1] * 40, [25, 1, 1, 13], [7, 11, 3, 19]])
def test_prefill_and_decode_equal_parallel_forward(family, sizes):
    model = patch_model(tiny_model(family), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(40, b=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    prompt = torch.tensor([25, 19])
    with torch.no_grad():
        parallel = model(ids, attention_mask=mask, prompt_lengths=prompt).logits
    streamed, cache = _through_cache(model, ids, sizes, mask, prompt_lengths=prompt)
    real = mask.bool()
    torch.testing.assert_close(streamed[real], parallel[real], atol=2e-5, rtol=0)
    assert torch.equal(cache.full_from, prompt - 1)


def test_cache_keeps_every_key_of_decode_layers_only():
    model = patch_model(tiny_model("llama", num_hidden_layers=2), window=W, sinks=2, decode=[1],
                        backend="sdpa")
    sizes = {}
    for n in (20, 60):
        _, cache = _through_cache(model, _ids(n, b=1), [n], prompt_lengths=n)
        sizes[n] = [layer.nbytes() for layer in cache.layers]
    assert sizes[20][0] == sizes[60][0]          # window layer: a rolling buffer
    assert sizes[60][1] == 3 * sizes[20][1]      # decode layer: every key


def test_default_boundary_is_the_first_forward():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(30, b=1)
    with torch.no_grad():
        parallel = model(ids, prompt_lengths=20).logits
    streamed, cache = _through_cache(model, ids, [20] + [1] * 10)
    torch.testing.assert_close(streamed, parallel, atol=2e-5, rtol=0)
    assert cache.full_from.tolist() == [19]


# ---- labels give the boundary: batched training, gradients, checkpointing ---------------------
def test_label_prompt_ends():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, 9], [1, -100, -100, -100]])
    assert label_prompt_ends(labels).tolist() == [2, 1, 4]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batched_training_with_labels_equals_reference(checkpointing):
    """Two rows with different prompt lengths in one batch (the study's toolkit trains at batch
    size 1): loss and every gradient equal the reference with per-row boundaries."""
    n = 80
    ids = _ids(n, seed=5)
    prompt = torch.tensor([30, 62])
    labels = ids.masked_fill(torch.arange(n)[None] < prompt[:, None], -100)
    results = []
    for patched in (True, False):
        model = tiny_model("llama", seed=1).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        if patched:
            patch_model(model, window=12, sinks=2, decode="full")      # auto: sdpa band with grads
            specs = layer_specs(model)
            loss = model(ids, labels=labels).loss
            loss.backward()
        else:
            with reference_attention(model, specs, n, full_from=prompt - 1):   # recompute inside
                loss = model(ids, labels=labels).loss
                loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# ---- generate(): the prompt end is the boundary, however generate feeds the prompt ------------
def _greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True, **kw)


def test_generate_equals_parallel_forward_with_the_prompt_boundary():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(24, b=2, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = _greedy(model, ids, attention_mask=mask)
    steps = torch.stack(out.logits, 1)                                  # [B, 10, V]
    full = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], 1)
    with torch.no_grad():
        parallel = model(out.sequences, attention_mask=full, prompt_lengths=24).logits[:, 23:-1]
    torch.testing.assert_close(steps, parallel, atol=2e-5, rtol=0)
    chunked = _greedy(model, ids, attention_mask=mask, prefill_chunk_size=5)
    torch.testing.assert_close(torch.stack(chunked.logits, 1), steps, atol=2e-5, rtol=0)
    early = _greedy(model, ids, attention_mask=mask, prompt_lengths=15)     # the question attends fully too
    with torch.no_grad():
        parallel = model(early.sequences, attention_mask=full, prompt_lengths=15).logits[:, 23:-1]
    torch.testing.assert_close(torch.stack(early.logits, 1), parallel, atol=2e-5, rtol=0)
    assert (torch.stack(early.logits, 1) - steps).abs().max() > 1e-3
    assert "generate" not in unpatch_model(model).__dict__


# ---- original_attention: the teacher is the unpatched model, exactly ----------------------------
def test_original_attention_is_exactly_the_unpatched_model():
    ids = _ids(50)
    plain = tiny_model("qwen2")
    model = patch_model(tiny_model("qwen2"), window=W, sinks=2, decode="full")
    with torch.no_grad():
        want = plain(ids).logits
        windowed = model(ids).logits
        with original_attention(model):
            got = model(ids).logits
            gen = model.generate(ids[:, :10], max_new_tokens=5, do_sample=False, pad_token_id=0)
        after = model(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(gen, plain.generate(ids[:, :10], max_new_tokens=5, do_sample=False, pad_token_id=0))
    assert torch.equal(after, windowed) and not torch.equal(after, want)


def test_original_attention_restores_after_an_error_and_refuses_misuse():
    model = patch_model(tiny_model("llama"), window=W)
    ids = _ids(20)
    with torch.no_grad():
        windowed = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"), original_attention(model):
            raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, windowed)
        with original_attention(model):
            with pytest.raises(ValueError, match="SWACache cannot serve"):
                model(ids, cache=make_cache(model))
            with pytest.raises(RuntimeError, match="do not nest"), original_attention(model):
                pass
    with pytest.raises(ValueError, match="no model patched"), original_attention(tiny_model("llama")):
        pass


def test_original_attention_through_peft_with_the_adapter_off():
    from peft import LoraConfig, get_peft_model
    ids = _ids(40)
    base = tiny_model("llama")
    with torch.no_grad():
        want = base(ids).logits
    peft_model = get_peft_model(patch_model(base, window=W, sinks=2), LoraConfig(r=4, target_modules=["q_proj"],
                                                                               init_lora_weights=False))
    with torch.no_grad(), peft_model.disable_adapter(), original_attention(peft_model):
        got = peft_model(ids).logits
    assert torch.equal(got, want)


# ---- errors before any weight is touched --------------------------------------------------------
@pytest.mark.parametrize("decode,match", [("fully", "decode must be one of"), ([0, 5], "out of range"),
                                          ([True], "int"), (3, "decode must be one of")])
def test_bad_decode_values(decode, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, window=W, decode=decode)
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_decode_full_refuses_shift_positions():
    with pytest.raises(ValueError, match="positions='shift'"):
        SWAConfig(window=8, sinks=4, decode="full", positions="shift")
    assert SWAConfig(window=8, sinks=4, decode="full").position_mode == "original"
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode=[0])
    with pytest.raises(ValueError, match="positions='shift' cannot apply"):
        make_cache(model, positions="shift")


def test_boundary_errors():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(20)
    with torch.no_grad():
        with pytest.raises(ValueError, match="reach past the sequence"):
            model(ids, prompt_lengths=21)
        with pytest.raises(ValueError, match=">= 1"):
            model(ids, prompt_lengths=torch.tensor([0, 4]))
        with pytest.raises(ValueError, match="3 values for a batch of 2"):
            model(ids, prompt_lengths=[3, 4, 5])
        with pytest.raises(TypeError, match="one int per row"):
            model(ids, prompt_lengths=2.5)
        foreign = DynamicCache(config=model.config)
        with original_attention(model):                           # a cache filled by the original model
            model(ids[:, :5], cache=foreign)
        with pytest.raises(ValueError, match="keeps every key"):
            model(ids[:, 5:6], cache=foreign)
        cache = make_cache(model, prompt_lengths=10)
        model(ids[:, :4], cache=cache)
        with pytest.raises(ValueError, match="already records the prompt boundary"):
            model(ids[:, 4:8], cache=cache, prompt_lengths=12)
    window_model = patch_model(tiny_model("llama"), window=W)
    with pytest.raises(ValueError, match="decode='full'"):
        window_model(ids, prompt_lengths=5)
    with pytest.raises(ValueError, match="decode='full'"):
        make_cache(window_model, prompt_lengths=5)


def test_decode_setting_survives_a_checkpoint(tmp_path):
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode=[1])
    swa_patch.save_pretrained(model, tmp_path)
    loaded = swa_patch.from_pretrained(tmp_path)
    assert swa_patch.patch.patch_settings(loaded).decode == [1]
    ids = _ids(40)
    with torch.no_grad():                     # the reloaded model answers like the saved one
        torch.testing.assert_close(loaded(ids, prompt_lengths=[25, 30]).logits,
                                   model(ids, prompt_lengths=[25, 30]).logits, atol=0, rtol=0)
        windowed = patch_model(tiny_model("llama"), window=W, sinks=2)(ids).logits
    assert (loaded(ids, prompt_lengths=[25, 30]).logits - windowed).abs().max() > 1e-3
