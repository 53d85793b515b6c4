"""The LoRA recipe end to end: ``accelerate launch`` with 2 CPU processes on a tiny random
Llama (saved with save_pretrained) and a small text file."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swa_patch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))
from data import load_texts, pack  # noqa: E402
from finetune_lora import load_recipe, build_parser, parse_args  # noqa: E402
from lora_targets import TARGETS, lora_targets  # noqa: E402


def _text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:24_000]


def _tiny_checkpoint(folder: Path, tie: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([_text()], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=tie, initializer_range=0.1, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def _launch(args: list[str], cwd: Path, processes: int = 2, config: str | None = None,
            ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    config = config or {1: "cpu_1proc.yaml", 2: "cpu_2proc.yaml"}[processes]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(RECIPES / "accelerate" / config), "--main_process_port", "0",
           str(RECIPES / "finetune_lora.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=170)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    _tiny_checkpoint(tmp / "base")
    (tmp / "train.txt").write_text(_text())
    common = ["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp / "base"),
              "--dataset", str(tmp / "train.txt"), "--eval-fraction", "0.1"]
    _launch([*common, "--output", str(tmp / "out"), "--merge"], tmp)
    return tmp, common


def test_two_process_run_learns_and_writes_everything(trained):
    tmp, _ = trained
    out = tmp / "out"
    rows = _metrics(out)
    assert rows[0]["config"]["window"] == 16
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert len(train) == 8 and sorted(evals) == [0, 4, 8]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.1, train
    assert evals[8] < evals[0] - 0.1, evals
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_4", "step_8"]
    (ranks,) = [r for r in rows if "ranks/world_size" in r]
    assert ranks["ranks/world_size"] == 2 and len(ranks["ranks/fingerprints"]) == 2   # two processes trained
    first, second = ranks["ranks/fingerprints"]
    assert first == second and any(abs(x) > 0 for x in first)                       # and hold the same weights
    assert (out / "adapter_config.json").is_file() and (out / "swa_patch.json").is_file()


def test_reloaded_adapter_gives_the_logged_eval_loss_and_merge_agrees(trained):
    tmp, _ = trained
    out = tmp / "out"
    model = swa_patch.from_pretrained(out).eval()
    settings = swa_patch.patch.patch_settings(model.get_base_model())
    assert (settings.window, settings.sinks) == (16, 2)
    from transformers import AutoTokenizer

    blocks = pack(load_texts(str(tmp / "train.txt")), AutoTokenizer.from_pretrained(out), 64)
    n_eval = math.ceil(len(blocks) * 0.1)
    held = torch.tensor(blocks.select(range(len(blocks) - n_eval, len(blocks)))["input_ids"])
    with torch.no_grad():
        logits = model(held).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), held[:, 1:],
                                             reduction="none").mean(-1).mean().item()
    logged = {r["step"]: r["eval/loss"] for r in _metrics(out) if "eval/loss" in r}[8]
    assert loss == pytest.approx(logged, abs=1e-5)
    merged = swa_patch.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(held).logits, logits, rtol=1e-4, atol=1e-4)


def test_resume_continues_from_the_saved_step(trained):
    tmp, common = trained
    out = tmp / "out"
    # a second run that starts from the first run's step-4 checkpoint
    _launch([*common, "--output", str(tmp / "resumed"), "--resume", str(out / "checkpoints" / "step_4")], tmp)
    first = {r["step"]: r["train/loss"] for r in _metrics(out) if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in _metrics(tmp / "resumed") if "train/loss" in r}
    assert sorted(again) == [5, 6, 7, 8]
    for s in again:
        assert again[s] == pytest.approx(first[s], abs=1e-4), (s, again, first)


def test_recipe_files_and_flags(tmp_path):
    parser = build_parser()
    for path in (RECIPES / "configs").iterdir():
        load_recipe(str(path), parser)          # every shipped recipe names only known flags
    bad = tmp_path / "bad.yaml"
    bad.write_text("windw: 8\n")
    with pytest.raises(SystemExit, match="unknown key 'windw'"):
        load_recipe(str(bad), parser)
    args = parse_args(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", "m",
                       "--dataset", "d", "--output", "o", "--window", "32"])
    assert (args.window, args.seq_len, args.sinks) == (32, 64, 2)     # CLI > file > defaults
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--dataset", "d", "--output", "o"])   # --window missing


def test_every_family_has_lora_targets_that_exist():
    from tests.models import FAMILY_CONFIGS, tiny_model

    assert set(TARGETS) == set(FAMILY_CONFIGS)
    for model_type in FAMILY_CONFIGS:
        names = {n.rsplit(".", 1)[-1] for n, _ in tiny_model(model_type).named_modules()}
        missing = set(lora_targets(model_type)) - names
        assert not missing, (model_type, missing)
    with pytest.raises(ValueError, match="--target-modules"):
        lora_targets("not_a_family")


def test_longlora_option_trains_tied_embeddings_and_norms(tmp_path):
    from accelerate import Accelerator

    from finetune_lora import load_model

    _tiny_checkpoint(tmp_path / "tied", tie=True)
    args = parse_args(["--model", str(tmp_path / "tied"), "--dataset", "d", "--output", "o", "--window", "8",
                       "--train-embeddings-norms"])
    _, model, _ = load_model(args, Accelerator(cpu=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trained_in_full = {n.split(".modules_to_save")[0].removeprefix("base_model.model.") for n in trainable
                       if ".modules_to_save." in n}
    layers = len(model.get_base_model().model.layers)
    assert trained_in_full == {"model.embed_tokens", "model.norm"} | {
        f"model.layers.{i}.{norm}" for i in range(layers) for norm in ("input_layernorm", "post_attention_layernorm")}
    assert any("lora_A" in n and "down_proj" in n for n in trainable)
    base = model.get_base_model()
    # the output head follows the trained copy of the input embeddings
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert swa_patch.patch.patch_settings(base).window == 8


# ---- distillation: the teacher is the same weights, adapter off, window off ----------------------
@pytest.mark.parametrize("longlora", [False, True])
def test_distill_teacher_is_the_original_model_and_alpha_zero_is_cross_entropy(tmp_path, longlora):
    """The teacher (adapter off, window off) is exactly the original model, also when the
    embeddings and norms are trained in full (LongLoRA: peft's modules_to_save, tied head)."""
    from accelerate import Accelerator

    from finetune_lora import distill_loss, lm_loss, load_model
    from transformers import AutoModelForCausalLM

    _tiny_checkpoint(tmp_path / "base", tie=longlora)
    args = parse_args(["--model", str(tmp_path / "base"), "--dataset", "d", "--output", "o", "--window", "8",
                       "--sinks", "2", "--distill", "--no-gradient-checkpointing"]
                      + (["--train-embeddings-norms"] if longlora else []))
    _, model, _ = load_model(args, Accelerator(cpu=True))
    for name, p in model.named_parameters():          # trained weights: student != teacher
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        want = original(ids).logits[:, :-1]
    seen = {}
    teacher_forward = model.forward

    def spy(*a, **kw):
        out = teacher_forward(*a, **kw)
        if not torch.is_grad_enabled():
            seen["teacher"] = out.logits[:, :-1].clone()
        return out
    model.forward = spy
    loss, ce, kl = distill_loss(model, model, ids, alpha=0.5, temperature=2.0)
    assert torch.equal(seen["teacher"], want)                       # adapter off, window off: exact
    assert kl > 0 and loss.requires_grad
    zero, _, _ = distill_loss(model, model, ids, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(zero, lm_loss(model, ids))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits[:, :-1], want)     # the student is windowed again


def test_distill_steps_move_the_student_to_the_teacher():
    from peft import LoraConfig, get_peft_model

    from finetune_lora import distill_loss
    from tests.models import tiny_model

    model = get_peft_model(swa_patch.patch_model(tiny_model("llama"), window=8, sinks=2),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 97, (4, 64), generator=torch.Generator().manual_seed(0))
    kls = []
    for _ in range(20):
        loss, _, kl = distill_loss(model, model, ids, alpha=1.0, temperature=2.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(kl.item())
    assert kls[-1] < 0.8 * kls[0] and all(b < a for a, b in zip(kls, kls[1:])), kls


@pytest.mark.parametrize("processes", [1, 2])
def test_distill_run_under_accelerate(tmp_path, processes):
    _tiny_checkpoint(tmp_path / "base")
    (tmp_path / "train.txt").write_text(_text())
    out = tmp_path / "out"
    proc = _launch(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp_path / "base"),
                    "--dataset", str(tmp_path / "train.txt"), "--eval-fraction", "0.1", "--distill",
                    "--distill-alpha", "0.7", "--temperature", "2.0", "--max-steps", "4", "--eval-every", "0",
                    "--save-every", "0", "--output", str(out)], tmp_path, processes)
    assert f"x{processes} sequences" in proc.stdout          # the recipe's own count of processes
    rows = [r for r in _metrics(out) if "train/loss" in r]
    assert len(rows) == 4
    for r in rows:                                          # the logged loss is the weighted sum
        assert r["train/loss"] == pytest.approx(0.7 * r["train/kl"] + 0.3 * r["train/ce"], rel=1e-4)
        assert r["train/kl"] > 0
    assert len([r for r in _metrics(out) if "eval/kl" in r]) == 2
    model = swa_patch.from_pretrained(out)
    assert swa_patch.patch.patch_settings(model.get_base_model()).window == 16


