"""GPU check in one run: every backend on CUDA against the dense reference, then timings
side by side (attention, dilation, model prefill).

1. Correctness (printed PASS/FAIL per case, and a non-zero exit on any failure): the eager,
   sdpa-band and flex backends through the registered attention function, fp32 and bf16,
   GQA, left padding, sinks, dilation and per-head dilation, against softmax attention under
   the reference mask in fp32; flex's backward on CUDA against the reference gradients; a
   patched tiny model (``auto``: flex prefill, sdpa decode) on CUDA against the same model on
   the CPU (which the test suite checks against the dense reference), logits and greedy
   generation with the rolling cache; flex at several prefill lengths in a row (each compiled,
   none run eagerly: peak memory far below one dense score matrix).
2. Attention timings, bf16, batch 1, 32 heads x 128 (no GQA, so dense SDPA takes its flash kernel): dense causal SDPA (torch's
   flash kernel) vs the flex backend (and the sdpa band at 16k), forward and forward+backward,
   n = 16k and 32k, W = 512 and 4096; CUDA events, median of interleaved repeats; peak CUDA memory.
3. Dilation at n=16k, W=512 (flex, forward, 32 heads): d=1 vs d=4 vs per-head (8 heads each at 1/2/4/8).
4. Model prefill, SmolLM2-135M-shaped random Llama (30 layers), bf16, 8k/16k/32k tokens:
   unpatched (sdpa) vs patched W=1024 (``auto``, ``flex``, ``sdpa``, and ``flash``/``flash4`` where
   installed) vs transformers' Mistral ``sliding_window=1024``; a check that nothing compiles
   inside the timed runs (the 16k anomaly of the first H200 run).
Also: decode="full" (per-row boundaries) in every backend, and the flash-attn 2 /
FlashAttention-4 kernels against the reference with a bf16 tolerance shown to reject W-1 and W+1;
the LoRA recipe under the FSDP accelerate config vs a single-process run (``--steps fsdp``).

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR] [--quick] [--device cpu]

``--quick --device cpu`` is a dry run of every step at toy sizes.  Writes gpu_check.csv and
gpu_check.png; ``--plot-only results/gpu_check_h200.csv`` redraws a PNG from a CSV.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swa_patch import make_cache, patch_model, unpatch_model
from swa_patch.attention import LayerPlan, MaskInfo, run_plan
from swa_patch.compat import enable_activation_checkpointing
from swa_patch.backends import flash_available
from swa_patch.backends.layout import math_attention
from swa_patch.masks import LayerSpec, reference_mask

PER_HEAD_8 = (1, 1, 2, 2, 4, 4, 8, 8)
FAILURES: list[str] = []
ROWS: list[dict] = []


def report(name: str, ok: bool, detail: str = ""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def attend(backend, q, k, v, spec, padding, scale, full_from=None):
    return run_plan(LayerPlan(spec, backend), q, k, v, MaskInfo(0, padding, full_from=full_from), scaling=scale)


def reference(q, k, v, spec, padding, scale, full_from=None):
    mask = reference_mask(spec, q.shape[2], padding, device=q.device, full_from=full_from)
    mask = mask[:, None] if mask.dim() == 3 else mask
    return math_attention(q.float(), k.float(), v.float(), mask, scale).transpose(1, 2)


def check_attention(dev, quick):
    n, heads, kv_heads, dim = (300, 8, 2, 32) if quick else (1000, 8, 2, 64)
    padding = torch.ones(2, n, dtype=torch.bool, device=dev)
    padding[1, :37] = False
    specs = [LayerSpec(128, 1, 0), LayerSpec(128, 1, 4), LayerSpec(64, 4, 2), LayerSpec(64, PER_HEAD_8, 2),
             LayerSpec(128, 1, 4, decode_full=True)]
    full_from = torch.tensor([n // 2, n - 40], device=dev)          # decode="full": per-row boundaries
    backends = ["eager", "sdpa"] + ([] if dev == "cpu" and quick else ["flex"])
    for dtype, tol in [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)]:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(2, heads, n, dim, device=dev, generator=g).to(dtype)
        k = torch.randn(2, kv_heads, n, dim, device=dev, generator=g).to(dtype)
        v = torch.randn(2, kv_heads, n, dim, device=dev, generator=g).to(dtype)
        for spec in specs:
            boundary = full_from if spec.decode_full else None
            ref = reference(q, k, v, spec, padding, dim ** -0.5, boundary)
            for backend in backends:
                with torch.no_grad():
                    out = attend(backend, q, k, v, spec, padding, dim ** -0.5, boundary).float()
                err = (out - ref)[padding].abs().max().item()
                report(f"attention {backend} {str(dtype)[6:]} W={spec.window} d={spec.head_dilations or spec.dilation} "
                       f"sinks={spec.sinks}{' decode=full' if spec.decode_full else ''}", err <= tol,
                       f"max err {err:.2e} (tol {tol:.0e})")


def check_flash_kernels(dev, quick):
    """flash-attn 2 and FlashAttention-4 (when installed) against the reference in bf16, with a
    tolerance shown to reject the same call with W-1 and W+1 (unpadded: padded batches go to sdpa)."""
    kernels = [k for k in ("flash", "flash4") if dev == "cuda" and flash_available(k)]
    if not kernels:
        print("skip  flash kernels: neither flash-attn 2 nor FlashAttention-4 importable on this device")
        return
    n, dim, tol = 2000, 64, 2e-2
    g = torch.Generator(device=dev).manual_seed(3)
    q, k, v = (torch.randn(2, h, n, dim, device=dev, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
    for spec in (LayerSpec(256, 1, 0), LayerSpec(256, 1, 4), LayerSpec(255, 1, 4)):
        ref = reference(q, k, v, spec, None, dim ** -0.5)
        wrong = [reference(q, k, v, LayerSpec(spec.window + d, 1, spec.sinks), None, dim ** -0.5) for d in (-1, 1)]
        for kernel in kernels:
            with torch.no_grad():
                out = attend(kernel, q, k, v, spec, None, dim ** -0.5).float()
            err = (out - ref).abs().max().item()
            off = min((out - w).abs().max().item() for w in wrong)
            report(f"{kernel} bf16 W={spec.window} sinks={spec.sinks}", err <= tol < off,
                   f"max err {err:.2e} (tol {tol:.0e}; W-1/W+1 differ by >= {off:.2e})")


def check_backward(dev, quick):
    if dev == "cpu":
        print("skip  flex backward (CUDA only)")
        return
    n, dim = (512, 32) if quick else (2048, 64)
    for spec in [LayerSpec(256, 1, 4), LayerSpec(128, 4, 2), LayerSpec(128, PER_HEAD_8, 2)]:
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(1, h, n, dim, device=dev, generator=g).requires_grad_() for h in (8, 2, 2))
        out = attend("flex", q, k, v, spec, None, dim ** -0.5)
        ref = reference(q, k, v, spec, None, dim ** -0.5)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want = torch.autograd.grad(ref, (q, k, v), grad_out)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        report(f"flex backward W={spec.window} d={spec.head_dilations or spec.dilation} sinks={spec.sinks}",
               err <= 2e-3, f"max grad err {err:.2e}")


def check_lengths(dev, quick):
    """Several prefill lengths in a row (each compiled for its shape): every one
    against the reference, and the peak memory of a compiled call stays below one dense score
    matrix (an eager fallback would hold several)."""
    spec = LayerSpec(128, 1, 4)
    for n in ([2100, 2300] if quick else [1500, 2600, 3700, 4100]):
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(1, h, n, 64, device=dev, generator=g) for h in (8, 2, 2))
        with torch.no_grad():
            attend("flex", q, k, v, spec, None, 0.125)          # compiles (temporaries of its own)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            out = attend("flex", q, k, v, spec, None, 0.125)
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
        err = (out - reference(q, k, v, spec, None, 0.125)).abs().max().item()
        dense_mb = 8 * n * n * 4 / 2**20
        report(f"flex prefill n={n} (lengths compiled in turn)", err <= 2e-4 and not peak > dense_mb,
               f"max err {err:.2e}, peak {peak:.0f} MB (one dense fp32 score matrix: {dense_mb:.0f} MB)")


def check_model(dev, quick):
    from tests.models import tiny_model
    n = 300 if quick else 2500           # >= 2048 queries: auto runs flex for the prefill on CUDA
    options = dict(window=64, dilation=[[1, 1, 2, 4], [3, 3, 1, 1]], sinks=4)
    ids = torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    results = {}
    for device in ("cpu", dev):
        # the CPU side runs the sdpa band kernel, which the test suite checks against the reference
        model = patch_model(tiny_model("llama", head_dim=32).to(device), backend="sdpa" if device == "cpu"
                            else "auto", **options)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            gen = model.generate(ids[:1, :200].to(device), max_new_tokens=40, do_sample=False,
                                 cache=make_cache(model)).cpu()
        results[device] = (logits, gen)
        unpatch_model(model)
    err = (results["cpu"][0] - results[dev][0])[mask.bool()].abs().max().item()
    report(f"model logits {dev} vs cpu (per-head dilation, sinks, padding, n={n})", err <= 2e-3, f"max err {err:.2e}")
    report(f"greedy generation with the rolling cache {dev} vs cpu",
           torch.equal(results["cpu"][1], results[dev][1]))


def check_fsdp(dev, quick):
    """The LoRA recipe under accelerate's FSDP config (on the GPUs present) against the same run
    without FSDP: both learn, the sharded run saves one adapter that reloads patched, and their
    held-out losses agree.  (On CPU accelerate runs FSDP configs as DDP: the recipe refuses.)"""
    if dev != "cuda":
        print("skip  fsdp (accelerate applies FSDP to accelerator processes only)")
        return
    import json
    import subprocess
    import tempfile

    import swa_patch
    from tests.test_recipe import RECIPES, _text, _tiny_checkpoint
    work = Path(tempfile.mkdtemp())
    _tiny_checkpoint(work / "base")
    (work / "train.txt").write_text(_text())
    losses = {}
    for name, config in (("single", "gpu_1.yaml"), ("fsdp", "fsdp.yaml")):
        out = work / name
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "accelerate" / config),
               "--num_processes", str(max(1, torch.cuda.device_count()) if name == "fsdp" else 1),
               "--mixed_precision", "no", str(RECIPES / "finetune_lora.py"), "--config",
               str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(work / "base"), "--dataset",
               str(work / "train.txt"), "--eval-fraction", "0.1", "--no-gradient-checkpointing", "--output", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            report(f"recipe under {config}", False, done.stderr[-500:])
            return
        rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        losses[name] = evals[-1]
        reloaded = swa_patch.from_pretrained(out)
        report(f"recipe under {config}: loss falls, adapter reloads patched",
               evals[-1] < evals[0] and swa_patch.patch.patch_settings(reloaded.get_base_model()) is not None,
               f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
    gap = abs(losses["fsdp"] - losses["single"])
    report("fsdp vs single-process held-out loss", gap < 0.05, f"{losses['fsdp']:.4f} vs {losses['single']:.4f}")


# ---- timings ----------------------------------------------------------------------------------

def cuda_time(fn, repeats):
    """Median milliseconds of ``fn`` (CUDA events; wall clock on the CPU)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn):
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_calls(dev, n, window, dilation, grad, heads=32, kv_heads=32, dim=128, dtype=torch.bfloat16):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, heads, n, dim, device=dev, dtype=dtype, generator=g).requires_grad_(grad)
    k, v = (torch.randn(1, kv_heads, n, dim, device=dev, dtype=dtype, generator=g).requires_grad_(grad) for _ in "kv")
    spec = LayerSpec(window, dilation)
    shared = MaskInfo(0, None)      # the block mask built once and reused, as layers 2..L of a forward do

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)

    def ours(backend, info=None):
        """``info=None``: a fresh MaskInfo per call, so flex builds its block mask inside the timed call."""
        return lambda: run_plan(LayerPlan(spec, backend), q, k, v, info or MaskInfo(0, None), scaling=dim ** -0.5)

    calls = {"dense_sdpa": dense, "swa_flex": ours("flex"), "swa_flex_kernel": ours("flex", shared),
             "swa_sdpa": ours("sdpa")}
    calls.update({f"swa_{k}": ours(k) for k in ("flash", "flash4") if dev == "cuda" and flash_available(k)})
    if grad:
        return {name: (lambda f=f: f().sum().backward()) for name, f in calls.items()}
    return {name: (lambda f=f: torch.no_grad()(f)()) for name, f in calls.items()}


