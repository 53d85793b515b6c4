"""What a window forgets: retrieval probes for any causal LM, patched or not.

* **copy**: ``lead + span + filler(D) + span``: the model reads a span of ``R`` tokens, ``D``
  tokens of other text, then the same span again.  The score is the NLL (and top-1
  accuracy) on the repeat, against a *control* with another span in place of the first copy
  (same length, same filler, same scored tokens).  The NLL drop ``control - probe`` is what
  the first copy is worth; ``recall(D)`` is the share of the dense model's drop that a
  patched model keeps, and the *effective reach* is the largest ``D`` before the first one
  whose recall is below 0.5.  For decode="full" models the repeat is the answer: the prompt
  ends where it begins.  The copy probe has no question, so it has one boundary only: the
  repeat's queries attend everything, what precedes them is read through the window (the
  passkey's "prompt-end" boundary; its "question" boundary has no counterpart here).
  :func:`recall_table` gives each recall a paired percentile-bootstrap interval over the
  trials (:func:`bootstrap_interval`: dense and patched runs share each trial's spans).
* **passkey**: a number hidden at a depth of a haystack of real text; greedy generation must
  reproduce it.  Accuracy per (length, depth).  For decode="full" models the boundary sits
  where the question starts (``boundary="question"``: the haystack is read through the
  window, the question and the answer attend everything) or at the prompt end
  (``"prompt-end"``: only the answer does).

Only the scored logits are computed (``logits_to_keep``), so a long probe of a large-vocabulary
model never builds a ``[n, vocab]`` tensor.  :func:`compare` runs configurations of one model
one after the other (``dense``, or ``+``-joined parts: ``window``, ``native``, ``sinks[:N]``,
``full-layers:K``, ``decode-full``, ``decode-global``; see :func:`config_options`); the ``swa-patch eval retrieval``
command writes a CSV and a PNG.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

FEATURES = ("window", "native", "sinks[:N]", "full-layers:K", "decode-full", "decode-global")
PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
PASSKEY_BOUNDARIES = ("question", "prompt-end")


@dataclass
class CopyTrial:
    config: str
    distance: int
    trial: int
    nll_probe: float      # mean NLL per token of the repeat, first copy present
    nll_control: float    # the same tokens, another span in place of the first copy
    acc_probe: float      # top-1 accuracy on the repeat
    acc_control: float


@dataclass
class PasskeyTrial:
    config: str
    length: int           # prompt tokens
    depth: float          # where the needle sits, 0 = start, 1 = end of the haystack
    trial: int
    key: str
    answer: str
    correct: bool


# ---- configurations ----------------------------------------------------------------------------
def config_options(name: str, window: int, sinks: int, n_layers: int, global_layers=()) -> dict | None:
    """``patch_model`` options for a configuration name (None: the unpatched model).
    ``window`` = the window alone on *every* layer (``window=[W] * n_layers``, so the layers a
    hybrid model such as Gemma 3 declares global are windowed too); ``+native`` keeps the
    model's own global layers full instead (``window=W``, what ``patch_model(model, window=W)``
    does; the same as ``window`` on a model with none); ``plan:PATH`` takes the per-KV-head windows
    and sinks of a saved :class:`~swa_patch.calibration.Plan` (``plan-decode:PATH``: its heads decode
    fully instead, every head windowed in the prompt); ``+sinks`` adds the sinks (``sinks:N``:
    N of them), ``+full-layers:K`` makes every K-th layer full (layers K-1, 2K-1, ...),
    ``+decode-full`` sets decode="full", ``+decode-global`` decode=``global_layers`` (the layers
    a hybrid model declares global: Gemma 3's local layers were trained with their window, and
    opening them for the answer costs more than it recalls)."""
    if name == "dense":
        return None
    options = {"window": [window] * n_layers, "sinks": 0}
    for part in name.split("+"):
        if part == "window":
            continue
        if part.startswith(("plan:", "plan-decode:")):    # a saved calibration plan: its heads full, or decoding fully
            from .calibration import Plan
            kind, _, path = part.partition(":")
            plan_options = Plan.load(path).patch_options(decode=kind == "plan-decode")
            options.update(plan_options, window=[plan_options["window"]] * n_layers
                           if isinstance(plan_options["window"], int) else plan_options["window"])
            continue
        if part == "native":
            options["window"] = window
        elif part == "sinks" or (part.startswith("sinks:") and part[6:].isdigit() and int(part[6:]) >= 1):
            options["sinks"] = int(part[6:]) if ":" in part else sinks
            if options["sinks"] < 1:
                raise ValueError(f"configuration {name!r} needs sinks >= 1, got {sinks}")
        elif part.startswith("full-layers:") and part.split(":")[1].isdigit() and int(part.split(":")[1]) >= 1:
            every = int(part.split(":")[1])
            options["full_layers"] = list(range(every - 1, n_layers, every))
        elif part == "decode-full":
            options["decode"] = "full"
        elif part == "decode-global":
            if not global_layers:
                raise ValueError(f"configuration {name!r}: 'decode-global' needs a model that declares global "
                                 "layers (Gemma 2/3, GPT-OSS); this one has none: use 'decode-full'")
            options["decode"] = sorted(global_layers)
        else:
            raise ValueError(f"configuration {name!r}: unknown part {part!r}; a configuration is 'dense' or "
                             f"'+'-joined parts from {FEATURES} (K >= 1), e.g. 'sinks:16+decode-full'")
    return options


def parse_configs(compare) -> list[str]:
    names = [c.strip() for c in compare.split(",")] if isinstance(compare, str) else list(compare)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"compare must list distinct configurations, got {compare!r}")
    for name in names:
        config_options(name, 2, 1, 4, [3])     # validates the name
    return names


def _decodes_full(model) -> bool:
    from .state import patch_settings
    settings = patch_settings(model)
    return settings is not None and settings.decodes_full


# ---- copy probe ------------------------------------------------------------------------------
def copy_layout(stream_len: int, distances, span: int, lead: int, trials: int, seed: int):
    """Per trial, start offsets ``(lead, span, filler, control)`` of four disjoint regions of a
    token stream of ``stream_len`` tokens, the filler long enough for the largest distance."""
    longest = max(distances)
    sizes = (lead, span, longest, span)
    if sum(sizes) * 2 > stream_len:
        raise ValueError(f"the text has {stream_len} tokens; copy probes up to distance {longest} need at "
                         f"least {2 * sum(sizes)} (give a longer text or smaller distances)")
    rng = random.Random(seed)
    layouts = []
    while len(layouts) < trials:
        starts = [rng.randrange(0, stream_len - size) for size in sizes]
        spans = sorted(zip(starts, sizes))
        if all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])):
            layouts.append(starts)
    return layouts


def copy_sequences(ids: torch.Tensor, starts, distance: int, span: int, lead: int):
    """(probe, control, index of the first repeated token)."""
    a, b, c, e = starts
    head, first, other = ids[a:a + lead], ids[b:b + span], ids[e:e + span]
    filler = ids[c:c + distance]
    probe = torch.cat([head, first, filler, first])
    control = torch.cat([head, other, filler, first])
    return probe, control, lead + span + distance


@torch.no_grad()
def score_repeat(model, sequence: torch.Tensor, repeat_at: int) -> tuple[float, float]:
    """Mean NLL and top-1 accuracy of ``sequence[repeat_at:]`` given what precedes it; only
    those logits are computed.  A decode="full" model gets the prompt boundary at the repeat."""
    device = next(model.parameters()).device
    targets = sequence[repeat_at:].to(device)
    extra = {"prompt_lengths": repeat_at} if _decodes_full(model) else {}
    logits = model(sequence[None].to(device), logits_to_keep=targets.numel() + 1, use_cache=False,
                   **extra).logits[0, :-1].float()
    nll = F.cross_entropy(logits, targets).item()
    return nll, (logits.argmax(-1) == targets).float().mean().item()


def copy_probe(model, ids, distances, span: int = 64, lead: int = 32, trials: int = 8, seed: int = 0,
               config: str = "model", progress: bool = True) -> list[CopyTrial]:
    """The copy probe on ``model`` as it is (patched or not) over a token stream ``ids``;
    the same ``seed`` gives the same spans and fillers to every model."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(ids).reshape(-1)
    distances = sorted(_positive_ints("distances", distances))
    for name, value in (("span", span), ("trials", trials)):
        _positive_ints(name, [value])
    layouts = copy_layout(ids.numel(), distances, span, lead, trials, seed)
    rows = []
    bar = tqdm(total=len(distances) * trials, desc=f"copy {config}", disable=not progress, leave=False)
    for distance in distances:
        for t, starts in enumerate(layouts):
            probe, control, at = copy_sequences(ids, starts, distance, span, lead)
            nll_p, acc_p = score_repeat(model, probe, at)
            nll_c, acc_c = score_repeat(model, control, at)
            rows.append(CopyTrial(config, distance, t, nll_p, nll_c, acc_p, acc_c))
            bar.update()
    bar.close()
    return rows


