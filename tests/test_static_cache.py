"""make_cache(model, static=True): the same logits as the dynamic rolling cache, one compiled graph
(fullgraph, no graph break, no recompile across evictions), compiled == eager over 2,000 steps,
and transformers' compiled generate() path."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from transformers.generation.configuration_utils import CompileConfig

from models import tiny_model
from swa_patch import make_cache, patch_model
from swa_patch.static_cache import StaticSWACache

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**options):
    options = {"window": 6, "sinks": 2, "positions": "original", "backend": "sdpa", **options}
    return patch_model(tiny_model("llama"), **options)


def _ids(n, b=1, seed=0):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _stream(model, ids, cache, prompt, mask=None):
    kw = lambda end: {} if mask is None else {"attention_mask": mask[:, :end]}
    out = [model(ids[:, :prompt], cache=cache, **kw(prompt)).logits]
    for t in range(prompt, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache, **kw(t + 1)).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("prompt", [1, 9])
@pytest.mark.parametrize("options", [dict(), dict(window=[6, None]), dict(sinks=0), dict(window=[4, 7], sinks=3),
                                     dict(positions="shift"), dict(positions="shift", sinks=0),
                                     dict(positions="shift", window=[4, 7], sinks=3)])
def test_static_cache_equals_the_dynamic_cache(options, prompt):
    """Streams many windows (and, in shift mode, many of the dynamic cache's rebases) long."""
    model = _model(**options)
    ids = _ids(70, b=2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    dynamic = _stream(model, ids, make_cache(model), prompt, mask)
    static = _stream(model, ids, make_cache(model, static=True, max_cache_len=128), prompt, mask)
    real = mask.bool()
    torch.testing.assert_close(static[real], dynamic[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["original", "shift"])
def test_one_graph_no_break_no_recompile_and_2000_compiled_steps_equal_eager(positions):
    model = _model(window=8, sinks=2, positions=positions)
    prompt = _ids(12)
    caches = {mode: make_cache(model, static=True) for mode in ("eager", "compiled")}
    with torch.no_grad():
        for cache in caches.values():
            model(prompt, cache=cache)
        step = lambda t, c: model(t, cache=c).logits[:, -1]
        probe = make_cache(model, static=True)
        model(prompt, cache=probe)
        explanation = torch._dynamo.explain(step)(_ids(1), probe)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(step, fullgraph=True)
        tokens = _ids(2000, seed=3)
        compiled(tokens[:, :1], caches["compiled"])                  # the one compile
        step(tokens[:, :1], caches["eager"])
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        worst = 0.0
        for t in range(1, 2000):                                    # ~250 evictions of the ring
            a = compiled(tokens[:, t:t + 1], caches["compiled"])
            b = step(tokens[:, t:t + 1], caches["eager"])
            worst = max(worst, (a - b).abs().max().item())
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"
    assert worst < 1e-4, worst
    assert int(caches["compiled"].position) == 12 + 2000


@pytest.mark.parametrize("options", [dict(window=[6, None]), dict(positions="shift")])
def test_compiled_generate_equals_eager_generate(options):
    """A left-padded batch of 2: the decode steps run compiled (dynamo's graph count: at most 2
    for all 40 steps) and give the eager tokens."""
    model = _model(**options)
    ids = torch.cat([_ids(16, seed=5), _ids(16, seed=6)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True                  # transformers compiles on CUDA only unless told
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, cache=make_cache(model, static=True, max_cache_len=64), **kw)
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        compiled = model.generate(ids, cache=make_cache(model, static=True, max_cache_len=64), compile_config=config,
                                  **kw)
    stats = dict(dynamo_utils.counters["stats"])       # the padding mask grows: one dynamic-shape recompile
    assert 1 <= stats.get("unique_graphs", 0) <= 2 and stats.get("calls_captured", 0) > 0, stats
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("family", ["gpt_neox", "olmo2"])
def test_static_shift_mode_in_other_families_and_compiled(family):
    """Partial rotary (GPT-NeoX) and another family: static shift == dynamic shift, and the
    compiled step equals the eager one."""
    model = patch_model(tiny_model(family), window=5, sinks=2, backend="sdpa")       # shift by default
    ids = _ids(60, seed=4)
    dynamic = _stream(model, ids, make_cache(model), 7)
    static = _stream(model, ids, make_cache(model, static=True), 7)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=0)
    caches = [make_cache(model, static=True) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :7], cache=cache)
        step = lambda t, c: model(t, cache=c).logits
        compiled = torch.compile(step, fullgraph=True)
        for t in range(7, 60):
            torch.testing.assert_close(compiled(ids[:, t:t + 1], caches[0]), step(ids[:, t:t + 1], caches[1]),
                                       atol=1e-5, rtol=0)


def test_static_cache_refusals():
    model = _model(window=[6, None])
    with pytest.raises(ValueError, match=r"layers \[1\] use full attention and need max_cache_len"):
        make_cache(model, static=True)
    shifted = patch_model(tiny_model("llama"), window=[6, None], sinks=2)        # default positions: shift
    with pytest.raises(ValueError, match="full attention, which would re-rotate"):
        make_cache(shifted, static=True, max_cache_len=64)
    full_decode = patch_model(tiny_model("llama"), window=6, decode="full")
    with pytest.raises(ValueError, match="decode fully"):
        make_cache(full_decode, static=True)
    cache = make_cache(_model(), static=True)
    assert isinstance(cache, StaticSWACache) and cache.is_compileable
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-1)
    small = make_cache(model, static=True, max_cache_len=10)
    with pytest.raises(ValueError, match="past max_cache_len=10"), torch.no_grad():
        model(_ids(12), cache=small)