def time_attention(dev, quick, repeats):
    lengths = [1024, 2048] if quick else [16384, 32768]
    windows = [128] if quick else [512, 4096]
    for window in windows:
        for n in lengths:
            for mode in ("fwd",) if dev == "cpu" else ("fwd", "fwd+bwd"):   # flex: no CPU backward
                calls = attention_calls(dev, n, window, 1, mode == "fwd+bwd", **(
                    dict(heads=4, kv_heads=2, dim=32) if quick else {}))
                if n > lengths[0]:
                    del calls["swa_sdpa"]          # the band kernel is not auto's choice on CUDA
                for fn in calls.values():
                    fn()                                               # warm-up: compile, block mask
                times = {name: [] for name in calls}
                for _ in range(repeats):
                    for name, fn in calls.items():
                        times[name].append(cuda_time(fn, 1))
                base = statistics.median(times["dense_sdpa"])
                for name, fn in calls.items():
                    ms = statistics.median(times[name])
                    ROWS.append(dict(section="attention", mode=mode, method=name, n=n, window=window, dilation=1,
                                     dtype="bfloat16", ms=round(ms, 3), speedup_vs_dense=round(base / ms, 2),
                                     peak_mb=round(peak_mb(fn), 1)))
                    print(f"attention {mode:7s} n={n:6d} W={window:4d} {name:10s} {ms:9.2f} ms  "
                          f"{base / ms:6.2f}x dense  peak {ROWS[-1]['peak_mb']} MB", flush=True)
                del calls
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def time_dilation(dev, quick, repeats):
    n, window = (2048, 64) if quick else (16384, 512)
    shape = dict(heads=8, kv_heads=8, dim=32) if quick else {}
    heads = 8 if quick else 32
    per_head = tuple(sorted(PER_HEAD_8 * (heads // 8)))        # consecutive heads share a dilation
    settings = {"1": 1, "4": 4, f"per-head 1/2/4/8 x {heads // 4}": per_head}
    calls = {label: attention_calls(dev, n, window, d, False, **shape)["swa_flex_kernel"] for label, d in settings.items()}
    for fn in calls.values():
        fn()
    times = {label: [] for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            times[label].append(cuda_time(fn, 1))
    base = statistics.median(times["1"])
    for label in calls:
        ms = statistics.median(times[label])
        ROWS.append(dict(section="dilation", mode="fwd", method="swa_flex_kernel", n=n, window=window, dilation=label,
                         dtype="bfloat16", ms=round(ms, 3), speedup_vs_dense="", ratio_vs_d1=round(ms / base, 3)))
        print(f"dilation flex n={n} W={window} d={label}: {ms:.2f} ms, {ms / base:.2f}x d=1", flush=True)


def smollm2_shaped(dev, quick, dtype, family="llama", **extra):
    """A random model of SmolLM2-135M's shape (30 layers, 9 heads, 3 KV heads, vocab 49152)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=65536, tie_word_embeddings=True)
    if quick:
        shape.update(num_hidden_layers=2, vocab_size=1000)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape, **extra), attn_implementation="sdpa",
                                            dtype=dtype).to(dev).eval()


def time_model(dev, quick, repeats):
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    llama = smollm2_shaped(dev, quick, dtype)
    mistral = smollm2_shaped(dev, quick, dtype, "mistral", sliding_window=1024)
    mistral.load_state_dict(llama.state_dict())
    shape = llama.config
    for n in ([2048] if quick else [8192, 16384, 32768]):
        ids = torch.randint(0, shape.vocab_size, (1, n), device=dev)

        def prefill(model):
            with torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)

        def run(method):
            if method.startswith("swa_"):
                patch_model(llama, window=1024, backend=method[4:])
            try:
                return cuda_time(lambda: prefill(mistral if method == "hf_sliding_mask" else llama), 1)
            finally:
                unpatch_model(llama)

        methods = ["dense_sdpa", "hf_sliding_mask", "swa_auto", "swa_flex", "swa_sdpa"]
        methods += [f"swa_{k}" for k in ("flash", "flash4") if dev == "cuda" and flash_available(k)]
        for method in methods:
            t0 = time.time()
            run(method)                                                # warm-up (compiles excluded)
            print(f"model prefill n={n} {method}: warm-up {time.time() - t0:.1f} s", flush=True)
        import torch._dynamo.utils as dynamo_utils
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        times = {m: [] for m in methods}
        for _ in range(repeats):
            for method in methods:
                times[method].append(run(method))
        compiled = dynamo_utils.counters["stats"]["unique_graphs"] - graphs
        report(f"model prefill n={n}: no compile inside the timed runs", compiled == 0, f"{compiled} new graphs")
        base = statistics.median(times["dense_sdpa"])
        for method in methods:
            ms = statistics.median(times[method])
            ROWS.append(dict(section="model_prefill", mode="fwd", method=method, n=n, window=1024, dilation=1,
                             dtype=str(dtype)[6:], ms=round(ms, 2), speedup_vs_dense=round(base / ms, 2)))
            print(f"model prefill n={n} {method:16s} {ms:9.1f} ms  {base / ms:5.2f}x unpatched", flush=True)


def decode_ms(step, tok, steps: int, warmup: int = 3) -> float:
    """Milliseconds per decode step (wall clock over ``steps`` greedy steps after ``warmup``)."""
    with torch.no_grad():
        for _ in range(warmup):
            tok = step(tok)[:, -1:].argmax(-1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            tok = step(tok)[:, -1:].argmax(-1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def time_decode(dev, quick, repeats):
    """Decode at stream position 32k, batch 1 and 32, bf16, SmolLM2 shape: swa_patch (4 sinks +
    1020 window, ``make_cache(static=True)``) eager and compiled, and the unpatched model with
    transformers' StaticCache compiled.  Compiled = ``torch.compile(step, fullgraph=True,
    mode="reduce-overhead")`` (CUDA graphs), traced before the timed steps; the prompt is
    prefilled in chunks (not timed)."""
    from transformers import StaticCache
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = smollm2_shaped(dev, quick, dtype)
    n, steps, chunk = (600, 6, 256) if quick else (32768, 32, 8192)
    window, sinks = (60, 4) if quick else (1020, 4)
    mode = "reduce-overhead" if dev == "cuda" else "default"

    def prefill(cache, ids):
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                model(ids[:, start:start + chunk], cache=cache, logits_to_keep=1)

    def compiled(cache):
        return torch.compile(lambda t: model(t, cache=cache).logits, fullgraph=True, dynamic=False, mode=mode)

    for batch in ((1, 2) if quick else (1, 32)):
        ids = torch.randint(0, model.config.vocab_size, (batch, n), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(batch))
        tok = ids[:, -1:]
        ms = {}
        static = StaticCache(config=model.config, max_cache_len=n + 2 * (steps + 3) + 8)
        prefill(static, ids)
        ms["dense_static_compiled"] = decode_ms(compiled(static), tok, steps)
        del static
        patch_model(model, window=window, sinks=sinks)
        try:
            cache = make_cache(model, static=True)
            prefill(cache, ids)
            ms["swa_eager"] = decode_ms(lambda t: model(t, cache=cache).logits, tok, steps)
            ms["swa_compiled"] = decode_ms(compiled(cache), tok, steps)
        finally:
            unpatch_model(model)
        for method, value in ms.items():
            ROWS.append(dict(section="decode", mode=mode if "compiled" in method else "eager", method=method, n=n,
                             window=window + sinks, dilation=1, dtype=str(dtype)[6:], ms=round(value, 3),
                             speedup_vs_dense=round(ms["dense_static_compiled"] / value, 2), batch=batch,
                             tokens_per_s=round(batch * 1e3 / value, 1),
                             vs_swa_eager=round(ms["swa_eager"] / value, 2)))
            print(f"decode at {n} batch={batch:2d} {method:22s} {value:8.2f} ms/step  {batch * 1e3 / value:9.0f} tok/s  "
                  f"{ms['swa_eager'] / value:5.2f}x swa eager", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


def time_train(dev, quick, repeats):
    """One LoRA training step at 16k tokens as the recipe's GPU config runs it (fp32 weights,
    bf16 autocast, LoRA r=16 on attention + MLP, gradient checkpointing, AdamW): dense causal
    SDPA vs patched W=1024 (``auto``), step time and peak CUDA memory."""
    from peft import LoraConfig, get_peft_model
    n = 2048 if quick else 16384
    model = smollm2_shaped(dev, quick, torch.float32)
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev)
    base_model = model.get_base_model()

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms, peaks = {}, {}
    for method in ("dense_sdpa", "swa_auto"):
        if method == "swa_auto":
            patch_model(base_model, window=1024)
        step()                                                         # warm-up (compiles, optimizer state)
        ms[method] = cuda_time(step, repeats)
        peaks[method] = peak_mb(step)
    unpatch_model(base_model)
    for method in ms:
        ROWS.append(dict(section="train_step", mode="fwd+bwd+adamw", method=method, n=n, window=1024, dilation=1,
                         dtype="fp32+bf16 autocast", ms=round(ms[method], 2),
                         speedup_vs_dense=round(ms["dense_sdpa"] / ms[method], 2), peak_mb=round(peaks[method], 1)))
        print(f"LoRA train step n={n} {method:10s} {ms[method]:8.1f} ms  {ms['dense_sdpa'] / ms[method]:5.2f}x dense  "
              f"peak {peaks[method]:.0f} MB", flush=True)


def plot(csv_path: Path, png_path: Path):
    """Speed-up over dense causal SDPA per attention case, from the CSV."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["section"] == "attention" and r["method"] != "dense_sdpa"]
    cases = list(dict.fromkeys((r["mode"], r["window"], r["n"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        cell = {(r["mode"], r["window"], r["n"]): float(r["speedup_vs_dense"]) for r in rows if r["method"] == method}
        xs = [c + i * width for c, case in enumerate(cases) if case in cell]
        ax.bar(xs, [cell[case] for case in cases if case in cell], width, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([c + width * (len(methods) - 1) / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{m}\nW={w}\nn={int(n) // 1024}k" for m, w, n in cases], fontsize=8)
    ax.set_ylabel("speed-up vs dense causal SDPA")
    ax.set_title("attention, bf16, 32 heads x 128, batch 1 (GPU)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a dry run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--deadline", type=float, default=None, metavar="S",
                        help="skip the steps not yet begun once S seconds have passed (their figures: unmeasured)")
    parser.add_argument("--stack-every", type=float, default=None, metavar="S",
                        help="print every thread's Python stack each S seconds (where a stalled compile waits)")
    parser.add_argument("--plot-only", type=Path, metavar="CSV", help="draw the PNG beside a CSV and stop")
    parser.add_argument("--steps", nargs="+", default=["attention", "flash_kernels", "backward", "lengths", "model",
                                                       "fsdp", "time_attention", "time_dilation", "time_model",
                                                       "time_decode", "time_train"])
    args = parser.parse_args()
    if args.plot_only:
        plot(args.plot_only, args.plot_only.with_suffix(".png"))
        return 0
    if args.stack_every:
        import faulthandler
        faulthandler.dump_traceback_later(args.stack_every, repeat=True)
    dev = args.device
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(device_name, "torch", torch.__version__, flush=True)
    import transformers
    print("transformers", transformers.__version__, flush=True)
    steps = {"attention": check_attention, "backward": check_backward, "model": check_model,
             "lengths": check_lengths, "flash_kernels": check_flash_kernels, "fsdp": check_fsdp}
    started = time.time()
    for name in args.steps:
        t0 = time.time()
        if args.deadline is not None and t0 - started > args.deadline:
            print(f"-- {name}: skipped, past the {args.deadline:.0f} s deadline (unmeasured)", flush=True)
            continue
        try:
            if name in steps:
                steps[name](dev, args.quick)
            else:
                globals()[name](dev, args.quick, args.repeats)
        except Exception as err:          # keep going: one broken step must not hide the others
            report(f"step {name} raised", False, f"{type(err).__name__}: {err}")
        print(f"-- {name}: {time.time() - t0:.0f} s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        if ROWS:
            from swa_patch.provenance import run_info
            for row in ROWS:
                row.setdefault("device", device_name)
                row.update({k: v for k, v in run_info().items() if k not in row})
            with open(args.out / "gpu_check.csv", "w", newline="") as fh:
                fields = list(dict.fromkeys(key for row in ROWS for key in row))
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(ROWS)
            if any(row["section"] == "attention" for row in ROWS):
                plot(args.out / "gpu_check.csv", args.out / "gpu_check.png")
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