def _positive_ints(name, values) -> list[int]:
    values = list(values)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"{name} must be ints >= 1, got {values!r}")
    return values


# ---- passkey ---------------------------------------------------------------------------------
def passkey_prompt(tokenizer, haystack_ids: torch.Tensor, length: int, depth: float, key: str) -> torch.Tensor:
    """``length`` tokens: intro, haystack with the needle at ``depth``, question."""
    encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    intro, needle = encode(PASSKEY_INTRO), encode(PASSKEY_NEEDLE.format(key=key))
    question = encode(PASSKEY_QUESTION)
    room = length - intro.numel() - needle.numel() - question.numel()
    if room < 1 or room > haystack_ids.numel():
        raise ValueError(f"a passkey prompt of {length} tokens needs 1..{haystack_ids.numel()} haystack "
                         f"tokens, got {room}")
    cut = round(depth * room)
    return torch.cat([intro, haystack_ids[:cut], needle, haystack_ids[cut:room], question])


@torch.no_grad()
def passkey(model, tokenizer, ids, lengths=(1024, 2048, 4096), depths=(0.1, 0.3, 0.5, 0.7, 0.9),
            trials: int = 1, seed: int = 0, config: str = "model", progress: bool = True,
            boundary: str = "question") -> list[PasskeyTrial]:
    """Greedy generation must reproduce a 5-digit key hidden at each depth of haystacks of
    each length (haystacks from random offsets of ``ids``; the same ``seed``, the same keys).
    ``boundary``: where a decode="full" model's prompt ends (see the module docstring)."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(ids).reshape(-1)
    lengths = _positive_ints("lengths", lengths)
    if boundary not in PASSKEY_BOUNDARIES:
        raise ValueError(f"boundary must be one of {PASSKEY_BOUNDARIES}, got {boundary!r}")
    question = len(tokenizer(PASSKEY_QUESTION, add_special_tokens=False).input_ids)
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    if max(lengths) > ids.numel():
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the longest haystack ({max(lengths)})")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc=f"passkey {config}", disable=not progress,
               leave=False)
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                key = str(rng.randrange(10_000, 100_000))
                start = rng.randrange(0, ids.numel() - length + 1)
                prompt = passkey_prompt(tokenizer, ids[start:start + length], length, depth, key)[None].to(device)
                extra = ({"prompt_lengths": length - question}
                         if boundary == "question" and _decodes_full(model) else {})
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id, **extra)
                answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
                rows.append(PasskeyTrial(config, length, depth, t, key, answer.strip(), key in answer))
                bar.update()
    bar.close()
    return rows


# ---- comparing configurations ------------------------------------------------------------------
def theoretical_reach(model) -> int | None:
    """The receptive field of the scored (last / answer) query: None when it is the whole
    context (unpatched, a full-attention layer, or decode="full")."""
    from .receptive import receptive_field
    from .state import patch_state
    state = patch_state(model)
    if state is None or state["settings"].decodes_full or any(s.window is None or s.has_full_heads for s in state["specs"]):
        return None
    return receptive_field(model)


def compare(model, tokenizer, ids, configs, window: int, sinks: int = 4, distances=None, span: int = 64,
            lead: int = 32, trials: int = 8, passkey_lengths=(1024, 2048, 4096),
            depths=(0.1, 0.3, 0.5, 0.7, 0.9), passkey_trials: int = 1, seed: int = 0, backend: str = "auto",
            progress: bool = True, passkey_boundary: str = "question"):
    """Run the probes on each configuration of ``model`` (patched in turn; left unpatched).
    Returns ``(copy trials, passkey trials, {config: theoretical reach})``."""
    from .patch import patch_model, unpatch_model
    from .state import patch_state

    if patch_state(model) is not None:
        raise ValueError("compare patches the model itself: pass it unpatched")
    from .families import native_full_layers

    configs = parse_configs(configs)
    text_config = model.config.get_text_config(decoder=True)
    n_layers, global_layers = text_config.num_hidden_layers, native_full_layers(text_config)
    distances = distances or default_distances(window)
    copies, keys, reach = [], [], {}
    for name in configs:
        options = config_options(name, window, sinks, n_layers, global_layers)
        if options is not None:
            patch_model(model, backend=backend, **options)
        try:
            reach[name] = theoretical_reach(model)
            copies += copy_probe(model, ids, distances, span, lead, trials, seed, name, progress)
            if passkey_lengths:
                keys += passkey(model, tokenizer, ids, passkey_lengths, depths, passkey_trials, seed, name,
                                progress, passkey_boundary)
        finally:
            unpatch_model(model)
    return copies, keys, reach


def default_distances(window: int) -> list[int]:
    """From W/4 to 16W, doubling (W/2, 2W and 8W included)."""
    return [max(1, window // 4) * 2 ** k for k in range(7)]


def bootstrap_interval(samples, statistic=None, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` interval of ``statistic`` (default: the mean) of
    ``samples``: ``resamples`` redraws of ``len(samples)`` items with replacement, with a fixed
    ``seed`` so the same data always give the same interval.  Items may be anything
    ``statistic`` reads (pairs, for a paired ratio).  Redraws whose statistic is NaN are left
    out.  A constant sample (all hits, or a single trial) gives a zero-width interval: the
    percentile bootstrap cannot see variation that the sample does not show."""
    samples = list(samples)
    if not samples:
        raise ValueError("bootstrap_interval needs at least one sample")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    statistic = statistic or (lambda xs: sum(xs) / len(xs))
    rng = random.Random(seed)
    stats = sorted(v for v in (statistic(rng.choices(samples, k=len(samples))) for _ in range(resamples)) if v == v)
    if not stats:
        return float("nan"), float("nan")
    return _quantile(stats, (1 - level) / 2), _quantile(stats, (1 + level) / 2)


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def _ratio_of_sums(pairs) -> float:
    dense = sum(d for _, d in pairs)
    return sum(c for c, _ in pairs) / dense if dense else float("nan")


