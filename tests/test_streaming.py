"""Streaming perplexity evaluation: exactness of the chunked mode, dense = plain model,
bounded KV memory, CSV/PNG output, the ``swa-patch stream`` command, and (slow) the
attention-sink effect on the real SmolLM2."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from swa_patch import Plan
from swa_patch.cli import main
from swa_patch.streaming import (MODES, compare, format_table, parse_modes, plot,
                                 stream_perplexity, write_csv)

from models import tiny_model

N, W, S = 150, 12, 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 97, (N,))


def ppl_of(rows):
    return rows[-1].ppl


# layer 0: KV head 1 full; layer 1: KV head 0 at a wider window (what calibrate(length=...) writes)
PLAN = Plan(W, S, [(0, 1)], [[0.0, 1.0], [0.5, 0.0]], 0.3, method="test", wide_heads=[(1, 0, W + 5)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_equals_token_by_token(model, ids, mode, chunk):
    plan = {"plan": PLAN} if mode == "plan" else {}
    one = stream_perplexity(model, ids, mode, W, S, chunk=1, every=40, progress=False, **plan)
    many = stream_perplexity(model, ids, mode, W, S, chunk=chunk, every=40, progress=False, **plan)
    assert [r.tokens for r in one] == [r.tokens for r in many] == [40, 80, 120, 150]
    for a, b in zip(one, many):
        assert b.ppl == pytest.approx(a.ppl, rel=1e-4)
        assert b.kv_bytes == a.kv_bytes


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_chunked_equals_token_by_token_families(family, ids):
    m = tiny_model(family)
    for mode in ("window", "sinks"):
        one = stream_perplexity(m, ids[:60], mode, 8, 3, chunk=1, every=60, progress=False)
        many = stream_perplexity(m, ids[:60], mode, 8, 3, chunk=25, every=60, progress=False)
        assert ppl_of(many) == pytest.approx(ppl_of(one), rel=1e-4)


def test_dense_equals_plain_model(model, ids):
    rows = stream_perplexity(model, ids, "dense", W, S, chunk=33, every=50, progress=False)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    for r in rows:
        scored = min(r.tokens, N - 1)    # the logits of every fed token, against its next token
        expected = math.exp(F.cross_entropy(logits[:scored], ids[1:scored + 1]).item())
        assert r.ppl == pytest.approx(expected, rel=1e-5)


def test_window_modes_differ_from_dense_and_memory_is_bounded(model, ids):
    rows = {m: stream_perplexity(model, ids, m, W, S, chunk=16, every=30, progress=False)
            for m in ("dense", "window", "sinks")}
    # dense memory grows linearly; the bounded caches stop growing once the window is full
    dense_kv = [r.kv_bytes for r in rows["dense"]]
    assert dense_kv == sorted(dense_kv) and dense_kv[-1] == 5 * dense_kv[0]
    for m in ("window", "sinks"):
        kv = [r.kv_bytes for r in rows[m]]
        assert len(set(kv)) == 1 and kv[0] < dense_kv[0]
        assert ppl_of(rows[m]) != pytest.approx(ppl_of(rows["dense"]), rel=1e-6)
    # with no eviction yet (window covers the whole stream) every mode equals dense
    dense_short = ppl_of(stream_perplexity(model, ids[:W], "dense", W, S, chunk=5, every=W,
                                           progress=False))
    for m in ("window", "sinks", "recompute"):
        short = stream_perplexity(model, ids[:W], m, W, S, chunk=5, every=W, progress=False)
        assert ppl_of(short) == pytest.approx(dense_short, rel=1e-5)


def test_all_layers_windows_the_global_layers_of_a_hybrid_model(ids):
    """Gemma 3 keeps its global layers full under a single window (their keys pile up);
    ``all_layers`` windows them too, and its streamed perplexity is the chunk-independent one."""
    m = tiny_model("gemma3_text")              # layers: sliding, sliding, full
    own = [r.kv_bytes for r in stream_perplexity(m, ids, "sinks", 8, 3, chunk=16, every=30, progress=False)]
    every = stream_perplexity(m, ids, "sinks", 8, 3, chunk=16, every=30, progress=False, all_layers=True)
    assert own == sorted(own) and own[-1] > own[0]
    assert len({r.kv_bytes for r in every}) == 1 and every[0].kv_bytes < own[0]
    one = stream_perplexity(m, ids, "sinks", 8, 3, chunk=1, every=30, progress=False, all_layers=True)
    assert ppl_of(every) == pytest.approx(ppl_of(one), rel=1e-4)


def test_plan_mode_streams_the_plan(model, ids, tmp_path):
    """mode='plan' is the model patched with the plan's per-head windows, fed token by token through
    its cache (an independent loop); only the full head's keys grow; a saved plan's path runs alike."""
    from swa_patch import make_cache, patch_model, unpatch_model
    rows = stream_perplexity(model, ids, "plan", W, S, chunk=16, every=50, plan=PLAN, progress=False)
    patch_model(model, **PLAN.patch_options())
    try:
        cache = make_cache(model)
        with torch.no_grad():
            logits = torch.cat([model(ids[None, i:i + 1], cache=cache, use_cache=True).logits[0] for i in range(N)])
    finally:
        unpatch_model(model)
    nll = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    assert [r.ppl for r in rows] == pytest.approx([math.exp(nll[:min(t, N - 1)].mean().item()) for t in (50, 100, 150)],
                                                  rel=1e-4)
    sinks = stream_perplexity(model, ids, "sinks", W, S, chunk=16, every=50, progress=False)
    grow = [b.kv_bytes - a.kv_bytes for a, b in zip(rows, rows[1:])]
    assert grow[0] == grow[1] > 0 and len({r.kv_bytes for r in sinks}) == 1     # one head's 50 keys per step
    assert ppl_of(rows) != pytest.approx(ppl_of(sinks), rel=1e-6)
    PLAN.save(tmp_path / "plan.json")
    by_path = stream_perplexity(model, ids, "plan", W, S, chunk=16, every=50, plan=str(tmp_path / "plan.json"),
                                progress=False)
    assert [r.ppl for r in by_path] == [r.ppl for r in rows]
    with pytest.raises(ValueError, match="mode='plan' needs plan="):
        stream_perplexity(model, ids, "plan", W, S, progress=False)
    with pytest.raises(ValueError, match="plan= needs mode='plan'"):
        stream_perplexity(model, ids, "sinks", W, S, plan=PLAN, progress=False)


def test_model_left_unpatched(model, ids):
    before = model.config._attn_implementation
    stream_perplexity(model, ids[:30], "sinks", 8, 2, chunk=4, every=30, progress=False)
    assert model.config._attn_implementation == before
    assert not hasattr(model, "_swa_patch_state")


def test_csv_and_png_written(model, ids, tmp_path):
    rows = compare(model, ids, "dense,window,sinks,plan,recompute", W, S, chunk=16, every=50,
                   max_tokens={"recompute": 100}, progress=False, plan=PLAN)
    assert [r.tokens for r in rows if r.mode == "recompute"] == [50, 100]
    write_csv(rows, tmp_path / "s.csv")
    plot(rows, tmp_path / "s.png")
    with open(tmp_path / "s.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    assert {g["mode"] for g in got} == set(MODES)
    assert float(got[0]["ppl"]) == pytest.approx(rows[0].ppl, rel=1e-5)
    assert got[0]["torch"] == torch.__version__ and got[0]["command"] and got[0]["commit"]   # provenance
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(rows)
    assert "recompute ppl" in table and len(table.splitlines()) == 2 + 3 + 1


@pytest.mark.parametrize("bad, match", [
    (dict(mode="sliding"), "mode"), (dict(window=0), "window"), (dict(sinks=-1), "sinks"),
    (dict(chunk=0), "chunk"), (dict(every=0), "every"), (dict(mode="sinks", sinks=0), "sinks"),
])
def test_bad_arguments(model, ids, bad, match):
    kwargs = {**dict(mode="window", window=W, sinks=S, chunk=4, every=10, progress=False), **bad}
    with pytest.raises(ValueError, match=match):
        stream_perplexity(model, ids, **kwargs)


def test_bad_modes_and_input(model):
    with pytest.raises(ValueError, match="compare"):
        parse_modes("dense,sliding")
    with pytest.raises(ValueError, match="input_ids"):
        stream_perplexity(model, torch.ones(2, 5, dtype=torch.long), "dense", W, progress=False)


# ---- the command on a tiny local model -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random llama and a character-level tokenizer saved like any local checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    chars = [chr(c) for c in range(32, 126)]                       # 94 + 3 specials = 97
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    (folder / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return folder


def test_cli_runs_on_local_model(tiny_folder, tmp_path, capsys):
    png = tmp_path / "out.png"
    rc = main(["stream", "--model", str(tiny_folder), "--text", str(tiny_folder / "book.txt"),
               "--window", "16", "--sinks", "2", "--compare", "dense,window,sinks,recompute",
               "--tokens", "120", "--chunk", "32", "--every", "40", "--max-tokens", "recompute=80",
               "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "streaming 120 tokens" in out and "sinks ppl" in out
    assert png.is_file() and (tmp_path / "out.csv").is_file()
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["tokens"]) for r in rows] == [
        (m, t) for m in ("dense", "window", "sinks") for t in ("40", "80", "120")] + [
        ("recompute", "40"), ("recompute", "80")]


@pytest.mark.parametrize("argv, match", [
    (["--compare", "dense,foo"], "compare"),
    (["--max-tokens", "recompute"], "max-tokens"),
    (["--tokens", "100000"], "tokens"),
    (["--text", "/nonexistent/book.txt"], "text"),
    (["--compare", "dense,plan"], "needs --plan PATH"),
])
def test_cli_bad_arguments(tiny_folder, argv, match):
    base = ["stream", "--model", str(tiny_folder), "--text", str(tiny_folder / "book.txt"),
            "--no-progress", "--plot", ""]
    argv = base + argv if "--text" not in argv else base[:3] + argv + base[5:]
    with pytest.raises(ValueError, match=match):
        main(argv)


def test_cli_parses_defaults():
    from swa_patch.cli import build_parser
    args = build_parser().parse_args(["stream"])
    assert (args.model, args.window, args.sinks, args.compare) == ("smollm2-135m", 1020, 4,
                                                                   "dense,window,sinks")


# ---- the real model ------------------------------------------------------------------------
@pytest.mark.slow
def test_sinks_beat_window_on_smollm2():
    """On real text a 4 + 252 cache stays near the dense perplexity while 256 recent tokens
    without sinks do not (measured at 1536 tokens: dense ~11.6, sinks ~13.0, window ~20.9)."""
    from swa_patch.models import load_model, load_text

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    ids = tok(load_text(), return_tensors="pt").input_ids[0, :1536]
    rows = compare(model, ids, "dense,window,sinks", window=252, sinks=4, chunk=256, every=1536,
                   progress=False)
    ppl = {r.mode: r.ppl for r in rows}
    assert ppl["window"] > 1.3 * ppl["sinks"]
    assert ppl["sinks"] < 1.25 * ppl["dense"]


# ---- examples/: endless generation and multi-turn chat keep the KV memory flat --------------
def _example(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_endless_generation_memory_is_flat(tiny_folder):
    from swa_patch.models import load_model
    model, tok = load_model(str(tiny_folder))
    reports = list(_example("endless_generation").endless(model, tok, "The fox", 240, window=16,
                                                          sinks=2, report=60, out=None))
    assert [made for made, _ in reports] == [60, 120, 180, 240]
    assert len({kv for _, kv in reports}) == 1 and reports[0][1] > 0


def test_streaming_chat_carries_cache_across_generate(tiny_folder):
    from swa_patch.models import load_model
    model, tok = load_model(str(tiny_folder))
    chat = _example("streaming_chat").StreamingChat(model, tok, window=24, sinks=2, max_new_tokens=20,
                                                     do_sample=False)
    sizes, lengths = [], []
    for message in ["hello there", "tell me more", "and again", "last one"]:
        before = chat.ids.shape[1]
        chat.turn(message)
        sizes.append(chat.kv_bytes)
        lengths.append(chat.ids.shape[1])
        # generate() fed only what the cache had not seen: never a token twice
        assert before < chat.cache.get_seq_length() <= lengths[-1]
    assert lengths == sorted(lengths) and lengths[-1] > 4 * 24
    assert len(set(sizes)) == 1                              # bounded, long past the window
    with pytest.raises(ValueError, match="message"):
        chat.turn("  ")


def test_cli_generate_keeps_the_cache_bounded(tiny_folder, capsys):
    sizes = []
    for new in (40, 120):
        rc = main(["generate", "The quick brown", "--model", str(tiny_folder), "--window", "8", "--sinks", "2",
                   "--max-new-tokens", str(new)])
        captured = capsys.readouterr()
        assert rc == 0 and captured.out.replace(" ", "").startswith("Thequickbrown")
        tokens, nbytes = int(captured.err.split(" after ")[1].split()[0]), int(captured.err.split("cache: ")[1].split()[0])
        assert tokens == len("The quick brown") + new - 1       # the last new token is never fed back
        sizes.append(nbytes)
    layers, kv_heads, head_dim = 2, 2, 16
    assert sizes[0] == sizes[1] >= layers * 2 * kv_heads * (8 + 2) * head_dim * 4   # sinks + window, constant


def test_cli_bench_names_its_scripts():
    from swa_patch.commands import BENCHMARKS
    import pathlib
    folder = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    assert all((folder / script).is_file() for script in BENCHMARKS.values())
