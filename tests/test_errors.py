"""Error paths: each refusal is clear, names what is wrong, and happens instead of a wrong answer."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from models import tiny_model
from swa_patch import make_cache, patch_model
from swa_patch.backends import check_available


def _ids(n, b=1, seed=0):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def test_attention_dropout_in_training_is_refused():
    model = patch_model(tiny_model("llama", attention_dropout=0.1), window=8).train()
    with pytest.raises(ValueError, match=r"attention dropout \(0.1\).*attention_dropout = 0.0"):
        model(_ids(20), labels=_ids(20))
    with torch.no_grad():
        model.eval()(_ids(20))                 # dropout is off in eval: no error


@pytest.mark.parametrize("family,native,window,sinks,match", [
    ("mistral", 8, 16, 0, "kept keys from position"),          # the foreign cache evicted window keys
    ("mistral", 8, 4, 2, "dropped the attention-sink tokens"),  # it kept the window, not the sinks
    ("gemma3_text", 8, 4, 2, "dropped the attention-sink tokens"),
])
def test_foreign_sliding_cache_that_dropped_keys_is_refused(family, native, window, sinks, match):
    """transformers' own DynamicCache for a model with a native window keeps only its last keys;
    a patched model fed that cache must refuse rather than attend a truncated past."""
    kwargs = {"sliding_window": native}
    if family == "gemma3_text":
        kwargs["layer_types"] = ["sliding_attention"] * 3
    model = tiny_model(family, **kwargs)
    foreign = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(30), cache=foreign)                     # filled before patching: a foreign cache
    patch_model(model, window=window, sinks=sinks, positions="original", backend="sdpa")
    with pytest.raises(RuntimeError, match=match), torch.no_grad():
        model(_ids(1, seed=1), cache=foreign)


def test_crop_errors():
    model = patch_model(tiny_model("llama"), window=6, sinks=2, positions="original", backend="sdpa")
    cache = make_cache(model)
    with torch.no_grad():
        model(_ids(12), cache=cache)
    with pytest.raises(ValueError, match="negative number"):
        cache.crop(3)
    with pytest.raises(ValueError, match="more tokens than the cache has seen"):
        cache.crop(-13)
    with pytest.raises(ValueError, match="evicted keys the next query needs"):
        cache.crop(-4)
    shift = patch_model(tiny_model("llama"), window=6, sinks=2, backend="sdpa")
    cache = make_cache(shift)
    with torch.no_grad():
        shift(_ids(12), cache=cache)
    with pytest.raises(ValueError, match=r"keeps 1 token\(s\) of rollback .*make_cache\(model, rollback=K\)"):
        cache.crop(-2)                       # shift mode crops too (the frame stays), within the rollback
    cache.crop(-1)
    assert cache.get_seq_length() == 11


def test_flash_unavailable_is_named(monkeypatch):
    with pytest.raises(ValueError, match="backend='flash' needs a CUDA device"):
        check_available("flash", torch.device("cpu"))
    from swa_patch import backends
    monkeypatch.setattr(backends, "_installed", lambda module: False)
    with pytest.raises(ValueError, match=r"backend='flash' needs the flash_attn kernels \(pip install"):
        check_available("flash", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"backend='flash4' needs the flash_attn kernels.*flash-attn-4"):
        check_available("flash4", torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA device"):        # before any weight is touched
        patch_model(tiny_model("llama"), window=8, backend="flash")


def test_non_2d_mask_with_the_rolling_cache_is_refused():
    model = patch_model(tiny_model("llama"), window=6, sinks=2, backend="sdpa")
    cache = make_cache(model)
    with pytest.raises(ValueError, match="2-D attention_mask"), torch.no_grad():
        model(_ids(5), cache=cache, attention_mask=torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"2-D \[batch, >= 5\]"):
        cache.begin(5, torch.ones(1, 3))