@dataclass
class RecallRow:
    config: str
    distance: int
    trials: int
    nll_probe: float
    nll_control: float
    drop: float          # nll_control - nll_probe (mean over trials)
    recall: float        # drop / the dense drop at this distance (nan without a dense run)
    acc_probe: float
    acc_control: float
    recall_lo: float = float("nan")    # paired percentile-bootstrap 95 % interval of recall
    recall_hi: float = float("nan")


def recall_table(copies: list[CopyTrial], reference: str = "dense", resamples: int = 2000) -> list[RecallRow]:
    """Recall per (configuration, distance), with its bootstrap interval: the trials are
    redrawn in pairs (a configuration's trial t beside the reference's trial t, which read the
    same spans and filler), and each redraw's recall is the ratio of their summed drops."""
    groups: dict[tuple[str, int], list[CopyTrial]] = {}
    for row in copies:
        groups.setdefault((row.config, row.distance), []).append(row)
    mean = lambda rows, f: sum(getattr(r, f) for r in rows) / len(rows)
    drops = {key: mean(rows, "nll_control") - mean(rows, "nll_probe") for key, rows in groups.items()}
    out = []
    for (config, distance), rows in groups.items():
        dense = drops.get((reference, distance))
        recall = drops[(config, distance)] / dense if dense else float("nan")
        ref = {r.trial: r.nll_control - r.nll_probe for r in groups.get((reference, distance), [])}
        pairs = [(r.nll_control - r.nll_probe, ref[r.trial]) for r in rows if r.trial in ref]
        lo, hi = (bootstrap_interval(pairs, _ratio_of_sums, resamples) if pairs and dense
                  else (float("nan"), float("nan")))
        out.append(RecallRow(config, distance, len(rows), mean(rows, "nll_probe"), mean(rows, "nll_control"),
                             drops[(config, distance)], recall, mean(rows, "acc_probe"), mean(rows, "acc_control"),
                             lo, hi))
    return out


