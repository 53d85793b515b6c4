"""Streaming perplexity evaluation (the StreamingLLM experiment) on one loaded model.

Modes, switched on the same model with ``patch_model`` / ``unpatch_model``:

* ``dense``     — the plain model with a growing KV cache (memory grows with the stream);
* ``window``    — sliding window only, no sinks, with the *same KV budget* as ``sinks``
                  (``window + sinks`` recent tokens);
* ``sinks``     — ``sinks`` attention-sink tokens + ``window`` recent tokens;
* ``plan``      — a saved calibration :class:`~swa_patch.calibration.Plan`: its chosen KV heads
                  full (their caches grow), every other head ``plan.window`` + ``plan.sinks``;
* ``recompute`` — the window (last ``window + sinks`` tokens) re-encoded from scratch by the
                  plain model for every token: the baseline StreamingLLM's speed-up is
                  measured against.  Always token by token.

``chunk=1`` feeds the stream token by token; ``chunk>1`` feeds it in chunks through the same
cache, which gives the same logits (the cache evicts inside the chunk) many times faster.
Every mode reports rows of (tokens, cumulative perplexity, KV-cache bytes, seconds) at
checkpoints; :func:`write_csv` and :func:`plot` save them.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("swa_patch")

MODES = ("dense", "window", "sinks", "plan", "recompute")


@dataclass
class Row:
    mode: str
    tokens: int          # tokens of the stream fed so far
    ppl: float           # exp(mean NLL): the logits of every fed token against the next token of
                         # the text (tokens 1..tokens; the last token of the text has no target)
    kv_bytes: int        # KV-cache bytes held after the last call
    seconds: float       # model time spent by this mode so far

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def cache_bytes(cache) -> int:
    """Bytes of every tensor held by the cache's layers (keys, values, sink slots, ...); an
    :class:`~swa_patch.cache.SWACache` counts its own (a layer may keep its heads in parts)."""
    if cache is None:
        return 0
    if callable(getattr(cache, "nbytes", None)):
        return cache.nbytes()
    seen, total = set(), 0
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def parse_modes(compare) -> list[str]:
    modes = [m.strip() for m in compare.split(",")] if isinstance(compare, str) else list(compare)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"compare must be a comma-separated subset of {MODES}, got {compare!r}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"compare lists a mode twice: {compare!r}")
    return modes


def _check(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def checkpoints(n_tokens: int, every: int) -> list[int]:
    return sorted({*range(every, n_tokens, every), n_tokens})


def stream_perplexity(model, input_ids, mode: str, window: int, sinks: int = 4, chunk: int = 1,
                      every: int = 256, positions: str | None = None, backend: str = "auto",
                      progress: bool = True, all_layers: bool = False, plan=None) -> list[Row]:
    """Stream ``input_ids`` (``[T]`` or ``[1, T]``) through ``model`` in ``mode`` and return
    one :class:`Row` per checkpoint (every ``every`` tokens and at the end).  ``all_layers``
    windows every layer, also those a hybrid model (Gemma 2/3) declares global, which a single
    ``window`` leaves full.  ``plan`` (a :class:`~swa_patch.calibration.Plan` or the path of a saved
    one) is what ``mode="plan"`` runs; its own window and sinks apply.  ``model`` is left unpatched
    afterwards."""
    from tqdm.auto import tqdm

    from .patch import patch_model, unpatch_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check("window", window, 1)
    _check("sinks", sinks, 0)
    _check("chunk", chunk, 1)
    _check("every", every, 1)
    if mode == "sinks" and sinks == 0:
        raise ValueError("mode='sinks' needs sinks >= 1 (use mode='window' for no sinks)")
    if (mode == "plan") != (plan is not None):
        raise ValueError("mode='plan' needs plan= (a calibration Plan or its JSON path), and plan= needs "
                         f"mode='plan'; got mode={mode!r}, plan={plan!r}")
    if plan is not None and not hasattr(plan, "patch_options"):
        from .calibration import Plan
        plan = Plan.load(plan)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"input_ids must be one stream ([T] or [1, T]), got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens of one stream, got shape {tuple(ids.shape)}")
    ids = ids.to(next(model.parameters()).device)
    n = ids.numel()
    marks = checkpoints(n, every)

    unpatch_model(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = (lambda w: [w] * n_layers) if all_layers else (lambda w: w)
    if mode == "window":   # same KV budget; shift positions too, so neither mode leaves the trained context
        patch_model(model, window=layers(window + sinks), sinks=0, positions=positions or "shift", backend=backend)
    elif mode == "sinks":
        patch_model(model, window=layers(window), sinks=sinks, positions=positions, backend=backend)
    elif mode == "plan":
        patch_model(model, **plan.patch_options(), positions=positions, backend=backend)
    rows, nll_sum, seconds = [], 0.0, 0.0
    bar = tqdm(total=n, desc=f"{mode:>9}", unit="tok", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            if mode == "recompute":
                step_iter = _recompute_steps(model, ids, window + sinks)
            else:
                step_iter = _cached_steps(model, ids, mode, chunk, marks)
            for start, end, logits, kv, dt in step_iter:
                seconds += dt
                targets = ids[start + 1:end + 1]
                if targets.numel():
                    nll_sum += F.cross_entropy(logits[:targets.numel()].float(), targets,
                                               reduction="sum").item()
                bar.update(end - start)
                if end in marks:
                    predictions = min(end, n - 1)
                    rows.append(Row(mode, end, math.exp(nll_sum / predictions), kv, seconds))
                    bar.set_postfix(ppl=f"{rows[-1].ppl:.2f}")
    finally:
        bar.close()
        unpatch_model(model)
    return rows


def _cached_steps(model, ids, mode, chunk, marks):
    """(start, end, logits [end-start, V], kv bytes, seconds) per call; calls never cross a
    checkpoint, so every row is exact."""
    from transformers import DynamicCache

    from .generation import make_cache
    cache = DynamicCache(config=model.config) if mode == "dense" else make_cache(model)
    start, marks = 0, iter(marks)
    mark = next(marks)
    n = ids.numel()
    while start < n:
        end = min(start + chunk, mark, n)
        t0 = time.perf_counter()
        logits = model(ids[None, start:end], cache=cache, use_cache=True).logits[0]
        dt = time.perf_counter() - t0
        yield start, end, logits, cache_bytes(cache), dt
        start = end
        if end == mark and end < n:
            mark = next(marks)


def _recompute_steps(model, ids, context: int):
    """For every token, re-encode the last ``context`` tokens (itself included) from scratch."""
    from transformers import DynamicCache

    for t in range(ids.numel()):
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        logits = model(ids[None, max(0, t + 1 - context):t + 1], cache=cache, use_cache=True).logits[0, -1:]
        dt = time.perf_counter() - t0
        yield t, t + 1, logits, cache_bytes(cache), dt


def compare(model, input_ids, modes=("dense", "window", "sinks"), window: int = 1020, sinks: int = 4,
            chunk: int = 1, every: int = 256, positions: str | None = None, backend: str = "auto",
            max_tokens: dict | None = None, progress: bool = True, all_layers: bool = False,
            plan=None) -> list[Row]:
    """Run each mode on the same tokens, one after the other; ``max_tokens`` caps a mode
    (e.g. ``{"recompute": 512}``: it costs a full forward of the window per token)."""
    modes = parse_modes(modes)
    rows = []
    for mode in modes:
        cap = (max_tokens or {}).get(mode)
        ids = input_ids if cap is None else torch.as_tensor(input_ids).reshape(-1)[:cap]
        rows += stream_perplexity(model, ids, mode, window, sinks, chunk=chunk, every=every,
                                  positions=positions, backend=backend, progress=progress, all_layers=all_layers,
                                  plan=plan if mode == "plan" else None)
    return rows


# ---- reporting ---------------------------------------------------------------------------
FIELDS = ["mode", "tokens", "ppl", "kv_bytes", "seconds", "tokens_per_s"]


def write_csv(rows, path) -> None:
    """One row per checkpoint, with what produced it (command, code, date, machine, versions)."""
    from .provenance import run_info
    info = run_info()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, *info])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "ppl": f"{r.ppl:.6f}", "seconds": f"{r.seconds:.4f}",
                             "tokens_per_s": f"{r.tokens_per_s:.2f}", **info})


def format_table(rows) -> str:
    """Checkpoints down, one ppl / KV MiB column pair per mode."""
    modes = list(dict.fromkeys(r.mode for r in rows))
    by = {(r.mode, r.tokens): r for r in rows}
    tokens = sorted({r.tokens for r in rows})
    head = f"{'tokens':>8} " + " ".join(f"{m + ' ppl':>14} {'KV MiB':>8}" for m in modes)
    lines = [head, "-" * len(head)]
    for t in tokens:
        cells = []
        for m in modes:
            r = by.get((m, t))
            cells.append(f"{r.ppl:>14.3f} {r.kv_bytes / 2**20:>8.1f}" if r else f"{'-':>14} {'-':>8}")
        lines.append(f"{t:>8} " + " ".join(cells))
    last = {m: [r for r in rows if r.mode == m][-1] for m in modes}
    lines.append("tokens/s " + "  ".join(f"{m}: {last[m].tokens_per_s:.1f}" for m in modes))
    return "\n".join(lines)


def plot(rows, path, title: str | None = None) -> None:
    """Perplexity vs tokens and KV-cache memory vs tokens, one line per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r.mode for r in rows):
        rs = [r for r in rows if r.mode == mode]
        x = [r.tokens for r in rs]
        ax_ppl.plot(x, [r.ppl for r in rs], label=mode, marker="." if len(rs) < 40 else None)
        ax_mem.plot(x, [r.kv_bytes / 2**20 for r in rs], label=mode)
    ax_ppl.set(xlabel="tokens streamed", ylabel="cumulative perplexity",
               title="perplexity")
    ax_mem.set(xlabel="tokens streamed", ylabel="KV cache (MiB)", title="KV-cache memory")
    for ax in (ax_ppl, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the `swa-patch stream` command --------------------------------------------------------
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "stream", help="streaming perplexity: dense vs window vs sinks vs recompute",
        description="Stream a long text through a model and compare KV-cache strategies: prints a "
                    "table at checkpoints, writes a CSV and a PNG (perplexity and KV memory vs tokens).")
    from .models import add_source_args
    add_source_args(p)
    p.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink tokens (default 4)")
    p.add_argument("--compare", default="dense,window,sinks",
                   help=f"comma-separated modes from {','.join(MODES)} (default dense,window,sinks)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to stream (default: the whole text)")
    p.add_argument("--chunk", type=int, default=256,
                   help="tokens per model call; 1 = token by token (default 256, same perplexity)")
    p.add_argument("--every", type=int, default=None, help="checkpoint interval (default: tokens/16)")
    p.add_argument("--max-tokens", action="append", default=[], metavar="MODE=N",
                   help="cap one mode's tokens, e.g. recompute=512 (repeatable)")
    p.add_argument("--plan", default=None, help="a calibration plan (JSON, from swa-patch calibrate) for mode 'plan'")
    p.add_argument("--positions", choices=("original", "shift"), default=None,
                   help="position mode for window/sinks (default: the library's)")
    p.add_argument("--all-layers", action="store_true",
                   help="window every layer, also the global layers of a hybrid model (Gemma 2/3), which "
                        "otherwise keep full attention and a growing cache")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--csv", default=None, help="CSV path (default: next to --plot, else stream.csv)")
    p.add_argument("--plot", default="stream.png", help="PNG path (default stream.png)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def _parse_caps(items) -> dict:
    caps = {}
    for item in items:
        mode, sep, value = item.partition("=")
        if not sep or mode not in MODES or not value.isdigit() or int(value) < 2:
            raise ValueError(f"--max-tokens must look like MODE=N with MODE in {MODES} and N >= 2, "
                             f"got {item!r}")
        caps[mode] = int(value)
    return caps


def run_cli(args) -> int:
    import os

    from .models import load_model, load_text

    modes = parse_modes(args.compare)
    if ("plan" in modes) != (args.plan is not None):
        raise ValueError("--compare with mode 'plan' needs --plan PATH, and --plan needs 'plan' in --compare")
    caps = _parse_caps(args.max_tokens)
    if args.tokens is not None:
        _check("--tokens", args.tokens, 2)
    if args.threads is not None:
        _check("--threads", args.threads, 1)
        torch.set_num_threads(args.threads)
    text = load_text(args.text, dataset=args.dataset, split=args.split, column=args.column,
                     config=args.dataset_config)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if args.tokens is not None:
        if ids.numel() < args.tokens:
            raise ValueError(f"--tokens {args.tokens} is more than the text holds ({ids.numel()} tokens)")
        ids = ids[:args.tokens]
    every = args.every or max(1, ids.numel() // 16)
    print(f"streaming {ids.numel()} tokens through {args.model}: window {args.window}"
          f"{' on every layer' if args.all_layers else ''}, sinks {args.sinks}, chunk {args.chunk}, "
          f"modes {','.join(modes)}")
    rows = compare(model, ids, modes, window=args.window, sinks=args.sinks, chunk=args.chunk,
                   every=every, positions=args.positions, backend=args.backend, max_tokens=caps,
                   progress=not args.no_progress, all_layers=args.all_layers, plan=args.plan)
    print(format_table(rows))
    csv_path = args.csv or (os.path.splitext(args.plot)[0] + ".csv" if args.plot else "stream.csv")
    write_csv(rows, csv_path)
    print(f"wrote {csv_path}")
    if args.plot:
        plot(rows, args.plot, title=f"{args.model}: window {args.window}{' (every layer)' if args.all_layers else ''}"
                                    f", sinks {args.sinks}")
        print(f"wrote {args.plot}")
    return 0
