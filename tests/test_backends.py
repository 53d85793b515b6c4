"""Invariant 1 at attention level: every backend equals the dense reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attn_cases import assert_close_valid, left_padding, random_qkv, reference, run_backend
from swa_patch.backends import eager, flash, flex, sdpa
from swa_patch.backends.layout import KeyLayout
from swa_patch.masks import LayerSpec, reference_mask

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), w_off=st.integers(-3, 3), w_small=st.integers(1, 40), near=st.booleans(),
       sinks=st.integers(0, 4), kv=st.sampled_from([(4, 4), (4, 2), (4, 1)]), pad=st.booleans(),
       backend=st.sampled_from(["eager", "sdpa"]), seed=st.integers(0, 99))
def test_random_cases_match_reference(n, w_off, w_small, near, sinks, kv, pad, backend, seed):
    window = max(1, n + w_off) if near else w_small          # windows at and around n
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(2, kv[0], kv[1], n, 8, seed=seed)
    padding = left_padding(2, n, seed) if pad and n > 1 else None
    module = {"eager": eager, "sdpa": sdpa}[backend]
    out = run_backend(module, q, k, v, spec, padding)
    assert_close_valid(out, reference(q, k, v, spec, padding), padding, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,window,sinks", [(300, 64, 0), (300, 64, 4), (257, 256, 2), (257, 257, 3),
                                            (257, 258, 1), (600, 1, 2), (513, 100, 4)])
def test_sdpa_band_long_sequences(dtype, n, window, sinks):
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(1, 4, 2, n, 16, dtype=dtype)
    out = run_backend(sdpa, q, k, v, spec)
    ref = reference(q.float(), k.float(), v.float(), spec).to(dtype)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("softcap,s_aux", [(20.0, None), (None, True), (5.0, True)])
def test_softcap_and_learned_sinks(softcap, s_aux):
    spec = LayerSpec(40, 1, 2)
    q, k, v = random_qkv(2, 4, 2, 150, 16)
    aux = torch.randn(4) if s_aux else None
    padding = left_padding(2, 150)
    ref = reference(q, k, v, spec, padding, softcap, aux)
    for module in (eager, sdpa):
        assert_close_valid(run_backend(module, q, k, v, spec, padding, softcap, aux), ref, padding, atol=2e-5)


@pytest.mark.parametrize("window,sinks,pad", [(64, 0, False), (64, 4, True), (200, 2, False)])
def test_sdpa_gradients_match_reference(window, sinks, pad):
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(2, 4, 2, 260, 16, grad=True)
    padding = left_padding(2, 260) if pad else None
    weight = torch.randn(2, 260, 4, 16)
    if padding is not None:
        weight = weight * padding[:, :, None, None]
    grads = []
    for fn in (lambda: run_backend(sdpa, q, k, v, spec, padding), lambda: reference(q, k, v, spec, padding)):
        (fn() * weight).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,window,sinks,pad,kv", [(300, 64, 0, False, 2), (300, 64, 3, True, 1),
                                                   (129, 129, 2, False, 4)])
def test_flex_matches_reference(n, window, sinks, pad, kv):
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(2, 4, kv, n, 16)
    padding = left_padding(2, n) if pad else None
    with torch.no_grad():
        out = run_backend(flex, q, k, v, spec, padding, softcap=10.0 if pad else None)
    ref = reference(q, k, v, spec, padding, softcap=10.0 if pad else None)
    assert_close_valid(out, ref, padding, atol=2e-5)


def test_flex_window_compiles_once_for_every_length(monkeypatch):
    """Fixed-shape chunks: after the first call, new prompt lengths (and continuations that
    start mid-stream) reuse the compiled kernels, and every length equals the reference."""
    import torch._dynamo.utils as dynamo_utils

    from swa_patch.attention import MaskInfo, contiguous_layout

    monkeypatch.setitem(flex.CHUNK, "cpu", 128)
    spec = LayerSpec(40, 1, 3)
    new_graphs = []
    for n, start, b in ((300, 0, 2), (131, 0, 2), (517, 0, 2), (129, 0, 2), (700, 0, 2), (400, 250, 2),
                        (90, 0, 2), (300, 0, 1), (517, 0, 1)):
        q, k, v = random_qkv(b, 4, 2, n, 16, seed=n)
        padding = left_padding(b, n, seed=n) if b > 1 else None
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        layout = contiguous_layout(MaskInfo(start, padding), q[:, :, start:], k, v, spec)
        with torch.no_grad():
            out = flex.attend(q[:, :, start:], k, v, layout, spec, q.shape[-1] ** -0.5)
        new_graphs.append(dynamo_utils.counters["stats"]["unique_graphs"] - before)
        ref = reference(q, k, v, spec, padding)[:, start:]
        assert_close_valid(out, ref, None if padding is None else padding[:, start:], atol=2e-5)
    assert new_graphs[1:7] == [0] * 6 and new_graphs[8] == 0, new_graphs       # batch 1: one compile


def test_flex_plain_window_uses_one_local_band_kernel_for_every_length(monkeypatch):
    """No sinks, no padding (a plain prefill): the chunks' masks are the band in chunk
    coordinates.  Every length, and continuations with a full or a partial window of keys
    before them, reuse the kernels of the first call, and all equal the reference."""
    import torch._dynamo.utils as dynamo_utils

    from swa_patch.attention import MaskInfo, contiguous_layout

    monkeypatch.setitem(flex.CHUNK, "cpu", 128)
    spec = LayerSpec(40)
    new_graphs = []
    for n, start in ((300, 0), (131, 0), (517, 0), (129, 0), (90, 0), (400, 250), (400, 20), (260, 0)):
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n + start)
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        layout = contiguous_layout(MaskInfo(start, None), q[:, :, start:], k, v, spec)
        with torch.no_grad():
            out = flex.attend(q[:, :, start:], k, v, layout, spec, q.shape[-1] ** -0.5)
        new_graphs.append(dynamo_utils.counters["stats"]["unique_graphs"] - before)
        assert_close_valid(out, reference(q, k, v, spec)[:, start:], None, atol=2e-5)
    assert new_graphs[0] > 0 and new_graphs[1:] == [0] * 7, new_graphs


def test_flex_short_prompts_run_in_power_of_two_chunks(monkeypatch):
    """A prompt shorter than CHUNK runs in one power-of-two chunk (not CHUNK padded queries):
    lengths in one bucket share its kernel; chunks narrower than the window (padding in front
    of later chunks too) still equal the reference."""
    import torch._dynamo.utils as dynamo_utils

    from swa_patch.attention import MaskInfo, contiguous_layout

    monkeypatch.setitem(flex.CHUNK, "cpu", 128)
    monkeypatch.setattr(flex, "MIN_CHUNK", 32)
    assert [flex._chunk_size(n, 128) for n in (1, 32, 33, 64, 65, 128, 129, 5000)] == [32, 32, 64, 64, 128, 128,
                                                                                       128, 128]
    new_graphs = []
    for n, spec in ((33, LayerSpec(40)), (50, LayerSpec(40)), (64, LayerSpec(40)), (39, LayerSpec(40)),
                    (40, LayerSpec(40)), (41, LayerSpec(40)), (20, LayerSpec(40)), (300, LayerSpec(200))):
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n)
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        layout = contiguous_layout(MaskInfo(0, None), q, k, v, spec)
        with torch.no_grad():
            out = flex.attend(q, k, v, layout, spec, q.shape[-1] ** -0.5)
        new_graphs.append(dynamo_utils.counters["stats"]["unique_graphs"] - before)
        assert_close_valid(out, reference(q, k, v, spec), None, atol=2e-5)
    assert new_graphs[1:6] == [0] * 5, new_graphs         # 33..64 (W-1, W, W+1 too) share the 64-query kernel


def test_flex_never_falls_back_to_eager_when_compiles_run_out(monkeypatch, caplog):
    """Past dynamo's recompile limit, flex_attention would run eagerly (the full score matrix):
    backend='flex' raises instead, and 'auto' logs and runs the sdpa band kernel."""
    import logging

    from swa_patch import attention
    from swa_patch.attention import LayerPlan, MaskInfo, run_plan

    monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 0)        # no room for any new variant
    monkeypatch.setattr(attention, "AUTO_FLEX_ON_CPU", True)   # auto picks flex here as on CUDA
    spec = LayerSpec(16, 1, 2)
    q, k, v = random_qkv(1, 2, 2, 2049, 8, seed=5)          # a length no other test compiles
    with pytest.raises(flex.FlexCompileLimit, match="backend='sdpa'"), torch.no_grad():
        run_backend(flex, q, k, v, spec)
    with caplog.at_level(logging.WARNING, logger="swa_patch"), torch.no_grad():
        out = run_plan(LayerPlan(spec, "auto"), q, k, v, MaskInfo(0, None), scaling=8 ** -0.5)
    assert "runs 'sdpa'" in caplog.text
    assert_close_valid(out, reference(q, k, v, spec), None, atol=2e-5)


def test_flex_refuses_cpu_backward():
    q, k, v = random_qkv(1, 2, 2, 64, 8, grad=True)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        run_backend(flex, q, k, v, LayerSpec(16))


# ---- flash-attn: argument semantics checked against a stand-in of its documented behaviour ----

def flash_stand_in(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                   return_attn_probs=False, **_):
    """Pure-torch flash_attn_func: q [B, Lq, H, D], k/v [B, Lk, Hkv, D]; window inclusive on both
    sides and bottom-right aligned; returns (out, softmax_lse [B, H, Lq], None)."""
    lq, lk, h = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(lq)[:, None] + (lk - lq)      # bottom-right alignment
    j = torch.arange(lk)[None, :]
    left, right = window_size
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        right = 0
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v.float()).to(q.dtype)
    return out, lse, None


@pytest.mark.parametrize("n,window,sinks,softcap,aux", [(200, 32, 0, None, False), (200, 32, 4, None, False),
                                                        (200, 1, 3, 30.0, True), (90, 100, 2, None, False)])
def test_flash_path_with_stand_in(monkeypatch, n, window, sinks, softcap, aux):
    monkeypatch.setattr(flash, "flash_attn_func", flash_stand_in)
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(2, 4, 2, n, 16)
    s_aux = torch.randn(4) if aux else None
    out = run_backend(flash, q, k, v, spec, None, softcap, s_aux)
    torch.testing.assert_close(out, reference(q, k, v, spec, None, softcap, s_aux), atol=2e-5, rtol=0)


def flash4_stand_in(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), softcap=0.0,
                    return_lse=False, **_):
    """FlashAttention-4's documented signature (flash_attn/cute/interface.py, 4.0.0b36): ``None``
    for an unbounded window side, ``return_lse`` gives ``(out, lse [B, H, Lq])``; the same window
    semantics as FA2 (inclusive, bottom-right aligned)."""
    assert all(w is None or w >= 0 for w in window_size), "FA4 spells unbounded as None, not -1"
    window = tuple(-1 if w is None else w for w in window_size)
    out, lse, _ = flash_stand_in(q, k, v, softmax_scale, causal, window, softcap)
    return out, lse


@pytest.mark.parametrize("n,window,sinks,softcap,aux,kv", [(200, 32, 0, None, False, 2), (200, 32, 4, None, False, 1),
                                                           (200, 1, 3, 30.0, True, 2), (90, 100, 2, None, False, 4),
                                                           (300, 299, 2, None, False, 2), (300, 300, 2, None, False, 2)])
def test_flash4_path_with_stand_in(monkeypatch, n, window, sinks, softcap, aux, kv):
    from swa_patch.backends import flash4
    monkeypatch.setattr(flash, "flash4_attn_func", flash4_stand_in)
    monkeypatch.setattr(flash, "flash_attn_func", None)            # the FA2 kernel must not be called
    spec = LayerSpec(window, 1, sinks)
    q, k, v = random_qkv(2, 4, kv, n, 16)
    s_aux = torch.randn(4) if aux else None
    out = run_backend(flash4, q, k, v, spec, None, softcap, s_aux)
    ref = reference(q, k, v, spec, None, softcap, s_aux)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    for wrong in (LayerSpec(window - 1, 1, sinks), LayerSpec(window + 1, 1, sinks)):
        if wrong.window >= 1 and not torch.equal(reference_mask(wrong, n), reference_mask(spec, n)):
            assert (out - reference(q, k, v, wrong, None, softcap, s_aux)).abs().max() > 2e-5   # W-1, W+1 rejected


def test_auto_prefers_flash4_then_flash_and_never_for_padding(monkeypatch):
    from swa_patch import attention
    from swa_patch.backends import FLASH_KERNELS, _installed, check_available

    class FakeQ:   # choose_backend reads only these attributes: a CUDA query stand-in
        shape, is_cuda, requires_grad = (1, 2, 4096, 8), True, False
    for have, want in ((("flash", "flash4"), "flash4"), (("flash",), "flash"), ((), "flex")):
        monkeypatch.setattr(attention, "flash_available", lambda kernel="flash", have=have: kernel in have)
        assert attention.choose_backend("auto", FakeQ, LayerSpec(64), KeyLayout(0, 0)) == want
        padded = KeyLayout(0, 0, key_real=torch.ones(1, 4096, dtype=torch.bool))
        assert attention.choose_backend("auto", FakeQ, LayerSpec(64), padded) == "flex"
    with pytest.raises(ValueError, match="flash4.*CUDA"):
        check_available("flash4", torch.device("cpu"))
    assert not _installed("no_such_package_xyz.cute")
    assert set(FLASH_KERNELS) == {"flash", "flash4"}


def test_flash_stand_in_window_convention():
    """flash's (W-1, 0) sees exactly W keys, (W, 0) would see W+1: the classic off-by-one."""
    q, k, v = random_qkv(1, 1, 1, 10, 4)
    args = dict(softmax_scale=0.5, causal=True, return_attn_probs=True)
    ours = flash_stand_in(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=(2, 0), **args)[0]
    ref = reference(q, k, v, LayerSpec(3))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sinks", [0, 4])
