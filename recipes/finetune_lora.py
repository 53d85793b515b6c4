"""LoRA fine-tuning of a sliding-window-patched causal LM, through ``accelerate launch``.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/finetune_lora.py \\
        --model <id-or-path> --dataset <name-or-file> --window 4096 --sinks 4 \\
        --seq-len 16384 --output out/ [--max-steps N] [--config recipes/configs/<recipe>.yaml]

The model is patched (``swa_patch.patch_model``) before the adapters are attached, so every
training step runs the block-sparse band attention.  ``--distill`` trains on
``alpha * KL(teacher || student) + (1 - alpha) * CE``; the teacher is the same weights with
the adapter disabled and the window switched off (``swa_patch.original_attention``), so no
second copy of the model is held.  A ``--config`` file (YAML or JSON)
lists only what differs from the defaults below; command-line flags override it.
Outputs in ``--output``: the adapter (``swa_patch.from_pretrained(output)`` reloads it
patched), the tokenizer, ``checkpoints/step_N`` (``accelerator.save_state``; ``--resume``),
``logs/metrics.jsonl`` (plus any ``--log-with`` tracker) and, with ``--merge``, ``merged/``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_texts, pack  # noqa: E402
from long_range_data import TASKS as LONG_RANGE_TASKS  # noqa: E402
from long_range_data import long_range_examples  # noqa: E402
from lora_targets import embedding_and_norm_modules, lora_targets, modules_named  # noqa: E402
from tracking import JSONLTracker  # noqa: E402

logger = logging.getLogger("finetune_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML/JSON recipe file: keys are these flags (without --), values override defaults")
    g = p.add_argument_group("model and window")
    g.add_argument("--model", help="model id or folder")
    g.add_argument("--gguf-file", help="GGUF file inside --model (weights are dequantised)")
    g.add_argument("--window", type=int, help="keys each query sees, itself included")
    g.add_argument("--sinks", type=int, default=0, help="attention-sink tokens")
    g.add_argument("--dilation", type=int, default=1)
    g.add_argument("--attn-backend", default="auto", help="swa_patch backend (auto picks per call)")
    g.add_argument("--plan", help="a calibration plan (swa-patch calibrate, JSON): its per-KV-head windows and "
                   "sinks are trained (its window must equal --window)")
    g.add_argument("--decode", choices=["window", "full", "plan"], default="window",
                   help="full: every layer's answers attend every key; plan: only the plan's heads do (prompt "
                        "boundaries from the long-range data)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="local text / JSON-lines file or folder, or a datasets Hub name")
    g.add_argument("--dataset-config", help="Hub dataset configuration name")
    g.add_argument("--dataset-split", default="train")
    g.add_argument("--text-field", default="text")
    g.add_argument("--eval-dataset", help="held-out data (same forms as --dataset); default: a "
                   "--eval-fraction of the packed blocks")
    g.add_argument("--eval-fraction", type=float, default=0.05)
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per packed training sequence")
    g.add_argument("--long-range-tasks", help=f"train on tasks whose answer lies past the window, from "
                   f"{','.join(LONG_RANGE_TASKS)} (comma-separated; labels on the answers), built from the "
                   "training text and mixed with its running text")
    g.add_argument("--long-range-distances", help="comma-separated token distances from fact to answer "
                   "(default: 2W,4W, capped to fit --seq-len)")
    g.add_argument("--long-range-examples", type=int, default=512, help="training examples built")
    g.add_argument("--long-range-mix", type=float, default=0.5, help="share of them that are running text")
    g.add_argument("--long-range-span", type=int, default=32, help="tokens of a copied passage")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                   help="documents packed into a block attend only themselves: position_ids restart after "
                        "each EOS (the patched attention runs each document alone) and no token is "
                        "predicted across a document boundary")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", nargs="+", help="default: the family's attention + MLP projections")
    g.add_argument("--train-embeddings-norms", action=argparse.BooleanOptionalAction, default=False,
                   help="also train embeddings and norms in full (LongLoRA)")
    g = p.add_argument_group("distillation (teacher: the same weights, adapter off, window off)")
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="train on alpha * KL(teacher || student) + (1 - alpha) * CE")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KL term, in [0, 1]")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL term (> 0)")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--lr-scheduler", default="cosine", help="transformers scheduler name")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="default: the accelerate config's setting")
    g.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the CPU when no accelerator is present")
    g = p.add_argument_group("evaluation, checkpoints, logging, output")
    g.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (0: end only)")
    g.add_argument("--eval-batches", type=int, help="limit evaluation to this many batches")
    g.add_argument("--save-every", type=int, default=500, help="steps between save_state checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", help="a checkpoints/step_N folder, or 'latest' (in --output)")
    g.add_argument("--log-with", nargs="*", default=[], help="extra accelerate trackers (tensorboard, wandb, ...)")
    g.add_argument("--output", help="output folder")
    g.add_argument("--merge", action=argparse.BooleanOptionalAction, default=False,
                   help="also write a merged full checkpoint to OUTPUT/merged")
    return p


REQUIRED = ("model", "dataset", "window", "output")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_recipe(first.config, parser))
    args = parser.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k in REQUIRED if getattr(args, k) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    for name in ("seq_len", "window", "batch_size", "grad_accum", "lora_r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0 <= args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if not 0 <= args.distill_alpha <= 1:
        parser.error(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.decode == "plan" and not args.plan:
        parser.error("--decode plan needs --plan PATH")
    if args.decode != "window" and not args.long_range_tasks:
        parser.error(f"--decode {args.decode} trains answers that attend every key: it needs --long-range-tasks "
                     "(their prompt boundaries)")
    if args.long_range_tasks:
        tasks = args.long_range_tasks.split(",")
        if any(t not in LONG_RANGE_TASKS for t in tasks):
            parser.error(f"--long-range-tasks must be comma-separated from {','.join(LONG_RANGE_TASKS)}, "
                         f"got {args.long_range_tasks!r}")
        if not 0 <= args.long_range_mix < 1 or args.long_range_examples < 1:
            parser.error(f"--long-range-mix must be in [0, 1) and --long-range-examples >= 1, got "
                         f"{args.long_range_mix}, {args.long_range_examples}")
        if args.packing:
            parser.error("--packing and --long-range-tasks: the long-range examples are single documents")
    return args


def load_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    """A recipe file's keys (``seq-len`` or ``seq_len``), checked against the flags."""
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    known = {a.dest for a in parser._actions} - {"help", "config"}
    out = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise SystemExit(f"--config {path}: unknown key {key!r}; known: {sorted(known)}")
        out[dest] = value
    return out