def test_fsdp_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    """accelerate applies FSDP only to accelerator processes: with the FSDP config on two CPU
    processes it would run plain DDP. The recipe says so instead of training unsharded."""
    _tiny_checkpoint(tmp_path / "base")
    (tmp_path / "train.txt").write_text(_text())
    proc = _launch(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp_path / "base"),
                    "--dataset", str(tmp_path / "train.txt"), "--output", str(tmp_path / "out")], tmp_path,
                   config="cpu_fsdp_2proc.yaml", ok=False)
    assert "asks for FSDP, but accelerate runs MULTI_CPU" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_packing_keeps_documents_apart(tmp_path):
    """--packing: position_ids restart after each EOS, so the patched attention runs each document
    alone and no token is predicted across a boundary; the loss of a packed block is the
    token-weighted loss of its documents, each through the model alone."""
    from finetune_lora import collate, lm_loss
    from tests.models import tiny_model

    batch = collate([{"input_ids": torch.tensor([5, 6, 2, 7, 8, 9, 2, 4])}], eos=2)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    model = swa_patch.patch_model(tiny_model("llama"), window=4, sinks=2, backend="sdpa")
    g = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.randint(3, 97, (1, n - 1), generator=g), torch.tensor([[2]])], 1) for n in (3, 6, 9)]
    batch = collate([{"input_ids": torch.cat(docs, 1)[0]}], eos=2)
    with torch.no_grad():
        packed = lm_loss(model, batch["input_ids"], batch["position_ids"])
        alone = sum(lm_loss(model, d) * (d.shape[1] - 1) for d in docs) / sum(d.shape[1] - 1 for d in docs)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)

    _tiny_checkpoint(tmp_path / "base")
    paragraphs = [p for p in _text().split("\n\n") if p.strip()]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    out = tmp_path / "out"
    _launch(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp_path / "base"),
             "--dataset", str(tmp_path / "train.jsonl"), "--eval-fraction", "0.1", "--packing", "--max-steps", "2",
             "--eval-every", "0", "--save-every", "0", "--output", str(out)], tmp_path, processes=1)
    rows = _metrics(out)
    assert rows[0]["config"]["packing"] is True
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any(math.isfinite(r["eval/loss"]) for r in rows if "eval/loss" in r)


