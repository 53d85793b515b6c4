"""Which KV heads keep full attention: a plan chosen from scores on copies of the user's own
text, for ``patch_model(model, **plan.patch_options())``: retrieval scores (RazorAttention /
retrieval-head style, below) or the NLL a unit wins back (:func:`nll_scores`, NLL-guided selection
of heads or whole layers).

A *retrieval score* of a query head is the attention weight that queries of a repeated segment put
on the token that followed them in the first copy (the token a copy must produce next), averaged
over queries and trials; the segment is ``window + span`` tokens long, so every such source lies
past the window.  The model runs dense (unpatched), so the score says which heads reach far when
they may.  A KV head scores the maximum of its query heads (it must stay full if any of them
retrieves).  The plan keeps the ``budget`` highest-scoring KV heads full and windows every other.

Heads of layers the model itself trained with a window (``layer_types[i] == "sliding_attention"``,
Gemma 2/3's local layers) are never chosen: opened past that window the model degrades badly (see
``patch._warn_past_trained_windows``).  With ``length=``, the budget is a share of the full-attention
KV at that many tokens; what is left after the full heads widens the window of the next head and of
the windowed heads in its layer (the cache rolls a layer's windowed heads in one ring, as wide as
the widest: a head widened alone would cost its neighbours' memory and give them nothing).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROBE_NAME = "swa_patch_probe"
METHODS = ("retrieval", "nll")
UNITS = ("head", "layer")
TARGETS = ("copy", "text")
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("swa_patch_probe", default=None)


@dataclass
class Plan:
    """Which KV heads keep full attention.  ``full_heads``: ``(layer, kv_head)`` pairs; ``scores``:
    per layer, per KV head, the retrieval score the choice was made from."""
    window: int
    sinks: int
    full_heads: list[tuple[int, int]]
    scores: list[list[float | None]]                  # None: a head the plan may not open (a trained window)
    budget: float | int
    method: str = "retrieval"
    calibration: dict = field(default_factory=dict)    # where the calibration tokens came from
    wide_heads: list[tuple[int, int, int]] = field(default_factory=list)   # (layer, KV head, its wider window)

    def windows(self) -> list[list[int | None]]:
        """``window=`` for :func:`swa_patch.patch_model`: one entry per KV head of each layer."""
        full = set(map(tuple, self.full_heads))
        wide = {(layer, head): w for layer, head, w in self.wide_heads}
        return [[None if (layer, head) in full else wide.get((layer, head), self.window) for head in range(len(row))]
                for layer, row in enumerate(self.scores)]

    def kv_share(self, length: int) -> float:
        """Tokens the plan's KV heads keep at ``length`` tokens (sinks included) over what full
        attention keeps: the share of dense KV memory (one byte size for every head).  A layer's
        windowed heads roll in one ring as wide as the widest of them, so each keeps that many."""
        kept = 0
        for row in self.windows():
            rolling = [w for w in row if w is not None]
            kept += length * (len(row) - len(rolling)) + len(rolling) * min(length, max(rolling, default=0) + self.sinks)
        return kept / (length * sum(map(len, self.scores)))

    def patch_options(self, decode: bool = False) -> dict:
        """``patch_model`` options: the chosen heads full (``decode=False``), or every head windowed
        and the chosen heads decoding fully (``decode=True``: prefill stays windowed, and only the
        chosen heads' caches grow)."""
        if not decode:
            return {"window": self.windows(), "sinks": self.sinks}
        if self.wide_heads:
            raise ValueError("patch_options(decode=True) needs a plan of full heads only; this one widens "
                             f"{len(self.wide_heads)} heads' windows (calibrated with length=): use decode=False")
        heads = [[h for h, w in enumerate(row) if w is None] for row in self.windows()]
        return {"window": self.window, "sinks": self.sinks, "decode": heads}

    @property
    def full_share(self) -> float:
        """Full KV heads / all KV heads."""
        return len(self.full_heads) / sum(len(row) for row in self.scores)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "Plan":
        data = json.loads(Path(path).read_text())
        data["full_heads"] = [tuple(pair) for pair in data["full_heads"]]
        data["wide_heads"] = [tuple(item) for item in data.get("wide_heads", ())]
        return cls(**data)

    def __str__(self) -> str:
        layers = sorted({layer for layer, _ in self.full_heads})
        wide = "".join(f"; layer {layer} head {head} at window {w}" for layer, head, w in self.wide_heads)
        return (f"{len(self.full_heads)} of {sum(map(len, self.scores))} KV heads full "
                f"({100 * self.full_share:.1f} %), window {self.window} + {self.sinks} sinks elsewhere; "
                f"layers with a full head: {layers}{wide}")


class _Recorder:
    """Per layer, the summed retrieval weight of each query head and the number of trials."""

    def __init__(self, segment: int):
        self.segment, self.sums, self.counts = segment, {}, {}

    def observe(self, layer: int, query, key, scaling) -> None:
        m = self.segment
        q = query[0, :, m:2 * m - 1].float()                       # [H, m-1] the second copy's queries
        k = key[0].float().repeat_interleave(query.shape[1] // key.shape[1], dim=0)   # [H, 2m, D]
        logits = q @ k.transpose(-1, -2) * scaling                 # [H, m-1, 2m]
        t = torch.arange(m - 1, device=q.device)
        causal = torch.arange(k.shape[1], device=q.device)[None, :] <= (m + t)[:, None]
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        source = weights.gather(-1, (t + 1).view(1, -1, 1).expand(q.shape[0], -1, 1))[..., 0]   # [H, m-1]
        self.sums[layer] = self.sums.get(layer, 0) + source.mean(-1).cpu()
        self.counts[layer] = self.counts.get(layer, 0) + 1


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, after recording the retrieval weights of this layer."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    recorder = _RECORDER.get()
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if recorder is not None:
        recorder.observe(module.layer_idx, query, key, scaling)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)


@contextlib.contextmanager
def _probing(model):
    previous = model.config._attn_implementation
    _register_probe()
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def retrieval_scores(model, ids: torch.Tensor, window: int, span: int = 64, trials: int = 4,
                     seed: int = 0) -> torch.Tensor:
    """``[layers, query heads]`` retrieval scores of an unpatched ``model`` (see the module
    docstring) from ``trials`` segments of ``window + span`` tokens drawn from ``ids``."""
    from .state import patch_state
    if patch_state(model) is not None:
        raise ValueError("calibrate scores the model's own (dense) heads: pass the model before "
                         "patch_model, or unpatch_model it first")
    ids = _check_ids(ids, window, span)
    recorder = _Recorder(window + span)
    token = _RECORDER.set(recorder)
    training = model.training
    model.eval()                      # no dropout in the scores
    try:
        with _probing(model), torch.no_grad():
            for copies in copy_segments(ids, window + span, trials, seed):
                model(copies[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        _RECORDER.reset(token)
        model.train(training)
    return torch.stack([recorder.sums[layer] / recorder.counts[layer] for layer in sorted(recorder.sums)])


def copy_segments(ids: torch.Tensor, segment: int, trials: int, seed: int, repeat: bool = True) -> list[torch.Tensor]:
    """``trials`` random segments of ``segment`` tokens of ``ids``, each repeated once (``[2 * segment]``);
    ``repeat=False``: ``2 * segment`` tokens of running text instead, from the same starts."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(trials):
        start = int(torch.randint(0, ids.numel() - (2 - repeat) * segment + 1, (1,), generator=generator))
        out.append(torch.cat([ids[start:start + segment]] * 2) if repeat else ids[start:start + 2 * segment])
    return out


def nll_scores(model, ids: torch.Tensor, window: int, sinks: int, span: int = 64, trials: int = 4, seed: int = 0,
               unit: str = "head", target: str = "copy") -> torch.Tensor:
    """``[layers, KV heads]``: how much the copy's NLL (the second copy of each segment, every
    target past the window) drops when one unit alone keeps full attention and every other head
    is windowed (``window`` + ``sinks``); ``unit="layer"`` scores whole layers (each head of a layer
    gets the layer's score).  ``target="text"``: the NLL of the second half of ``2 * (window + span)``
    tokens of running text instead (what perplexity past the window asks of the heads, where a copy
    asks for exact retrieval).  Units the model trained with a window score NaN (never opened).
    One patched forward through the rolling cache per unit and segment."""
    from .compat import kv_heads
    from .patch import patch_model, unpatch_model
    from .state import patch_state
    if patch_state(model) is not None:
        raise ValueError("calibrate scores the model's own heads: pass the model before patch_model, "
                         "or unpatch_model it first")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    ids = _check_ids(ids, window, span, 1 if target == "copy" else 2)
    config = model.config.get_text_config(decoder=True)
    n_layers, n_kv = config.num_hidden_layers, kv_heads(config)
    segments = copy_segments(ids, window + span, trials, seed, repeat=target == "copy")
    closed = trained_windowed_layers(config)
    units = [u for u in ([(layer, head) for layer in range(n_layers) for head in range(n_kv)] if unit == "head"
                         else [(layer, None) for layer in range(n_layers)]) if u[0] not in closed]

    def copy_nll(full: tuple | None) -> float:
        windows = [[window] * n_kv for _ in range(n_layers)]
        if full is not None:
            layer, head = full
            windows[layer] = [None] * n_kv if head is None else [None if h == head else window for h in range(n_kv)]
        patch_model(model, window=windows, sinks=sinks)
        try:
            return sum(_second_half_nll(model, tokens) for tokens in segments) / len(segments)
        finally:
            unpatch_model(model)

    training = model.training
    model.eval()
    try:
        base = copy_nll(None)
        from tqdm.auto import tqdm
        gains = {u: base - copy_nll(u) for u in tqdm(units, desc="nll per unit", leave=False)}
    finally:
        model.train(training)
    return torch.tensor([[gains.get((layer, head if unit == "head" else None), float("nan")) for head in range(n_kv)]
                         for layer in range(n_layers)])


def trained_windowed_layers(config) -> set[int]:
    """Layers the model itself trained with a window (Gemma 2/3's local layers): never opened by a plan."""
    if not isinstance(getattr(config, "sliding_window", None), int):
        return set()
    return {i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind == "sliding_attention"}


@torch.no_grad()
def _second_half_nll(model, tokens: torch.Tensor) -> float:
    """NLL of the second half of ``tokens``, streamed through the patched model's rolling cache as
    it will run (its default positions: StreamingLLM's shifted ones with sinks).  A cacheless
    forward would put the sinks at their original distance, which a layer trained with a window
    (Gemma 3's local layers) never saw: it scores a model nobody runs."""
    from .generation import make_cache
    half = tokens.numel() // 2
    device = next(model.parameters()).device
    logits = model(tokens[None].to(device), cache=make_cache(model), use_cache=True,
                   logits_to_keep=half + 1).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, tokens[half:].to(device)).item()


def calibrate(model, ids: torch.Tensor, window: int, sinks: int = 4, budget: float | int = 0.1,
              method: str = "retrieval", unit: str = "head", span: int = 64, trials: int = 4, seed: int = 0,
              source: str | None = None, target: str = "copy", length: int | None = None) -> Plan:
    """Choose which KV heads keep full attention under ``window`` + ``sinks``: the ``budget``
    (a share of all KV heads in (0, 1], or a count) with the highest scores.  ``method``:
    ``"retrieval"`` (attention on the copy source, one dense forward per segment: seconds) or
    ``"nll"`` (the drop of the copy's NLL when the unit alone is full: one patched forward per unit
    and segment; ``target="text"`` scores running text instead of copies); ``unit="layer"`` (``nll``
    only) keeps whole layers, ``budget // KV heads`` of them.  ``length``: a share ``budget`` is of
    the full-attention KV at ``length`` tokens instead (sinks and windows count): the best heads go
    full while they fit, and what is left widens the window of the next head and of the windowed
    heads sharing its layer's ring.  Heads of layers the model
    trained with a window are never chosen.  ``ids``: calibration tokens (1-D, or ``[1, n]``) from
    the user's own text, never the evaluation's; ``source`` names them in the plan.  The model must
    be unpatched; it is left as it was."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if unit not in UNITS or (unit == "layer" and method != "nll"):
        raise ValueError(f"unit must be 'head', or 'layer' with method='nll'; got unit={unit!r}, method={method!r}")
    if target not in TARGETS or (target == "text" and method != "nll"):
        raise ValueError(f"target must be 'copy', or 'text' with method='nll'; got target={target!r}, method={method!r}")
    from .config import _check_int
    _check_int("window", window, 1)
    _check_int("sinks", sinks, 0)
    _check_int("span", span, 1)
    _check_int("trials", trials, 1)
    if length is not None:
        _check_int("length", length, window + sinks + 1)
        if not isinstance(budget, float) or not 0 < budget <= 1:
            raise ValueError(f"length= makes budget a share of the full-attention KV at length tokens: give a float "
                             f"in (0, 1], got {budget!r}")
    config = model.config.get_text_config(decoder=True)
    from .compat import kv_heads
    n_heads, n_kv = config.num_attention_heads, kv_heads(config)
    total = config.num_hidden_layers * n_kv
    count = total if length is not None else _budget_count(budget, total)
    per_unit = n_kv if unit == "layer" else 1
    if count < per_unit:
        raise ValueError(f"budget keeps {count} KV heads full, less than one layer ({n_kv} KV heads)")
    ids = _check_ids(ids, window, span, 1 if target == "copy" else 2)
    if method == "retrieval":
        scores = retrieval_scores(model, ids, window, span, trials, seed)       # [L, H]
        per_kv = scores.view(scores.shape[0], n_kv, n_heads // n_kv).amax(-1)   # [L, Hkv]
        per_kv[sorted(trained_windowed_layers(config))] = float("nan")
    else:
        per_kv = nll_scores(model, ids, window, sinks, span, trials, seed, unit, target)
    flat = per_kv[:, 0] if unit == "layer" else per_kv.flatten()
    order = [int(i) for i in torch.argsort(torch.nan_to_num(flat, nan=float("-inf")), descending=True, stable=True)
             if not torch.isnan(flat[i])]                                  # NaN: a layer with a trained window
    units = [[(i, h) for h in range(n_kv)] if unit == "layer" else [divmod(i, n_kv)] for i in order]
    if length is None:
        if count // per_unit > len(units):
            raise ValueError(f"budget asks for {count // per_unit} full {unit}s, but only {len(units)} may be opened: "
                             f"layers {sorted(trained_windowed_layers(config))} were trained with a window")
        full, wide = sorted(h for u in units[:count // per_unit] for h in u), []
    else:
        full, wide = _fit(units, n_kv, window, sinks, length,
                          budget * length * total - total * min(length, window + sinks))
    label = "/".join([method] + ["layer"] * (unit == "layer") + [target] * (target != "copy"))
    return Plan(window, sinks, full, [[None if s != s else round(float(s), 6) for s in row] for row in per_kv], budget,
                method=label,
                calibration={"source": source, "tokens": int(ids.numel()), "segment": window + span, "trials": trials,
                             "seed": seed, **({"length": length} if length is not None else {})},
                wide_heads=wide)


def _fit(units: list[list[tuple[int, int]]], n_kv: int, window: int, sinks: int, length: int, spare: float):
    """Open ``units`` (best first; each a list of KV heads) in full while the ``spare`` tokens (over
    every head keeping ``window + sinks``) pay for it; the rest of ``spare`` widens the next unit's
    layer: every head of it not full, since they share one ring.  Returns (full heads, [(layer, head, window)])."""
    full, wide, extra = [], [], length - min(length, window + sinks)
    for heads in units:
        if extra * len(heads) <= spare:
            full += heads
            spare -= extra * len(heads)
            continue
        layer = heads[0][0]
        ring = [(layer, h) for h in range(n_kv) if (layer, h) not in full]
        grow = int(spare // len(ring))
        if grow > 0:
            wide = [(layer, head, window + grow) for layer, head in ring]
        break
    return sorted(full), sorted(wide)


def _budget_count(budget, total: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a share of the KV heads in (0, 1] or a count of heads (an int in "
                        f"1..{total}), got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"budget as a share must be in (0, 1], got {budget}")
        return max(1, round(budget * total))
    if not 1 <= budget <= total:
        raise ValueError(f"budget as a count must be in 1..{total} (the model's KV heads), got {budget}")
    return budget


def _check_ids(ids, window: int, span: int, segments: int = 1) -> torch.Tensor:
    if not torch.is_tensor(ids) or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"ids must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D or [1, n], got shape {tuple(ids.shape)}")
    if ids.numel() < segments * (window + span):
        need = "window + span" if segments == 1 else f"{segments} * (window + span)"
        raise ValueError(f"ids has {ids.numel()} tokens; calibration needs at least {need} = "
                         f"{segments * (window + span)} (one segment)")
    return ids.long()


def add_cli(subparsers) -> None:
    c = subparsers.add_parser("calibrate", help="choose which KV heads keep full attention",
                              description="Score every KV head's retrieval past the window on copies of "
                              "your text and write a plan (JSON) of the budget's best heads.")
    c.add_argument("--model", default="smollm2-135m", help="alias 'smollm2-135m', a Hub id or a local folder")
    c.add_argument("--window", type=int, required=True)
    c.add_argument("--sinks", type=int, default=4)
    c.add_argument("--budget", type=float, default=0.1, help="share of KV heads kept full (0, 1]; >= 1: a count")
    c.add_argument("--text", default=None, help="calibration text file (default: the embedded text)")
    c.add_argument("--method", choices=METHODS, default="retrieval")
    c.add_argument("--unit", choices=UNITS, default="head", help="layer: whole layers (--method nll)")
    c.add_argument("--target", choices=TARGETS, default="copy",
                   help="text: score by running text's NLL past the window (--method nll) instead of copies")
    c.add_argument("--length", type=int, default=None,
                   help="--budget is a share of the full-attention KV at this many tokens; the rest widens a window")
    c.add_argument("--skip", type=int, default=0,
                   help="leave out the text's first SKIP tokens (e.g. the part you evaluate on)")
    c.add_argument("--trials", type=int, default=4)
    c.add_argument("--out", required=True, help="where to write the plan (JSON)")
    c.set_defaults(func=_calibrate_cli)


def _calibrate_cli(args) -> int:
    from .config import _check_int
    from .models import load_model, load_text
    _check_int("--skip", args.skip, 0)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(load_text(args.text), return_tensors="pt").input_ids[0, args.skip:]
    budget = int(args.budget) if args.budget >= 1 and args.length is None else args.budget
    source = (args.text or "embedded text") + (f", from token {args.skip}" if args.skip else "")
    plan = calibrate(model, ids, args.window, args.sinks, budget, method=args.method, unit=args.unit,
                     trials=args.trials, source=source, target=args.target, length=args.length)
    plan.save(args.out)
    print(plan)
    return 0
