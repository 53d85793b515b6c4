"""export_for_serving: (a) transformers, loading the exported checkpoint *unpatched*, runs the
window swa_patch ran; (b) each engine's documented rule, re-implemented here from the config
alone, reads exactly swa_patch's per-layer windows from every exported config; refusals."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import swa_patch
from models import FAMILY_CONFIGS, tiny_model
from swa_patch import compat, export_for_serving, patch_model
from swa_patch.checkpoint import NATIVE_KEY
from swa_patch.export import RULES, serving_fields
from swa_patch.patch import layer_specs

NATIVE = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_oss", "starcoder2", "smollm3"]


def _ids(n=40):
    return torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(3))


# ---- each engine's rule, from the config alone (what the engine would do) ------------------------
def vllm_windows(config: dict) -> list:
    """vLLM 0.32: layer_types[i] (Llama, Mistral, Phi3, Gemma 2/3) or, without layer_types, the
    model-wide sliding_window on every layer; Qwen2/3 one window only (mixed layer types are an
    assertion, or full everywhere when max_window_layers == num_hidden_layers); GPT-OSS windows
    its even layers and ignores layer_types."""
    n, w, types = config["num_hidden_layers"], config.get("sliding_window"), config.get("layer_types")
    kind = config["model_type"]
    if kind == "gpt_oss":
        return [w if i % 2 == 0 else None for i in range(n)]
    if kind == "gemma":      # no per-layer code: the model-wide window only if every layer_types entry is sliding
        return [w if not types or set(types) == {"sliding_attention"} else None] * n
    if kind in ("qwen2", "qwen3"):
        if types and len(set(types)) > 1:
            raise AssertionError("vLLM: Qwen2 with mixed layer_types")
        if not config.get("use_sliding_window") or config.get("max_window_layers") == n:
            return [None] * n
        return [w] * n
    if types:
        return [w if t == "sliding_attention" else None for t in types]
    return [w] * n


def sglang_windows(config: dict) -> list:
    """SGLang: native Llama/Mistral/Qwen2/Qwen3 run full attention; the transformers backend
    honours layer_types."""
    n = config["num_hidden_layers"]
    if config["model_type"] in ("llama", "mistral", "qwen2", "qwen3"):
        return [None] * n
    types = config.get("layer_types") or ["full_attention"] * n
    return [config["sliding_window"] if t == "sliding_attention" else None for t in types]


def transformers_windows(config: dict) -> list:
    """transformers 5.x: Mistral/Phi3/Starcoder2 one window on every layer; Qwen2/3, SmolLM3,
    Gemma 2/3, GPT-OSS by layer_types (Qwen2/3, SmolLM3: only with use_sliding_window)."""
    n, w, kind = config["num_hidden_layers"], config.get("sliding_window"), config["model_type"]
    if kind in ("mistral", "phi3", "starcoder2"):
        return [w] * n
    if kind in ("qwen2", "qwen3", "smollm3") and not config.get("use_sliding_window"):
        return [None] * n
    types = config.get("layer_types") or ["full_attention"] * n
    return [w if t == "sliding_attention" else None for t in types]


ENGINE_RULES = {"vllm": vllm_windows, "sglang": sglang_windows, "transformers": transformers_windows}


def _model(model_type, n):
    overrides = {"num_hidden_layers": n}
    if model_type in ("gemma3_text", "gpt_oss"):
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2)
    if model_type == "gemma3_text":       # layer 1 global, as _windows leaves it (a type picks the RoPE)
        overrides["layer_types"] = ["sliding_attention", "full_attention"] + ["sliding_attention"] * (n - 2)
    return tiny_model(model_type, **overrides)


def _windows(engine, model_type, n, window=8):
    """A per-layer window list (it overrides a hybrid model's own global layers): one full layer
    where the engine reads per-layer types, every layer windowed where it needs one window."""
    kind = RULES.get((engine, model_type), RULES[("transformers", model_type)]).kind
    if kind == "alternating":
        return [window if i % 2 == 0 else None for i in range(n)]
    return [None if (kind == "per-layer" and i == 1) else window for i in range(n)]


@pytest.mark.parametrize("engine,model_type", sorted(RULES))
def test_every_engine_and_family_reads_the_windows_swa_patch_applies(tmp_path, engine, model_type):
    model = _model(model_type, 4)
    window = model.config.sliding_window if model_type == "gpt_oss" else 8   # vLLM: the config's own W
    patch_model(model, window=_windows(engine, model_type, 4, window))
    if RULES[(engine, model_type)].kind == "ignored":
        with pytest.raises(ValueError, match="the window itself"):
            export_for_serving(model, tmp_path / "x", engine)
        return
    export_for_serving(model, tmp_path / "x", engine)
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    want = [s.window for s in layer_specs(model)]
    assert ENGINE_RULES[engine](config) == want
    assert config["swa_patch"]["window"] == _windows(engine, model_type, 4, window)   # the exact settings stay
    back = swa_patch.from_pretrained(tmp_path / "x")            # ... and come back, on the original class
    assert type(back) is type(model) and layer_specs(back) == layer_specs(model)


@pytest.mark.parametrize("model_type", NATIVE)
def test_transformers_runs_the_exported_window_unpatched(tmp_path, model_type):
    """The exported checkpoint, loaded by plain AutoModelForCausalLM (transformers' own window
    code), gives the patched model's logits: an independent implementation of our window."""
    model = _model(model_type, 2)
    patch_model(model, window=_windows("transformers", model_type, 2), backend="sdpa")
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
    export_for_serving(model, tmp_path / "x", "transformers")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x", attn_implementation="eager").eval()
    assert not hasattr(plain, "_swa_patch_state")
    with torch.no_grad():
        theirs = plain(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    swa_patch.unpatch_model(model)
    with torch.no_grad():
        dense = model(ids).logits
    assert (theirs - dense).abs().max() > 1e-3                    # a window really runs there
    back = swa_patch.from_pretrained(tmp_path / "x")               # and swa_patch restores its settings
    assert layer_specs(back)[0].window == 8


@pytest.mark.parametrize("options,match", [
    (dict(window=8, sinks=4), "4 attention sinks"),
    (dict(window=8, dilation=2), "dilation"),
    (dict(window=8, decode="full"), "decode='full'"),
    (dict(window=[8, 6]), r"different windows per layer \[6, 8\]"),
])
def test_what_no_engine_expresses_is_refused(tmp_path, options, match):
    model = patch_model(tiny_model("mistral"), **options)
    for engine in ("vllm", "transformers"):
        with pytest.raises(ValueError, match=match):
            export_for_serving(model, tmp_path / engine, engine)
    assert not (tmp_path / "vllm").exists()


def test_family_specific_refusals():
    qwen = patch_model(tiny_model("qwen2", num_hidden_layers=4), window=[8, None, 8, 8])
    with pytest.raises(ValueError, match=r"full-attention layers \[1\].*vllm applies one window"):
        serving_fields(qwen, "vllm")
    assert serving_fields(qwen, "transformers")["layer_types"][1] == "full_attention"
    oss = patch_model(_model("gpt_oss", 4), window=[8, 8, 8, 8])
    with pytest.raises(ValueError, match="even gpt_oss layers"):
        serving_fields(oss, "vllm")
    with pytest.raises(ValueError, match="no rule for how sglang windows a 'olmo2'"):
        serving_fields(patch_model(tiny_model("olmo2"), window=8), "sglang")
    with pytest.raises(ValueError, match="engine must be one of"):
        serving_fields(qwen, "tgi")


def test_approximate_names_what_is_dropped(tmp_path):
    model = patch_model(tiny_model("mistral"), window=8, sinks=4)
    with pytest.raises(ValueError, match="approximate names what may be dropped"):
        serving_fields(model, "vllm", approximate=["sink"])
    fields = export_for_serving(model, tmp_path / "x", "vllm", approximate=["sinks"])
    assert fields["sliding_window"] == 8
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["swa_patch"]["sinks"] == 4                      # swa_patch still knows the sinks
    assert swa_patch.patch.patch_settings(swa_patch.from_pretrained(tmp_path / "x")).sinks == 4
    llama = patch_model(tiny_model("llama"), window=8)
    assert serving_fields(llama, "transformers", approximate=["window"]) == {}


def test_a_peft_adapter_is_folded_in_and_the_model_left_alone(tmp_path):
    from peft import LoraConfig, get_peft_model
    base = patch_model(tiny_model("mistral"), window=8, backend="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
    export_for_serving(model, tmp_path / "x", "transformers")
    assert any("lora" in n for n, _ in model.named_parameters())          # not merged in place
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_export_command(tmp_path):
    from swa_patch.cli import main
    model = patch_model(tiny_model("qwen2"), window=[8, 8])
    swa_patch.save_pretrained(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--engine", "vllm"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert vllm_windows(config) == [8, 8]


# ---- the cross-check: logits after reload, every family x every kind of window a user passes -----
def _patterns(n):
    """Every kind of ``window=`` a user can pass: one int, one list, per-layer sizes, None = full."""
    return {"int": 8, "list": [8] * n, "sizes": [8 if i % 2 == 0 else 6 for i in range(n)],
            "none_first": [None] + [8] * (n - 1), "none_last": [8] * (n - 1) + [None]}


CROSS = [(t, p) for t in FAMILY_CONFIGS for p in _patterns(2)]


@pytest.mark.parametrize("model_type,pattern", CROSS)
def test_reloads_give_the_patched_logits_or_the_export_refuses(tmp_path, one_thread, model_type, pattern):
    """Compares logits, not config fields: (1) export for transformers, reloaded *unpatched* by plain
    AutoModelForCausalLM, gives the patched model's logits to 1e-5, or the export refuses before
    writing; (2) swa_patch.save_pretrained + swa_patch.from_pretrained gives them back, and where
    the save wrote native window fields (no sinks) the unpatched reload gives them as well."""
    model = tiny_model(model_type)
    n = compat.text_config(model).num_hidden_layers
    patch_model(model, window=_patterns(n)[pattern])
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        with swa_patch.original_attention(model):
            dense = model(ids).logits
    assert (ours - dense).abs().max() > 1e-3                          # the window matters at this length
    plain = lambda path: AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    try:
        export_for_serving(model, tmp_path / "export", "transformers")
    except ValueError:
        assert not (tmp_path / "export").exists()
        # one window on every (natively windowed) layer is expressible wherever transformers has a window
        assert pattern != "int" or RULES[("transformers", model_type)].kind == "ignored"
    else:
        with torch.no_grad():
            torch.testing.assert_close(plain(tmp_path / "export")(ids).logits, ours, atol=1e-5, rtol=1e-5)
    swa_patch.save_pretrained(model, tmp_path / "save")
    with torch.no_grad():
        torch.testing.assert_close(swa_patch.from_pretrained(tmp_path / "save")(ids).logits, ours,
                                   atol=1e-6, rtol=0)
        if NATIVE_KEY in json.loads((tmp_path / "save" / "config.json").read_text()):
            torch.testing.assert_close(plain(tmp_path / "save")(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_a_retyped_gemma3_layer_is_refused_and_saved_without_native_fields(tmp_path, caplog):
    """Gemma 3 picks each layer's RoPE base by its layer type: windowing its global layer (or
    unwindowing a local one) cannot be written as layer_types. Gemma 2 has one RoPE: it can."""
    for window in ([8, 8, 8], [None, 8, None]):
        model = patch_model(tiny_model("gemma3_text"), window=window)
        for engine in ("transformers", "vllm", "sglang"):
            with pytest.raises(ValueError, match=r"layer [02] as .*picks its RoPE"):
                serving_fields(model, engine)
        with caplog.at_level(logging.WARNING, logger="swa_patch"):
            swa_patch.save_pretrained(model, tmp_path / "save")
        saved = json.loads((tmp_path / "save" / "config.json").read_text())
        assert saved["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
        assert NATIVE_KEY not in saved and "picks its RoPE" in caplog.text
    assert serving_fields(patch_model(tiny_model("gemma3_text"), window=8), "transformers")["sliding_window"] == 8
    gemma2 = serving_fields(patch_model(tiny_model("gemma2"), window=[8, 8]), "transformers")
    assert gemma2["layer_types"] == ["sliding_attention"] * 2


def test_export_verify_options_fail_before_loading(tmp_path):
    from swa_patch.cli import main
    missing = str(tmp_path / "no-such-checkpoint")          # never read: the options fail first
    with pytest.raises(SystemExit, match="--verify-python: .*not an executable"):
        main(["export", missing, str(tmp_path / "o"), "--verify-python", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="needs --engine vllm"):
        main(["export", missing, str(tmp_path / "o"), "--engine", "transformers", "--verify"])
    with pytest.raises(SystemExit, match="--verify-tokens must be at least 2"):
        main(["export", missing, str(tmp_path / "o"), "--verify", "--verify-tokens", "1"])


def test_verify_reports_what_vllm_said(tmp_path):
    """The driver runs in another interpreter; its failure (here: this one, without vLLM, or a
    checkpoint it cannot read) comes back as vLLM's last error line, and verify_export raises it."""
    import importlib.util
    import sys

    from swa_patch.verify import verify_export, vllm_prompt_logprobs
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    got = vllm_prompt_logprobs([(tmp_path, [torch.arange(4)])], python=sys.executable)
    assert got == ["ModuleNotFoundError: No module named 'vllm'"]
    model = patch_model(tiny_model("mistral"), window=8)
    with pytest.raises(RuntimeError, match="(?s)vLLM could not serve .*No module named 'vllm'"):
        verify_export(model, tmp_path, n_tokens=16, python=sys.executable)
    with pytest.raises(ValueError, match="verify_python="):
        verify_export(model, tmp_path, python=str(tmp_path / "no-python"))
