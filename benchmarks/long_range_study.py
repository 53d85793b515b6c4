"""The SWAA study (arXiv 2512.10411) reproduced on SmolLM2-135M-Instruct or Gemma-3-270M.

    PYTHONPATH=. python benchmarks/long_range_study.py --part probes           # SmolLM2 quality, ~2 h on 2 cores
    PYTHONPATH=. python benchmarks/long_range_study.py --part timing           # SmolLM2 prefills, ~1 h
    PYTHONPATH=. python benchmarks/long_range_study.py --model gemma3-270m     # Gemma, both parts
    PYTHONPATH=. python benchmarks/long_range_study.py --quick [--model ...]   # a dry run, 10-20 min

Two parts, each its own command and CSV (so each fits a session of this project's 2-core
machine, and the timing part can run alone while the probes need nothing quiet):
``--part timing`` writes ``<out>_prefill.csv`` (step 1), ``--part probes`` ``<out>.csv`` (steps
2-4); ``benchmarks/report.py`` joins them by configuration.  ``--part all`` (the default) runs
both.  The run prints its own estimate first (from the grid and per-token rates measured on this
project's 2-core machine; expect +-50 %).  ``--quick`` runs every step on a tiny grid (11 min for
SmolLM2, 22 min for Gemma with one LoRA row, at ``--threads 1`` on a busy machine).  Gemma's
unpatched model, the ``dense`` row, already windows 15 of its 18 layers at 512.

1. Times a ``--prefill-tokens`` prefill (16k) of every attention configuration through the cache
   generate() would use (backend 'auto', as users run it), the unpatched model included: one
   fresh process per configuration loads the model, makes one untimed warm-up call of the same
   shape (it may compile flex kernels; its seconds are reported as ``prefill_warmup_s``), then
   ``--prefill-rounds`` timed calls: the CSV has their median and min-max.  Every configuration
   gets the same warm-up.  The rounds of one configuration run back to back in its process, not
   interleaved with the other configurations': interleaving would need every configuration's
   process alive at once (a model each: ~1 GB for Gemma) or a fresh warm-up per round (twice
   the time); the min-max spread shows how much the machine moved.  Speed-ups are medians
   against the unpatched model's median.
2. Splits ``pydoc_data.topics`` by topic into training text and held-out text.
3. Trains the LoRA adapters the rows ask for (``@ce``, ``@distill``, ``@lr``) in this run, at this commit,
   on the windowed model (``--train-config``) with ``recipes/finetune_lora.py`` through
   ``accelerate launch``, on the same steps, data and seed: plain cross-entropy, and
   self-distillation (``--distill``: teacher = the same weights, adapter off, window off).
   Gemma's default rows have no adapter (two adapters and their rows add ~2 h); ask for them with
   ``--rows ...,native+sinks@ce --train-config native+sinks`` (the recipe's ``--window`` keeps
   Gemma's global layers full, so its training configuration must say ``native``).
   ``--train-as-row`` trains each row's own configuration instead (its sinks, calibrated plan and
   decode: the recipe's ``--plan``/``--decode``), one adapter per (kind, row); ``@lr`` (issue 30)
   trains on long-range tasks built from the training text (``--lr-tasks`` at ``--lr-distances``,
   answers only, mixed ``--lr-mix`` with running text), and ``@ce`` on the same row at the same
   steps and sequence length is its running-text control, e.g.
   ``--train-as-row --seq-len 2176 --rows sinks@ce,sinks@lr,heads:0.25+sinks@ce,heads:0.25+sinks@lr``
   (with ``--calibrate-length 16384``, ``heads:0.25`` is a quarter of the full-attention KV at 16k).
4. For every row (``--rows``: a configuration of ``swa_patch.retrieval.config_options``, e.g.
   ``sinks:16+decode-full``; ``window`` windows every layer, ``native`` keeps the model's own
   global layers full), plus the keep-first-k sweep (``--sink-sweep``: ``sinks:k+decode-full``
   and ``sinks:k+full-layers:4`` for each k; a row equal to an earlier one is measured once),
   on the held-out text:

   * copy-probe recall at D = W/2 ... 8W, the first copy after ``--lead`` tokens (default 32 +
     the most sinks of any row: with 32, the 64 and 128 sinks of the sweep held the first copy
     itself, and recall read 1.05 at 8W with 128 sinks and 4 full layers; ``--trials`` trials per distance, paired
     percentile-bootstrap 95 % intervals), effective reach (the largest D before the first with
     recall < 0.5; ``>=8W`` when none is) beside the receptive field.  decode="full" rows: the repeat is the answer
     (the copy probe has no question, so it has the prompt-end boundary only).  Gemma's
     decode rows open its 3 global layers only (``decode-global``): its local layers were
     trained with their 512-token window, and opening them too costs more than it recalls;
   * passkey accuracy per haystack length over ``--depths`` (10 by default, ``--passkey-tries``
     each), bootstrap 95 % intervals; decode="full" rows twice: the boundary at the question,
     and at the prompt end (``passkey_N_prompt_end``);
   * windowed held-out perplexity;
   * with ``--ruler-lengths``, lm-eval's RULER tasks (``--ruler-tasks``, ``--ruler-limit`` samples per
     length) through the row's own ``generate()`` (``swa_patch.ruler``), Wilson 95 % intervals.

   Rows may keep calibrated KV heads full: ``heads:SHARE`` (retrieval scores), ``heads-nll:SHARE`` (the
   copy NLL each head wins back), ``layers-nll:SHARE`` (whole layers by NLL) and ``decode-heads:SHARE`` (the
   ``heads:SHARE`` plan's heads decode fully instead: prefill windowed everywhere), e.g. ``heads:0.1+sinks``;
   each is calibrated once per run with ``swa_patch.calibrate`` on the *training* split (the probes read
   the held-out split; RULER generates its own data), its plan saved in ``--work``, and its minutes
   written in ``calibrate_minutes``.

Writes ``benchmarks/results/long_range_study.csv`` (Gemma: ``long_range_study_gemma3.csv``; one
row per configuration, with the command, commit, machine, versions and settings),
``..._probes.csv`` (every copy distance and passkey trial), ``....png`` and
``..._prefill.csv`` (one row per configuration timed).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, provenance  # noqa: E402

ADAPTERS = ("ce", "distill", "lr")   # running-text CE, self-distillation, long-range tasks + running text
PROMPT_END = " [prompt end]"      # passkey of decode-full rows with the boundary at the prompt end
DEPTHS = "0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95"
SMOLLM2_ROWS = ("dense,window,sinks,sinks+full-layers:4,sinks+decode-full,sinks@ce,sinks@distill,"
                "sinks+decode-full+full-layers:4,sinks+decode-full+full-layers:4@distill")
# Per model: defaults and facts.  ``rate``: seconds per 1k tokens of one forward on this project's
# 2-core machine, 2 threads (probes; 16k prefill unpatched and windowed), and minutes per LoRA
# step of 1k tokens, and seconds to load the model: only for the estimate printed at the start.  SmolLM2's prefill and step
# rates are the 2026-11-28 run's; the probe rates and Gemma's are 1-thread timings of 2k-4k
# forwards scaled to 2 threads, so the estimate is rough (+-50 %).
MODELS = {
    "smollm2-135m": dict(title="SmolLM2-135M-Instruct", out="long_range_study", window=256, layers=30,
                         native_full=False, global_layers=(), decode="decode-full",
                         passkey="1024,2048,4096", rows=SMOLLM2_ROWS, train_config="sinks",
                         rate=dict(probe=1.1, dense=6.5, window=2.8, step=0.37, load=10)),
    "gemma3-270m": dict(title="Gemma-3-270M", out="long_range_study_gemma3", window=512, layers=18,
                        native_full=True, global_layers=(5, 11, 17), decode="decode-global",
                        passkey="2048,4096,8192", train_config="native+sinks",
                        rows="dense,native,window,sinks,sinks+full-layers:4,sinks+decode-global,"
                             "sinks+decode-global+full-layers:4",
                        rate=dict(probe=1.2, dense=8.0, window=3.0, step=0.6, load=45)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    p.add_argument("--window", type=int, default=None, help="default: 256 (SmolLM2), 512 (Gemma)")
    p.add_argument("--sinks", type=int, default=4, help="sinks of rows that say 'sinks' without ':N'")
    p.add_argument("--rows", default=None, help="comma-separated CONFIG[@ce|@distill|@lr] (default: per model)")
    p.add_argument("--sink-sweep", default=None,
                   help="keep-first-k sweep: rows sinks:k+decode-full and sinks:k+full-layers:4 for these k "
                        "(default 4,16,64,128; --quick 4,16; '' for none)")
    p.add_argument("--part", choices=("all", "timing", "probes"), default="all",
                   help="timing: the prefills only (<out>_prefill.csv); probes: adapters, probes and perplexity "
                        "(<out>.csv); all: both, timing first")
    p.add_argument("--distances", default=None,
                   help="copy distances (default W/2, W, 2W, 4W, 8W: the target is at 8W; a reach that passes "
                        "them all is written >=8W)")
    p.add_argument("--span", type=int, default=64)
    p.add_argument("--lead", type=int, default=None,
                   help="tokens before the first copy (default 32 + the most sinks of any row, so that no row keeps "
                        "the first copy as sinks; one lead for every row, which the recall's pairing needs)")
    p.add_argument("--trials", type=int, default=10, help="copy trials per distance")
    p.add_argument("--passkey-lengths", default=None, help="default: 1024,2048,4096 (SmolLM2), 2048,4096,8192 (Gemma)")
    p.add_argument("--depths", default=DEPTHS, help="needle depths per passkey length")
    p.add_argument("--passkey-tries", type=int, default=1, help="tries per (length, depth), each a new key")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap redraws per interval")
    p.add_argument("--ruler-lengths", default="", help="RULER (lm-eval) prompt lengths per row, e.g. 1024,2048,4096 "
                   "('' = no RULER)")
    p.add_argument("--ruler-tasks", default="niah_single_1", help="offline RULER tasks (swa_patch.ruler.OFFLINE_TASKS)")
    p.add_argument("--ruler-limit", type=int, default=30, help="RULER samples per task and length")
    p.add_argument("--calibrate-trials", type=int, default=8,
                   help="segments per calibration (rows heads:SHARE, heads-nll:SHARE, layers-nll:SHARE)")
    p.add_argument("--calibrate-length", type=int, default=None,
                   help="make SHARE a share of the full-attention KV at this many tokens (windows and sinks "
                        "count; what is left widens one more head: calibrate(length=)) instead of a share of KV heads")
    p.add_argument("--prefill-tokens", type=int, default=16384)
    p.add_argument("--prefill-rounds", type=int, default=5, help="timed prefills per configuration, after one warm-up")
    p.add_argument("--ppl-blocks", type=int, default=8, help="held-out blocks of --seq-len for perplexity")
    p.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps (both runs)")
    p.add_argument("--seq-len", type=int, default=1024, help="LoRA training sequence length")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-config", default=None,
                   help="the configuration LoRA trains on: window, native, sinks[:N] parts only "
                        "(default: sinks; Gemma: native+sinks)")
    p.add_argument("--train-as-row", action="store_true",
                   help="every adapter trains its own row's configuration (window, sinks, calibrated plan, "
                        "decode) instead of --train-config; needed by @lr")
    p.add_argument("--lr-tasks", default="copy,passkey,multikey,variable",
                   help="@lr adapters: long-range tasks (recipes/long_range_data.py)")
    p.add_argument("--lr-distances", default=None, help="@lr: fact-to-answer distances (default 2W,4W,8W that fit "
                   "--seq-len)")
    p.add_argument("--lr-mix", type=float, default=0.5, help="@lr: share of running-text examples")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch folder (default /tmp/swa_<out stem>)")
    p.add_argument("--out", default=None, help="path stem of the outputs (default benchmarks/results/<per model>)")
    p.add_argument("--probe-backend", default="sdpa",
                   help="backend of the probes (results are backend-independent; sdpa compiles nothing)")
    p.add_argument("--time-config", default=None, help=argparse.SUPPRESS)   # child: time one configuration
    p.add_argument("--quick", action="store_true",
                   help="a dry run: 2 trials, 2 depths, sweep 4,16, 2 LoRA steps, 2k prefill x 2 rounds")
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    args.window = args.window or spec["window"]
    args.rows = args.rows or spec["rows"]
    args.passkey_lengths = args.passkey_lengths if args.passkey_lengths is not None else spec["passkey"]
    args.train_config = args.train_config or spec["train_config"]
    args.work = args.work or os.path.join("/tmp", "swa_" + spec["out"])
    if args.quick:
        args.distances = args.distances or f"{args.window // 2},{2 * args.window}"
        args.trials, args.passkey_tries, args.steps, args.ppl_blocks = 2, 1, 2, 2
        args.seq_len = 2 * args.window + 128 if args.train_as_row else 256     # @lr: room for a fact 2W back
        args.depths, args.resamples = "0.25,0.75", 200
        args.sink_sweep = "4,16" if args.sink_sweep is None else args.sink_sweep
        args.passkey_lengths, args.prefill_tokens, args.prefill_rounds = str(2 * args.window), 2048, 2
        args.out = args.out or os.path.join(args.work, spec["out"] + "_quick")
    args.out = args.out or os.path.join(RESULTS, spec["out"])
    args.sink_sweep = "4,16,64,128" if args.sink_sweep is None else args.sink_sweep
    for name in ("trials", "passkey_tries", "prefill_rounds", "resamples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


CALIBRATED = {"heads": ("retrieval", "head"), "heads-nll": ("nll", "head"), "layers-nll": ("nll", "layer"),
              "decode-heads": ("retrieval", "head")}     # the retrieval plan's heads decode fully instead


def options_of(args, config: str) -> dict | None:
    """``patch_model`` options of a configuration name on ``--model`` (see ``config_options``); a
    part ``heads:SHARE`` (``heads-nll:SHARE``, ``layers-nll:SHARE``) stands for the plan
    :func:`calibrate_plans` chose for that share of KV heads (``plan:PATH``)."""
    from swa_patch.retrieval import config_options

    spec = MODELS[args.model]
    parts = [(f"plan-decode:{plan_path(args, 'heads:' + p.partition(':')[2])}" if p.startswith("decode-heads:") else
              f"plan:{plan_path(args, p)}" if p.split(":")[0] in CALIBRATED else p) for p in config.split("+")]
    return config_options("+".join(parts), args.window, args.sinks, spec["layers"], spec["global_layers"])


def calibration_of(part: str) -> str | None:
    """The calibration a row part needs (``decode-heads:S`` uses the plan of ``heads:S``), or None."""
    kind, _, share = part.partition(":")
    if kind not in CALIBRATED:
        return None
    return f"heads:{share}" if kind == "decode-heads" else part


def plan_path(args, part: str) -> str:
    kind, _, share = part.partition(":")
    length = f"_n{args.calibrate_length}" if args.calibrate_length else ""
    return os.path.join(args.work, f"plan_{kind}_{share}{length}_w{args.window}_s{args.sinks}.json")


def calibrate_plans(args, parsed) -> dict[str, float]:
    """Calibrate every ``heads:SHARE``-style part of the rows on the *training* split (the probes
    read the held-out split; RULER makes its own data): one plan file per part, minutes per part."""
    from swa_patch import calibrate
    from swa_patch.models import load_model

    parts = sorted({calibration_of(p) for _, config, _ in parsed for p in config.split("+")} - {None})
    if not parts:
        return {}
    train, _ = split_text(args.work, args.heldout_fraction)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(open(train).read(), return_tensors="pt").input_ids[0]
    minutes = {}
    for part in parts:
        kind, _, share = part.partition(":")
        method, unit = CALIBRATED[kind]
        start = time.perf_counter()
        plan = calibrate(model, ids, args.window, args.sinks, float(share), method=method, unit=unit,
                         trials=args.calibrate_trials, length=args.calibrate_length,
                         source=f"{train} (the study's training split)")
        plan.save(plan_path(args, part))
        minutes[part] = (time.perf_counter() - start) / 60
        print(f"calibrated {part} in {minutes[part]:.1f} min: {plan}", flush=True)
    return minutes


def expand_rows(args) -> list[tuple[str, str, str]]:
    """``(label, configuration, adapter)`` for ``--rows`` then the ``--sink-sweep`` rows
    (``sinks:k+decode-full``, Gemma ``sinks:k+decode-global``, and ``sinks:k+full-layers:4``); a
    row whose patch options and adapter equal an earlier row's is dropped (``sinks:4+decode-full``
    is ``sinks+decode-full`` at ``--sinks 4``)."""
    decode = MODELS[args.model]["decode"]
    labels = [r.strip() for r in args.rows.split(",") if r.strip()]
    for k in (int(x) for x in args.sink_sweep.split(",") if x.strip()):
        labels += [f"sinks:{k}+{decode}", f"sinks:{k}+full-layers:4"]
    out, seen = [], {}
    for label in labels:
        config, _, adapter = label.partition("@")
        if adapter not in ("", *ADAPTERS):
            raise SystemExit(f"--rows: adapter must be @ce, @distill or @lr, got {label!r}")
        if adapter == "lr" and not args.train_as_row:
            raise SystemExit(f"--rows {label!r}: @lr trains the row's own configuration: add --train-as-row")
        key = (json.dumps(options_of(args, config), sort_keys=True), adapter)
        if key in seen:
            print(f"row {label} is row {seen[key]}: measured once", flush=True)
            continue
        seen[key] = label
        out.append((label, config, adapter))
    return out


def estimate_minutes(args, parsed, distances, lengths, depths) -> dict[str, float]:
    """Minutes per phase from :data:`MODELS`' rates (linear in tokens; the unpatched model's
    quadratic attention is folded into its 16k rate), scaled for ``--threads``."""
    rate = MODELS[args.model]["rate"]
    scale = (2 / args.threads) ** 0.8                  # 2 cores: a second thread gives ~1.7x
    configs = list(dict.fromkeys(["dense", *(c for _, c, _ in parsed)]))
    per_call = args.prefill_tokens / 1000 * rate["window"]
    prefill = sum((args.prefill_rounds + 1) * (args.prefill_tokens / 1000 * rate["dense"] if c == "dense" else per_call)
                  + rate["load"] for c in configs)
    copy = len(parsed) * args.trials * 2 * sum(d + (args.lead or 32) + 2 * args.span for d in distances) / 1000 * rate["probe"]
    full = sum("decode-" in c for _, c, _ in parsed)
    keys = (len(parsed) + full) * len(depths) * args.passkey_tries * sum(n / 1000 * rate["probe"] + 1 for n in lengths)
    adapters = {adapter_key(args, a, c) for _, c, a in parsed if a}
    other = len(parsed) * args.ppl_blocks * args.seq_len / 1000 * rate["probe"] + (1 + len(adapters)) * rate["load"]
    train = len(adapters) * (args.steps * args.seq_len / 1024 * rate["step"] * 60 + rate["load"])
    timing, probes = args.part in ("all", "timing"), args.part in ("all", "probes")
    return {k: v * scale / 60 for k, v, run in (("prefill", prefill, timing), ("train", train, probes),
                                                ("copy", copy, probes), ("passkey", keys, probes),
                                                ("ppl and loads", other, probes)) if run}


def split_text(work: str, heldout_fraction: float) -> tuple[str, str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * (1 - heldout_fraction))
    os.makedirs(work, exist_ok=True)
    paths = os.path.join(work, "train.txt"), os.path.join(work, "heldout.txt")
    for path, part in zip(paths, (keys[:cut], keys[cut:])):
        with open(path, "w") as f:
            f.write("\n\n".join(topics[k] for k in part))
    return paths


def train_options(args) -> dict:
    """The recipe's ``--window``/``--sinks`` for ``--train-config``: the recipe patches with
    ``window=W`` (the model's own global layers stay full), so only window, native and sinks
    parts can be honoured, and a model with global layers must say ``native``."""
    parts = set(args.train_config.split("+"))
    if any(p not in ("window", "native", "sinks") and not p.startswith("sinks:") for p in parts):
        raise SystemExit(f"--train-config {args.train_config!r}: the recipe trains window, native and sinks[:N] "
                         "configurations only")
    if MODELS[args.model]["native_full"] and "native" not in parts:
        raise SystemExit(f"--train-config {args.train_config!r}: the recipe keeps {args.model}'s global layers "
                         "full, so the training configuration must include 'native' (e.g. native+sinks)")
    return options_of(args, args.train_config)


def adapter_key(args, adapter: str, config: str) -> tuple[str, str] | None:
    """Which adapter a row runs: (kind, the configuration it trains), or None."""
    return (adapter, config if args.train_as_row else args.train_config) if adapter else None


def recipe_window_flags(args, config: str) -> list[str]:
    """The recipe's --window/--sinks/--plan/--decode for a row's configuration (``--train-as-row``)."""
    options = options_of(args, config) or {}
    if not options:
        raise SystemExit(f"--rows: {config!r} is the unpatched model: nothing windowed to train")
    if "full_layers" in options or "native" in config.split("+"):
        raise SystemExit(f"--train-as-row: the recipe cannot express {config!r} (full-layers / native parts)")
    flags = ["--window", str(args.window), "--sinks", str(options["sinks"])]
    plans = {calibration_of(p) for p in config.split("+")} - {None}
    if plans:
        flags += ["--plan", plan_path(args, plans.pop())]
    decode = options.get("decode", "window")
    if decode == "full":
        flags += ["--decode", "full"]
    elif isinstance(decode, list):          # decode-heads:S: the plan's heads decode fully
        flags += ["--decode", "plan"]
    return flags


def lr_distances(args) -> list[int]:
    if args.lr_distances:
        return [int(d) for d in args.lr_distances.split(",")]
    fit = [k * args.window for k in (2, 4, 8) if k * args.window <= args.seq_len - 64]
    if not fit:
        raise SystemExit(f"--seq-len {args.seq_len} leaves no room for an @lr distance of 2W = {2 * args.window}")
    return fit


def train_adapter(args, key: tuple[str, str], train: str, held: str) -> tuple[str, float]:
    """One LoRA run of the recipe; every run shares steps, data, seed and sequence length.  ``key``:
    (kind, configuration trained).  ``ce``: running text; ``distill``: self-distillation; ``lr``:
    long-range tasks from the training text mixed with it.  With ``--train-as-row`` a decode-full
    configuration's running-text control trains its (windowed) prefill: running text has no prompt."""
    from swa_patch.models import ALIASES

    kind, config = key
    folder, gguf = ALIASES[args.model]()
    if args.train_as_row:
        window = recipe_window_flags(args, config)
        if kind != "lr" and "--decode" in window:
            window = window[:window.index("--decode")]
    else:
        window = ["--window", str(args.window), "--sinks", str(train_options(args)["sinks"])]
    out = os.path.join(args.work, f"lora_{kind}" + (f"_{config.replace(':', '-').replace('+', '_')}"
                                                    if args.train_as_row else ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", "cpu_1proc.yaml"), os.path.join(ROOT, "recipes", "finetune_lora.py"),
           "--model", str(folder), "--gguf-file", gguf, "--dataset", train, "--eval-dataset", held, *window,
           "--seq-len", str(args.seq_len),
           "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 10)),
           "--eval-batches", str(args.ppl_blocks), "--eval-every", "0", "--save-every", "0",
           "--train-embeddings-norms", "--no-gradient-checkpointing", "--seed", "0", "--output", out]
    if kind == "distill":
        cmd += ["--distill", "--distill-alpha", str(args.distill_alpha), "--temperature", str(args.temperature)]
    if kind == "lr":
        cmd += ["--long-range-tasks", args.lr_tasks, "--long-range-distances", ",".join(map(str, lr_distances(args))),
                "--long-range-examples", str(args.steps), "--long-range-mix", str(args.lr_mix)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    print(f"training LoRA ({kind}) on {config}: {args.steps} steps of {args.seq_len} tokens", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return out, (time.perf_counter() - start) / 60


def load_variant(name: str, adapter_dir: str | None):
    """The model as loaded, or with a LoRA adapter merged in; unpatched either way."""
    import swa_patch
    from swa_patch.models import load_model

    model, tokenizer = load_model(name)
    if adapter_dir is None:
        return model, tokenizer
    merged = swa_patch.from_pretrained(adapter_dir).merge_and_unload().eval()
    return swa_patch.unpatch_model(merged), tokenizer


def check_layers(args, model) -> None:
    """The facts :data:`MODELS` states (layer count, global layers) against the loaded model."""
    from swa_patch.families import native_full_layers

    spec, config = MODELS[args.model], model.config.get_text_config(decoder=True)
    found = (config.num_hidden_layers, sorted(native_full_layers(config)))
    if found != (spec["layers"], sorted(spec["global_layers"])):
        raise RuntimeError(f"{args.model} has (layers, global layers) {found}; MODELS says "
                           f"{(spec['layers'], sorted(spec['global_layers']))}")


def heldout_ppl(model, blocks: torch.Tensor) -> float:
    import torch.nn.functional as F
    with torch.no_grad():
        losses = [F.cross_entropy(model(row[None], use_cache=False).logits[0, :-1].float(), row[1:]) for row in blocks]
    return math.exp(torch.stack(losses).mean().item())


def time_prefill(args) -> None:
    """Child process: ``--time-config``'s warm-up prefill, then ``--prefill-rounds`` timed ones,
    each into a fresh cache of the kind generate() would use; prints
    ``{"warmup_s", "seconds": [...], "kv_bytes"}``.  A fresh process per configuration: its own
    compile budget, nothing left over from another configuration."""
    from transformers import DynamicCache

    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model
    from swa_patch.streaming import cache_bytes

    model, _ = load_model(args.model)
    check_layers(args, model)
    options = options_of(args, args.time_config)
    if options is not None:
        patch_model(model, **options)
    ids = torch.randint(3, 40_000, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    fresh = lambda: make_cache(model) if options is not None else DynamicCache(config=model.config)  # noqa: E731

    def call():
        cache = fresh()
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, cache=cache, logits_to_keep=1)
        return time.perf_counter() - start, cache

    warmup, _ = call()
    seconds = []
    for _ in range(args.prefill_rounds):
        s, cache = call()
        seconds.append(s)
    print(json.dumps({"warmup_s": warmup, "seconds": seconds, "kv_bytes": cache_bytes(cache)}))


def prefill(args, config: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--time-config", config, "--model", args.model,
           "--window", str(args.window), "--sinks", str(args.sinks), "--prefill-tokens", str(args.prefill_tokens),
           "--prefill-rounds", str(args.prefill_rounds), "--threads", str(args.threads),
           "--work", args.work,                      # where the calibrated rows' plans are
           *(["--calibrate-length", str(args.calibrate_length)] if args.calibrate_length else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"timing {config} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    s = result["seconds"]
    print(f"prefill {args.prefill_tokens} tokens, {config}: median {statistics.median(s):.2f} s "
          f"({min(s):.2f}-{max(s):.2f}, {len(s)} rounds) after a {result['warmup_s']:.2f} s warm-up", flush=True)
    return result


def interval_columns(name: str, value: str, lo: float, hi: float, digits: int = 3) -> dict:
    return {name: value, f"{name}_lo": f"{lo:.{digits}f}", f"{name}_hi": f"{hi:.{digits}f}"}


def write_rows(path: str, summary: list[dict], args) -> None:
    """``summary`` with the run's provenance and settings in every row."""
    meta = provenance()
    meta["settings"] = json.dumps({k: getattr(args, k) for k in (
        "model", "part", "window", "sinks", "trials", "distances", "depths", "passkey_tries", "span", "lead", "resamples",
        "prefill_tokens", "prefill_rounds", "sink_sweep", "steps", "seq_len", "lr", "distill_alpha", "temperature",
        "train_config", "ppl_blocks", "quick", "ruler_lengths", "ruler_tasks", "ruler_limit", "calibrate_trials",
        "calibrate_length", "train_as_row", "lr_tasks", "lr_distances", "lr_mix")})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*summary[0], *meta])
        writer.writeheader()
        for row in summary:
            writer.writerow({**row, **meta})
    for row in summary:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    print(f"wrote {path}", flush=True)


def timing_part(args, configs: list[str]) -> None:
    """Part 1: every configuration's prefill, the unpatched model's first; ``<out>_prefill.csv``."""
    timing = {config: prefill(args, config) for config in dict.fromkeys(["dense", *configs])}
    dense = statistics.median(timing["dense"]["seconds"])
    summary = []
    for config, t in timing.items():
        median = statistics.median(t["seconds"])
        summary.append({"config": config, "model": args.model, "window": args.window, "tokens": args.prefill_tokens,
                        "rounds": len(t["seconds"]), "prefill_s": f"{median:.2f}",
                        "prefill_s_min": f"{min(t['seconds']):.2f}", "prefill_s_max": f"{max(t['seconds']):.2f}",
                        "prefill_warmup_s": f"{t['warmup_s']:.2f}", "prefill_speedup_vs_dense": f"{dense / median:.2f}",
                        "kv_mib": f"{t['kv_bytes'] / 2**20:.1f}"})
    write_rows(args.out + "_prefill.csv", summary, args)


def reach_column(recalls, label: str, distances: list[int]) -> str:
    """Effective reach; ``>=D`` when no measured distance failed (the reach is at least the largest)."""
    from swa_patch.retrieval import effective_reach

    reach = effective_reach(recalls, label) or 0
    return f">={reach}" if reach == max(distances) else str(reach)


def probes_part(args, parsed, distances: list[int], lengths: list[int], depths: list[float]) -> None:
    """Parts 2-4: adapters, then every row's probes and perplexity; ``<out>.csv``, ``_probes.csv``, PNG."""
    from tqdm.auto import tqdm

    from swa_patch import patch_model, unpatch_model
    from swa_patch.retrieval import bootstrap_interval, copy_probe, passkey, plot, recall_table, theoretical_reach, write_csv

    spec, w = MODELS[args.model], args.window
    train, held = split_text(args.work, args.heldout_fraction)
    adapters, minutes = {}, {}
    for key in dict.fromkeys(adapter_key(args, a, c) for _, c, a in parsed if a):
        adapters[key], minutes[key] = train_adapter(args, key, train, held)

    copies, keys, results, rulers = [], [], [], []
    for key in dict.fromkeys(adapter_key(args, a, c) for _, c, a in parsed):
        model, tokenizer = load_variant(args.model, adapters.get(key))
        check_layers(args, model)
        ids = tokenizer(open(held).read(), return_tensors="pt").input_ids[0]
        n_blocks = ids.numel() // args.seq_len
        blocks = ids[: n_blocks * args.seq_len].view(n_blocks, args.seq_len)[: args.ppl_blocks]
        mine = [(label, config, a) for label, config, a in parsed if adapter_key(args, a, config) == key]
        for label, config, adapter in tqdm(mine, desc=f"rows{' @' + key[0] if key else ''}"):
            tqdm.write(f"== {label}")
            options = options_of(args, config)
            if options is not None:
                patch_model(model, backend=args.probe_backend, **options)
            try:
                start = time.perf_counter()
                copies += copy_probe(model, ids, distances, args.span, args.lead, args.trials, 0, label)
                if lengths:
                    keys += passkey(model, tokenizer, ids, lengths, depths, args.passkey_tries, config=label)
                    if options and options.get("decode", "window") != "window":    # only the answer attends fully
                        keys += passkey(model, tokenizer, ids, lengths, depths, args.passkey_tries,
                                        config=label + PROMPT_END, boundary="prompt-end")
                if args.ruler_lengths:
                    from swa_patch.ruler import ruler
                    rulers += ruler(model, tokenizer, args.ruler_tasks.split(","),
                                    [int(n) for n in args.ruler_lengths.split(",")], args.ruler_limit, config=label)
                ppl = heldout_ppl(model, blocks)
                results.append({"row": label, "config": config, "adapter": adapter, "ppl": ppl,
                                "sinks": options["sinks"] if options else 0, "reach_theory": theoretical_reach(model),
                                "probe_minutes": (time.perf_counter() - start) / 60})
            finally:
                unpatch_model(model)
        del model

    recalls = recall_table(copies, resamples=args.resamples)
    by = {(r.config, r.distance): r for r in recalls}
    summary = []
    for res in results:
        label = res["row"]
        row = {"row": label, "config": res["config"], "adapter": res["adapter"], "model": args.model, "window": w,
               "sinks": res["sinks"]}
        for name, d in (("W/2", w // 2), ("2W", 2 * w), ("8W", 8 * w)):
            r = by.get((label, d))
            row.update(interval_columns(f"recall_{name}", f"{r.recall:.3f}", r.recall_lo, r.recall_hi) if r else
                       {f"recall_{name}": "", f"recall_{name}_lo": "", f"recall_{name}_hi": ""})
        row["effective_reach"] = reach_column(recalls, label, distances)
        row["receptive_field"] = res["reach_theory"] or "all"
        for n in lengths:
            for suffix, name in (("", label), ("_prompt_end", label + PROMPT_END)):
                hits = [k.correct for k in keys if k.config == name and k.length == n]
                column = f"passkey_{n}{suffix}"
                row.update(interval_columns(column, f"{sum(hits)}/{len(hits)}",
                                            *bootstrap_interval(hits, resamples=args.resamples), digits=2) if hits else
                           {column: "", f"{column}_lo": "", f"{column}_hi": ""})
        for r in (r for r in rulers if r.config == label):
            row.update(interval_columns(f"ruler_{r.task}_{r.length}", f"{round(r.score * r.samples)}/{r.samples}",
                                        r.low, r.high, digits=2))
        row["heldout_ppl"] = f"{res['ppl']:.3f}"
        calibrated = [c for c in map(calibration_of, res["config"].split("+"))
                      if c in getattr(args, "calibration_minutes", {})]
        row["calibrate_minutes"] = f"{sum(args.calibration_minutes[p] for p in calibrated):.1f}" if calibrated else ""
        key = adapter_key(args, res["adapter"], res["config"])
        row["train_minutes"] = f"{minutes[key]:.1f}" if key else ""
        row["probe_minutes"] = f"{res['probe_minutes']:.1f}"
        summary.append(row)
    write_rows(args.out + ".csv", summary, args)
    write_csv(args.out + "_probes.csv", recalls, keys, {r["row"]: r["reach_theory"] for r in results})
    plot(recalls, keys, args.out + ".png", w, f"{spec['title']}, window {w}: copy recall and passkey per configuration")
    print(f"wrote {args.out}_probes.csv, {args.out}.png")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.time_config:
        return time_prefill(args)
    spec = MODELS[args.model]
    labels = [(label, label.partition("@")[0], "") for label in args.rows.split(",") if label.strip()]
    args.calibration_minutes = calibrate_plans(args, labels)     # plans first: the rows' options read them
    parsed = expand_rows(args)
    if args.lead is None:
        args.lead = 32 + max((options or {}).get("sinks", 0) for options in (options_of(args, c) for _, c, _ in parsed))
    w = args.window
    distances = [int(x) for x in args.distances.split(",")] if args.distances else [w // 2, w, 2 * w, 4 * w, 8 * w]
    lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    if "@" in args.rows and args.part != "timing":
        train_options(args)                            # refuse a bad --train-config before hours of work
    est = estimate_minutes(args, parsed, distances, lengths, depths)
    print(f"{spec['title']}, window {w}, part {args.part}: {len(parsed)} rows ({', '.join(r for r, _, _ in parsed)}); "
          f"estimate ~{sum(est.values()):.0f} min on {args.threads} thread(s) "
          f"({', '.join(f'{k} {v:.0f}' for k, v in est.items())})", flush=True)
    started = time.perf_counter()
    if args.part in ("all", "timing"):
        timing_part(args, [c for _, c, _ in parsed])   # first, while nothing else runs
    if args.part in ("all", "probes"):
        probes_part(args, parsed, distances, lengths, depths)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min; estimated {sum(est.values()):.0f}")


if __name__ == "__main__":
    main()