def effective_reach(recalls: list[RecallRow], config: str, threshold: float = 0.5) -> int | None:
    """The largest distance before the first one whose recall is below ``threshold`` (None: the
    shortest already is).  A pass farther out after a failure does not extend the reach."""
    reach = None
    for row in sorted((r for r in recalls if r.config == config), key=lambda r: r.distance):
        if row.recall < threshold:
            break
        reach = row.distance
    return reach


def passkey_table(keys: list[PasskeyTrial]) -> dict[tuple[str, int, float], float]:
    groups: dict[tuple[str, int, float], list[bool]] = {}
    for row in keys:
        groups.setdefault((row.config, row.length, row.depth), []).append(row.correct)
    return {key: sum(v) / len(v) for key, v in groups.items()}


# ---- reporting ---------------------------------------------------------------------------------
def write_csv(path, recalls: list[RecallRow], keys: list[PasskeyTrial], reach: dict) -> None:
    """One file, a ``probe`` column: ``copy`` rows (per configuration and distance) and
    ``passkey`` rows (per configuration, length, depth and trial)."""
    from .provenance import run_info
    info = run_info()
    fields = ["probe", "config", "distance", "trials", "nll_probe", "nll_control", "drop", "recall",
              "recall_lo", "recall_hi", "acc_probe", "acc_control", "effective_reach", "receptive_field",
              "length", "depth", "trial", "key", "answer", "correct", *info]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in recalls:
            writer.writerow({"probe": "copy", **{k: _fmt(v) for k, v in asdict(r).items()},
                             "effective_reach": effective_reach(recalls, r.config) or "",
                             "receptive_field": reach.get(r.config) or "all", **info})
        for k in keys:
            writer.writerow({"probe": "passkey", **asdict(k), "correct": int(k.correct), **info})


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else v