def test_long_range_labels_are_the_answers_only():
    """lm_loss on a long-range batch is the cross-entropy of the answer tokens alone, and a model that
    decodes fully takes each row's prompt boundary from the batch."""
    from finetune_lora import collate, lm_loss
    from tests.models import tiny_model

    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 30:], labels[1, 25:] = ids[0, 30:], ids[1, 25:]
    batch = collate([{"input_ids": ids[i], "labels": labels[i], "prompt_length": torch.tensor(p)}
                     for i, p in enumerate((28, 20))])
    assert batch["prompt_lengths"].tolist() == [28, 20] and torch.equal(batch["labels"], labels)
    for decode in ("window", "full"):
        model = swa_patch.patch_model(tiny_model("llama"), window=8, sinks=2, decode=decode)
        extra = {"prompt_lengths": batch["prompt_lengths"]} if decode == "full" else {}
        with torch.no_grad():
            got = lm_loss(model, batch["input_ids"], labels=batch["labels"], **extra)
            logits = model(ids, **extra).logits[:, :-1]
        want = torch.cat([torch.nn.functional.cross_entropy(logits[0, 29:], ids[0, 30:], reduction="none"),
                          torch.nn.functional.cross_entropy(logits[1, 24:], ids[1, 25:], reduction="none")]).mean()
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, lm_loss(model, ids, **extra))           # not the all-token loss


def test_long_range_run_trains_the_plan_and_reloads_it(tmp_path):
    """--long-range-tasks with --plan and --decode plan: the run trains on the answers, logs, and the
    adapter reloads with the plan's per-head windows and full-decode heads."""
    from swa_patch.patch import layer_specs

    _tiny_checkpoint(tmp_path / "base")
    (tmp_path / "train.txt").write_text(_text())
    swa_patch.Plan(16, 2, [(1, 0)], [[0.1, 0.0], [0.9, 0.2]], 1).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    _launch(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp_path / "base"),
             "--dataset", str(tmp_path / "train.txt"), "--eval-fraction", "0.1", "--seq-len", "160",
             "--long-range-tasks", "copy,passkey", "--long-range-distances", "64", "--long-range-examples", "8",
             "--long-range-span", "16", "--plan", str(tmp_path / "plan.json"), "--decode", "plan",
             "--max-steps", "2", "--eval-every", "0", "--save-every", "0", "--output", str(out)], tmp_path,
            processes=1)
    rows = _metrics(out)
    assert rows[0]["config"]["long_range_tasks"] == "copy,passkey"
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    specs = layer_specs(swa_patch.from_pretrained(out))
    assert specs[0].kv_windows is None and specs[0].window == 16 and specs[1].kv_decode_full == (True, False)
    _launch(["--config", str(RECIPES / "configs" / "tiny_test.yaml"), "--model", str(tmp_path / "base"),
             "--dataset", str(tmp_path / "train.txt"), "--decode", "full", "--output", str(tmp_path / "bad")],
            tmp_path, processes=1, ok=False)
