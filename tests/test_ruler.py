"""RULER through lm-eval: the harness drives the patched model's own ``generate()`` (one call per
sample, prompts sized for the asked length by the model's own tokenizer), the score is lm-eval's
per-sample metric, and the interval is Wilson's."""
from __future__ import annotations

import pytest
import torch

from swa_patch import patch_model
from swa_patch.ruler import ruler, wilson_interval
from swa_patch.state import patch_state
from tests.models import tiny_model

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")


def word_tokenizer():
    """A word-level tokenizer (no download): RULER's instructions and digits, the rest <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ("a special magic number is hidden within the following text make sure to memorize it i will quiz "
             "you about afterwards grass green sky blue sun yellow here we go there and back again what for "
             "mentioned provided . , : ? ' \" -").split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words, *map(str, range(10))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def test_the_harness_runs_the_patched_models_generate(monkeypatch):
    tokenizer = word_tokenizer()
    model = patch_model(tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=2),
                        window=32, sinks=2)
    calls = []
    generate = type(model).generate

    def spy(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((ids.shape[-1], patch_state(self) is not None))
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(type(model), "generate", spy)
    scores = ruler(model, tokenizer, ["niah_single_1"], [384], limit=3, config="w32")
    assert len(calls) == 3 and all(patched for _, patched in calls)
    assert all(150 < n <= 384 - 128 for n, _ in calls), calls    # sized by our tokenizer (128 kept for the answer)
    (score,) = scores
    assert (score.config, score.task, score.length, score.samples) == ("w32", "niah_single_1", 384, 3)
    assert score.score == 0.0 and (score.low, score.high) == pytest.approx(wilson_interval(0, 3))


def test_wilson_interval_known_values():
    assert wilson_interval(30, 30) == pytest.approx((0.8865, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson_interval(0, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tasks=["niah_single_2"]), r"offline RULER tasks"),
    (dict(lengths=[100]), r"lengths must be ints >= 256"),
    (dict(limit=0), r"limit must be an int >= 1"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ruler(tiny_model("llama"), word_tokenizer(), **kwargs)