def format_table(recalls: list[RecallRow], keys: list[PasskeyTrial], reach: dict) -> str:
    configs = list(dict.fromkeys(r.config for r in recalls))
    distances = sorted({r.distance for r in recalls})
    cell = {(r.config, r.distance): r for r in recalls}
    head = f"{'config':<28}" + "".join(f"{'D=' + str(d):>9}" for d in distances) + f"{'reach':>8}{'field':>8}"
    lines = ["copy probe: recall (NLL drop kept vs dense; dense: drop in nats)", head, "-" * len(head)]
    for c in configs:
        vals = [cell[(c, d)].drop if c == "dense" else cell[(c, d)].recall for d in distances]
        lines.append(f"{c:<28}" + "".join(f"{v:>9.2f}" for v in vals)
                     + f"{effective_reach(recalls, c) or '-':>8}{reach.get(c) or 'all':>8}")
    if keys:
        lengths = sorted({k.length for k in keys})
        lines += ["", "passkey: hits / tries per haystack length",
                  f"{'config':<28}" + "".join(f"{n:>9}" for n in lengths)]
        for c in dict.fromkeys(k.config for k in keys):
            cells = []
            for n in lengths:
                rows = [k for k in keys if k.config == c and k.length == n]
                cells.append(f"{sum(k.correct for k in rows)}/{len(rows)}")
            lines.append(f"{c:<28}" + "".join(f"{x:>9}" for x in cells))
    return "\n".join(lines)