def test_real_flash_attn_kernel(sinks):
    pytest.importorskip("flash_attn.flash_attn_interface")      # flash-attn 2 (FA4 ships flash_attn.cute only)
    spec = LayerSpec(128, 1, sinks)
    q, k, v = (t.cuda().half() for t in random_qkv(2, 8, 2, 1000, 64))
    out = run_backend(flash, q, k, v, spec)
    ref = reference(q.float(), k.float(), v.float(), spec)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper or newer GPU")
@pytest.mark.parametrize("sinks,softcap,aux", [(0, None, False), (4, None, False), (4, 30.0, True)])
def test_real_flash4_kernel(sinks, softcap, aux):
    """FlashAttention-4 against the dense reference in bf16, forward and backward, with a
    tolerance that the same call with W-1 or W+1 fails."""
    pytest.importorskip("flash_attn.cute")
    from swa_patch.backends import flash4
    spec = LayerSpec(128, 1, sinks)
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in random_qkv(2, 8, 2, 1000, 64))
    s_aux = torch.randn(8, device="cuda") if aux else None
    out = run_backend(flash4, q, k, v, spec, None, softcap, s_aux)
    ref = reference(q.float(), k.float(), v.float(), spec, None, softcap, s_aux)
    err = (out.float() - ref).abs().max().item()
    off = min((out.float() - reference(q.float(), k.float(), v.float(), LayerSpec(w, 1, sinks), None, softcap, s_aux))
              .abs().max().item() for w in (127, 129))
    assert err <= 2e-2 < off, (err, off)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sinks", [0, 4])
def test_flex_on_cuda_forward_and_backward(sinks):
    spec = LayerSpec(256, 1, sinks)
    q, k, v = (t.cuda().detach().requires_grad_() for t in random_qkv(1, 8, 2, 2048, 64))
    out = run_backend(flex, q, k, v, spec)
    ref = reference(q, k, v, spec)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)
    out.sum().backward()
    grad_q = q.grad.clone()
    q.grad = None
    ref.sum().backward()
    torch.testing.assert_close(grad_q, q.grad, atol=2e-3, rtol=0)