# ---- model ------------------------------------------------------------------------------
def load_model(args, accelerator):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import swa_patch
    from swa_patch.compat import enable_activation_checkpointing

    load_kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    path = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_kwargs)
    text_config = model.config.get_text_config(decoder=True)
    if getattr(text_config, "attention_dropout", 0.0):
        logger.warning("setting attention_dropout %s -> 0.0 (swa_patch attention has no dropout)",
                       text_config.attention_dropout)
        text_config.attention_dropout = 0.0
    swa_patch.patch_model(model, **window_options(args), dilation=args.dilation, backend=args.attn_backend)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model_type = text_config.model_type
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules or lora_targets(model_type),
                      modules_to_save=modules_named(model, embedding_and_norm_modules(model_type))
                      if args.train_embeddings_norms else None,
                      # tied input/output embeddings stay tied when the embeddings are trained
                      ensure_weight_tying=bool(args.train_embeddings_norms
                                               and getattr(text_config, "tie_word_embeddings", False)))
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    accelerator.print(f"patched {model_type} with {swa_patch.patch.patch_settings(model.get_base_model())}; "
                      f"trainable {trainable:,} of {total:,} parameters")
    return tokenizer, model, load_kwargs


def window_options(args) -> dict:
    """``patch_model``'s window, sinks and decode for --window/--sinks, --plan and --decode."""
    import swa_patch
    if not args.plan:
        return {"window": args.window, "sinks": args.sinks, **({"decode": "full"} if args.decode == "full" else {})}
    plan = swa_patch.Plan.load(args.plan)
    if plan.window != args.window:
        raise SystemExit(f"--plan {args.plan!r} was calibrated for window {plan.window}, not --window {args.window}")
    options = plan.patch_options(decode=args.decode == "plan")
    return {**options, **({"decode": "full"} if args.decode == "full" else {})}