def plot(recalls: list[RecallRow], keys: list[PasskeyTrial], path, window: int | None = None,
         title: str | None = None) -> None:
    """Recall vs distance (log axis) for every configuration; a passkey heatmap per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r.config for r in recalls))
    key_configs = list(dict.fromkeys(k.config for k in keys))
    cols = max(1, min(4, len(key_configs)))
    rows = 1 + math.ceil(len(key_configs) / cols)
    fig = plt.figure(figsize=(4 * max(cols, 3), 3.6 * rows))
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    for c in configs:
        rs = sorted((r for r in recalls if r.config == c), key=lambda r: r.distance)
        ax.plot([r.distance for r in rs], [r.recall for r in rs], marker="o", label=c)
    if window:
        ax.axvline(window, color="grey", ls=":", lw=1)
        ax.text(window, 1.02, " W", color="grey", va="bottom")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    distances = sorted({r.distance for r in recalls})
    ax.set_xscale("log")
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.minorticks_off()
    ax.set(xlabel="distance D (tokens between the span and its repeat)",
           ylabel="recall (share of dense NLL drop)", title="copy probe", ylim=(-0.15, 1.15))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    acc = passkey_table(keys)
    lengths = sorted({k.length for k in keys})
    depths = sorted({k.depth for k in keys})
    for n, c in enumerate(key_configs):
        sub = fig.add_subplot(grid[1 + n // cols, n % cols])
        data = [[acc.get((c, length, d), float("nan")) for length in lengths] for d in depths]
        sub.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        sub.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        sub.set_yticks(range(len(depths)), [f"{d:.1f}" for d in depths])
        sub.set(xlabel="haystack tokens", ylabel="depth", title=f"passkey: {c}")
        for y, row in enumerate(data):
            for x, v in enumerate(row):
                sub.text(x, y, f"{v:.0%}" if v == v else "", ha="center", va="center", color="w", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- `swa-patch eval retrieval` ------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def add_cli(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="long-range quality probes",
                               description="Evaluations of what a window keeps and forgets.")
    sub = ev.add_subparsers(dest="evaluation", required=True)
    p = sub.add_parser("retrieval", help="copy and passkey probes: dense vs window configurations",
                       description="Copy probe (recall vs distance, effective reach) and passkey probe "
                       "(accuracy per haystack length and depth) on one model under several "
                       "configurations; prints a table, writes a CSV and a PNG.")
    from .models import add_source_args
    add_source_args(p)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4, help="sinks of configurations with '+sinks'")
    p.add_argument("--compare", default="dense,window,sinks,sinks+full-layers:4,sinks+decode-full",
                   help="comma-separated configurations: 'dense' or '+'-joined parts of "
                        f"{','.join(FEATURES)} ('window' windows every layer, 'native' keeps the model's own "
                        "global layers full; e.g. sinks:16+decode-full)")
    p.add_argument("--distances", default=None, help="comma-separated D (default: W/4 .. 16W, doubling)")
    p.add_argument("--span", type=int, default=64, help="tokens of the copied span (default 64)")
    p.add_argument("--trials", type=int, default=8, help="copy trials per distance (default 8)")
    p.add_argument("--passkey-lengths", default="1024,2048,4096", help="haystack lengths ('' to skip)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--passkey-trials", type=int, default=1, help="tries per (length, depth)")
    p.add_argument("--passkey-boundary", choices=PASSKEY_BOUNDARIES, default="question",
                   help="decode='full' configurations: attend fully from the question (default) or from "
                        "the prompt end (only the answer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None, help="CSV path (default: beside --plot)")
    p.add_argument("--plot", default="retrieval.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    import os

    from .models import load_model, load_text

    configs = parse_configs(args.compare)
    if "dense" not in configs:      # else every recall is nan, and a reach read off nan would claim the longest D
        raise SystemExit(f"--compare: copy recall is a share of dense's NLL drop, so the list must include "
                         f"'dense'; got {args.compare!r}")
    distances = _int_list(args.distances) if args.distances else default_distances(args.window)
    lengths = _int_list(args.passkey_lengths) if args.passkey_lengths else []
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    text = load_text(args.text, dataset=args.dataset, split=args.split, column=args.column,
                     config=args.dataset_config)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    print(f"{args.model}: window {args.window}, sinks {args.sinks}; distances {distances}; "
          f"passkey lengths {lengths}; configurations {configs}")
    copies, keys, reach = compare(model, tokenizer, ids, configs, args.window, args.sinks, distances, args.span,
                                  trials=args.trials, passkey_lengths=lengths, depths=depths,
                                  passkey_trials=args.passkey_trials, seed=args.seed, backend=args.backend,
                                  progress=not args.no_progress, passkey_boundary=args.passkey_boundary)
    recalls = recall_table(copies)
    print(format_table(recalls, keys, reach))
    csv_path = args.csv or os.path.splitext(args.plot)[0] + ".csv"
    write_csv(csv_path, recalls, keys, reach)
    print(f"wrote {csv_path}")
    plot(recalls, keys, args.plot, args.window, f"{args.model}: window {args.window}, sinks {args.sinks}")
    print(f"wrote {args.plot}")
    return 0
