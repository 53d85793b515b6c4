"""RULER (lm-eval's long-context tasks) as the outside judge: a model object, patched or not, runs
the tasks through its own ``generate()`` (``HFLM(pretrained=model)``), as a user's evaluation does.

Two traps of lm-eval 0.4.13 are handled here: RULER sizes its prompts with a tokenizer it loads by
name (``metadata["tokenizer"]``), so the model's own tokenizer is saved to a folder and that folder
is passed; and ``limit=N`` with several ``max_seq_lengths`` takes the first N samples of the first
length only, so each length is its own call.  Only the tasks whose data are generated offline run
here (:data:`OFFLINE_TASKS`); the essay and QA variants download data.

    swa-patch ruler --config sinks --window 256 --lengths 1024,2048,4096 --limit 30 --csv ruler.csv
"""
from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import asdict, dataclass

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


@dataclass
class RulerScore:
    config: str
    task: str
    length: int
    samples: int
    score: float           # mean of the per-sample scores (lm-eval's metric for this length)
    low: float             # Wilson 95 % interval of the mean (the scores are 0/1 for the NIAH tasks;
    high: float            # for partial-credit tasks, treated as a proportion)


def wilson_interval(hits: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``hits / n`` (not zero-width at 0/n or n/n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ruler(model, tokenizer, tasks=("niah_single_1",), lengths=(1024, 2048, 4096), limit: int = 30,
          config: str = "model", batch_size: int = 1) -> list[RulerScore]:
    """Score ``model`` (as it is: patched or not) on ``tasks`` at each of ``lengths`` tokens,
    ``limit`` samples per (task, length), through lm-eval's ``simple_evaluate`` and the model's own
    ``generate()``.  Returns one :class:`RulerScore` per (task, length)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = sorted(set(tasks) - set(OFFLINE_TASKS))
    if not tasks or unknown:
        raise ValueError(f"tasks must be among the offline RULER tasks {OFFLINE_TASKS}, got {unknown or tasks}")
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 256 for n in lengths):
        raise ValueError(f"lengths must be ints >= 256 (prompt tokens), got {lengths}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1 (samples per task and length), got {limit!r}")
    scores = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max(lengths) + 512)
        for length in lengths:
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True,
                                  metadata={"tokenizer": folder, "max_seq_lengths": [length]})
            for task in tasks:
                per_sample = [float(s[str(length)]) for s in out["samples"][task]]
                mean = sum(per_sample) / len(per_sample)
                scores.append(RulerScore(config, task, length, len(per_sample), mean,
                                         *wilson_interval(sum(per_sample), len(per_sample))))
    return scores


def write_csv(path, scores: list[RulerScore]) -> None:
    from .provenance import run_info
    extra = run_info()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*asdict(scores[0]), *extra])
        writer.writeheader()
        for score in scores:
            writer.writerow({**asdict(score), **extra})


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("ruler", help="RULER (lm-eval) through the patched model's generate()",
                              description="Run lm-eval's offline RULER tasks on a model under one or more "
                              "configurations (as in `swa-patch eval retrieval`, or 'plan:PATH' for a "
                              "calibrated plan); prints a table, writes a CSV.")
    p.add_argument("--model", default="smollm2-135m", help="alias 'smollm2-135m' or 'gemma3', a Hub id or a folder")
    p.add_argument("--compare", default="dense,sinks", help="comma-separated configurations")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--tasks", default="niah_single_1", help=f"comma-separated, from {','.join(OFFLINE_TASKS)}")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--limit", type=int, default=30, help="samples per task and length")
    p.add_argument("--csv", default=None)
    p.set_defaults(func=_run_cli)


def configure(model, name: str, window: int, sinks: int) -> None:
    """Patch ``model`` for configuration ``name`` (``plan:PATH``: a saved calibration plan)."""
    from .families import native_full_layers
    from .patch import patch_model
    from .retrieval import config_options
    config = model.config.get_text_config(decoder=True)
    options = config_options(name, window, sinks, config.num_hidden_layers, native_full_layers(config))
    if options is not None:
        patch_model(model, **options)


def _run_cli(args) -> int:
    from .models import load_model
    from .patch import unpatch_model
    model, tokenizer = load_model(args.model)
    scores = []
    for name in [c.strip() for c in args.compare.split(",") if c.strip()]:
        configure(model, name, args.window, args.sinks)
        try:
            scores += ruler(model, tokenizer, args.tasks.split(","), [int(n) for n in args.lengths.split(",")],
                            args.limit, config=name)
        finally:
            unpatch_model(model)
    print(f"{'config':<28} {'task':<16} {'length':>6} {'score':>6}  95 % interval")
    for s in scores:
        print(f"{s.config:<28} {s.task:<16} {s.length:>6} {s.score:>6.3f}  [{s.low:.3f}, {s.high:.3f}] (n={s.samples})")
    if args.csv:
        write_csv(args.csv, scores)
    return 0