# ---- data -------------------------------------------------------------------------------
def long_range_data(args, tokenizer, blocks):
    """The long-range examples (recipes/long_range_data.py) built from the training ``blocks``' tokens only."""
    ids = [t for block in blocks["input_ids"] for t in block]
    distances = ([int(d) for d in args.long_range_distances.split(",")] if args.long_range_distances
                 else [d for d in (2 * args.window, 4 * args.window) if d <= args.seq_len - 2 * args.long_range_span]
                 or [args.seq_len - 2 * args.long_range_span])
    return long_range_examples(tokenizer, ids, args.seq_len, distances, args.long_range_tasks.split(","),
                               n=args.long_range_examples, mix_text=args.long_range_mix, span=args.long_range_span,
                               seed=args.seed).remove_columns(["task", "distance"])


def build_data(args, tokenizer, accelerator):
    with accelerator.main_process_first():
        blocks = pack(load_texts(args.dataset, args.dataset_config, args.dataset_split, args.text_field),
                      tokenizer, args.seq_len, args.text_field)
        if args.eval_dataset:
            train = blocks
            held = pack(load_texts(args.eval_dataset, args.dataset_config, args.dataset_split,
                                   args.text_field), tokenizer, args.seq_len, args.text_field)
        else:
            n_eval = math.ceil(len(blocks) * args.eval_fraction) if args.eval_fraction else 0
            train = blocks.select(range(len(blocks) - n_eval))
            held = blocks.select(range(len(blocks) - n_eval, len(blocks)))
        if len(train) and args.long_range_tasks:
            try:
                train = long_range_data(args, tokenizer, train)
            except ValueError as e:
                raise SystemExit(f"--long-range-*: {e}") from None
    if len(train) == 0:
        raise SystemExit(f"--dataset {args.dataset!r} packs into {len(blocks)} block(s) of --seq-len "
                         f"{args.seq_len} tokens, none left for training: lower --seq-len or add text")
    return train.with_format("torch"), held.with_format("torch")


def collate(rows, eos=None):
    """A batch of blocks; with ``eos`` (``--packing``) also their ``position_ids``; long-range
    examples bring their ``labels`` and ``prompt_lengths``."""
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows])}
    if eos is not None:
        batch["position_ids"] = document_positions(batch["input_ids"], eos)
    if "labels" in rows[0]:
        batch["labels"] = torch.stack([r["labels"] for r in rows])
        batch["prompt_lengths"] = torch.stack([r["prompt_length"] for r in rows])
    return batch


def document_positions(ids, eos: int):
    """Position of each token in its document ``[B, n]``: 0 at the start of the block and after
    each EOS (``data.pack`` ends every document with one), counting up from there."""
    starts = F.pad(ids[:, :-1] == eos, (1, 0), value=True)
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return index - torch.where(starts, index, 0).cummax(-1).values


def targets(ids, positions=None):
    """Labels: the tokens, with -100 where a document starts (nothing predicts it)."""
    return ids if positions is None else ids.masked_fill(positions == 0, -100)


# ---- loss -------------------------------------------------------------------------------
def lm_loss(model, ids, positions=None, labels=None, prompt_lengths=None):
    """Next-token cross-entropy, the model's own loss (``positions``: packed documents; ``labels``:
    the answers of long-range examples; ``prompt_lengths``: their boundaries, for a model that
    decodes fully)."""
    extra = {"prompt_lengths": prompt_lengths} if prompt_lengths is not None else {}
    return model(input_ids=ids, position_ids=positions, labels=targets(ids, positions) if labels is None else labels,
                 **extra).loss


def teacher_logits(teacher, ids, positions=None):
    """Next-token logits of the original model: ``teacher`` is the unwrapped peft model, run
    with its adapter disabled inside ``swa_patch.original_attention``: no second copy."""
    import swa_patch

    with torch.no_grad(), teacher.disable_adapter(), swa_patch.original_attention(teacher):
        return teacher(input_ids=ids, position_ids=positions).logits[:, :-1].float()


def kl_per_token(logits, target, temperature: float):
    """``T^2 * KL(softmax(target / T) || softmax(logits / T))`` per position, ``[B, n]``."""
    log_p = F.log_softmax(logits / temperature, -1)
    log_t = F.log_softmax(target / temperature, -1)
    return (log_t.exp() * (log_t - log_p)).sum(-1) * temperature ** 2


def distill_loss(model, teacher, ids, alpha: float, temperature: float, positions=None, labels=None,
                 prompt_lengths=None):
    """``alpha * KL(teacher || student) + (1 - alpha) * CE`` (token means), and both parts; the CE
    on ``labels`` where given (the KL on every token)."""
    target = teacher_logits(teacher, ids, positions)
    extra = {"prompt_lengths": prompt_lengths} if prompt_lengths is not None else {}
    logits = model(input_ids=ids, position_ids=positions, **extra).logits[:, :-1].float()
    labels = targets(ids, positions) if labels is None else labels
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
    kl = kl_per_token(logits, target, temperature).mean()
    return alpha * kl + (1 - alpha) * ce, ce.detach(), kl.detach()


# ---- loop -------------------------------------------------------------------------------
def evaluate(model, loader, accelerator, max_batches=None, teacher=None, temperature=1.0) -> dict:
    """Mean token loss over the held-out blocks (every block has the same length) and, with a
    ``teacher``, the mean KL from the original model (the distillation objective)."""
    model.eval()
    losses, kls = [], []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            ids, positions = batch["input_ids"], batch.get("position_ids")
            logits = model(input_ids=ids, position_ids=positions).logits[:, :-1].float()
            labels = targets(ids, positions)[:, 1:]
            per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            per_seq = per_token.sum(-1) / (labels != -100).sum(-1).clamp(min=1)
            losses.append(accelerator.gather_for_metrics(per_seq))
            if teacher is not None:
                kl = kl_per_token(logits, teacher_logits(teacher, ids, positions), temperature).mean(-1)
                kls.append(accelerator.gather_for_metrics(kl))
    model.train()
    mean = lambda xs: torch.cat(xs).mean().item() if xs else float("nan")
    return {"loss": mean(losses), **({"kl": mean(kls)} if teacher is not None else {})}


def log_rank_agreement(accelerator, params, step: int) -> None:
    """Every process's fingerprint of its trainable weights, gathered to the log: the number of
    processes that trained, and whether they hold the same weights (they must, under DDP)."""
    fingerprint = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum(),
                                            (p.detach().double().flatten()
                                             * torch.arange(p.numel(), device=p.device)).sum()])
                               for p in params]).flatten()
    gathered = accelerator.gather(fingerprint[None]).cpu()
    accelerator.log({"ranks/world_size": accelerator.num_processes,
                     "ranks/fingerprints": gathered.tolist()}, step=step)


def checkpoint_dirs(output: str) -> list[str]:
    root = os.path.join(output, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted(int(d.split("_")[1]) for d in os.listdir(root) if d.startswith("step_"))
    return [os.path.join(root, f"step_{s}") for s in steps]


def save_checkpoint(accelerator, args, step: int) -> None:
    path = os.path.join(args.output, "checkpoints", f"step_{step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
        for old in checkpoint_dirs(args.output)[:-args.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_path(args) -> str:
    if args.resume != "latest":
        path = args.resume
    else:
        found = checkpoint_dirs(args.output)
        if not found:
            raise SystemExit(f"--resume latest: no checkpoints in {args.output}/checkpoints")
        path = found[-1]
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise SystemExit(f"--resume {path!r}: not a checkpoint folder written by this recipe")
    return path


def main(argv=None):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    import swa_patch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cpu = args.cpu if args.cpu is not None else torch.accelerator.current_accelerator() is None
    accelerator = Accelerator(
        cpu=cpu, gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
        log_with=[JSONLTracker("metrics", os.path.join(args.output, "logs")), *args.log_with],
        project_dir=args.output, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
            and accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit(f"the accelerate config asks for FSDP, but accelerate runs {accelerator.distributed_type.value} "
                         "here (it applies FSDP only to accelerator processes, never on the CPU): training would "
                         "not be sharded. Use recipes/accelerate/cpu_2proc.yaml (DDP) on CPUs, fsdp.yaml on GPUs")
    set_seed(args.seed)
    tokenizer, model, load_kwargs = load_model(args, accelerator)
    train, held = build_data(args, tokenizer, accelerator)
    if args.packing and tokenizer.eos_token_id is None:
        raise SystemExit("--packing finds document boundaries at EOS tokens, but the tokenizer has no eos_token")
    collate_fn = functools.partial(collate, eos=tokenizer.eos_token_id if args.packing else None)
    train_dl = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True)
    eval_dl = DataLoader(held, batch_size=args.batch_size, collate_fn=collate_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    if len(train_dl) == 0:
        raise SystemExit(f"{len(train)} training blocks are fewer than --batch-size {args.batch_size} "
                         f"x {accelerator.num_processes} processes")
    steps_per_epoch = math.ceil(len(train_dl) / args.grad_accum)
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = get_scheduler(args.lr_scheduler, optimizer,
                              num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    accelerator.init_trackers("finetune_lora", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                       for k, v in vars(args).items()})
    step = 0
    if args.resume:
        path = resume_path(args)
        accelerator.load_state(path)
        with open(os.path.join(path, "trainer_state.json")) as f:
            step = json.load(f)["step"]
        accelerator.print(f"resumed from {path} at step {step}")
    accelerator.print(f"{len(train)} training / {len(held)} held-out blocks of {args.seq_len} tokens; "
                      f"{max_steps} steps of {args.batch_size}x{args.grad_accum}x{accelerator.num_processes} sequences")

    teacher = accelerator.unwrap_model(model) if args.distill else None

    def log_eval(at: int) -> None:
        result = evaluate(model, eval_dl, accelerator, args.eval_batches, teacher, args.temperature)
        loss = result["loss"]
        accelerator.log({"eval/loss": loss, "eval/perplexity": math.exp(loss),
                         **({"eval/kl": result["kl"]} if teacher is not None else {})}, step=at)
        accelerator.print(f"step {at} eval loss {loss:.4f} perplexity {math.exp(loss):.3f}"
                          + (f" kl {result['kl']:.4f}" if teacher is not None else ""))

    if step == 0 and len(held):
        log_eval(0)
    model.train()
    consumed = step * args.grad_accum                       # micro-batches per process so far
    epoch, skip = divmod(consumed, len(train_dl))
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * accelerator.num_processes
    running, count, tick = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    parts = {"ce": torch.zeros((), device=accelerator.device), "kl": torch.zeros((), device=accelerator.device)}
    while step < max_steps:
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip = 0
        for batch in loader:
            with accelerator.accumulate(model):
                answers = {"labels": batch.get("labels"),
                           "prompt_lengths": batch.get("prompt_lengths") if args.decode != "window" else None}
                if args.distill:
                    loss, ce, kl = distill_loss(model, teacher, batch["input_ids"], args.distill_alpha,
                                                args.temperature, batch.get("position_ids"), **answers)
                    parts["ce"] += ce
                    parts["kl"] += kl
                else:
                    loss = lm_loss(model, batch["input_ids"], batch.get("position_ids"), **answers)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.detach()
            count += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            now = time.perf_counter()
            train_loss = accelerator.reduce(running / count, "mean").item()
            metrics = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_per_step / (now - tick), "train/epoch": epoch}
            if args.distill:
                metrics.update({f"train/{k}": accelerator.reduce(v / count, "mean").item() for k, v in parts.items()})
                parts = {k: torch.zeros_like(v) for k, v in parts.items()}
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step}/{max_steps} loss {train_loss:.4f}"
                              + (f" (ce {metrics['train/ce']:.4f}, kl {metrics['train/kl']:.4f})" if args.distill else ""))
            running, count = torch.zeros((), device=accelerator.device), 0
            if len(held) and (step == max_steps or (args.eval_every and step % args.eval_every == 0)):
                log_eval(step)
            if step == max_steps or (args.save_every and step % args.save_every == 0):
                save_checkpoint(accelerator, args, step)
            tick = time.perf_counter()
            if step >= max_steps:
                break
        epoch += 1

    log_rank_agreement(accelerator, params, step)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    unwrapped = accelerator.unwrap_model(model)
    swa_patch.save_pretrained(unwrapped, args.output, base_load_kwargs=load_kwargs,
                              is_main_process=accelerator.is_main_process,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output)
        if args.merge:
            merged = unwrapped.merge_and_unload()
            merged.config.use_cache = True
            swa_patch.save_pretrained(merged, os.path.join(args.output, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output, "merged"))
    accelerator.end_training()
    accelerator.print(f"saved adapter to {args.output}" + (" and merged model to merged/" if args.merge else ""))


if __name__ == "__main__":
    main()
