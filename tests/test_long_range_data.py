"""Long-range training examples (recipes/long_range_data.py): each task's answer is what the text
planted ``distance`` tokens before it says, the labels are the answer alone, the mix and the
spread over tasks and distances are what was asked, and bad arguments are named."""
from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
from long_range_data import TASKS, long_range_examples  # noqa: E402


class CharTokenizer:
    """One token per character (its code point): decoding is exact, so a test can read the text back."""
    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def text_ids(n=6000):
    words = "the river runs past old stone walls while people talk about the weather and work".split()
    return [ord(c) for c in " ".join(words[(i * 7) % len(words)] for i in range(n // 5))][:n]


def decode(tokens) -> str:
    return "".join(map(chr, tokens))


SEQ, DISTANCES = 700, (100, 400)


@pytest.fixture(scope="module")
def examples():
    return long_range_examples(CharTokenizer(), text_ids(), SEQ, DISTANCES, n=40, mix_text=0.2, span=24, keys=3,
                               hops=2, seed=1)


def test_shapes_labels_and_mix(examples):
    assert len(examples) == 40
    counts = {task: sum(t == task for t in examples["task"]) for task in (*TASKS, "text")}
    assert counts["text"] == 8 and all(counts[t] == 8 for t in TASKS)
    for row in examples:
        assert len(row["input_ids"]) == len(row["labels"]) == SEQ
        scored = [i for i, label in enumerate(row["labels"]) if label != -100]
        assert all(row["labels"][i] == row["input_ids"][i] for i in scored)
        if row["task"] == "text":
            assert len(scored) == SEQ and row["prompt_length"] == SEQ
        else:
            assert scored == list(range(scored[0], SEQ))                # the answer ends the example
            assert row["prompt_length"] <= scored[0]


def test_copy_repeats_the_passage_distance_tokens_later(examples):
    rows = [r for r in examples if r["task"] == "copy"]
    assert sorted({r["distance"] for r in rows}) == list(DISTANCES)
    for row in rows:
        ids, start, d = row["input_ids"], row["prompt_length"], row["distance"]
        assert ids[start:start + 24] == ids[start - d:start - d + 24]
        assert row["labels"].index(next(x for x in row["labels"] if x != -100)) == start + 1


def test_passkey_and_multikey_answers_are_the_fact_planted_at_the_distance(examples):
    for row in (r for r in examples if r["task"] in ("passkey", "multikey")):
        text, question = decode(row["input_ids"]), row["prompt_length"]
        answer = re.fullmatch(r" (\d{5})\.", decode(t for t in row["labels"] if t != -100)).group(1)
        fact = text[question - row["distance"]:]
        if row["task"] == "passkey":
            assert fact.startswith(f" The pass key is {answer}.") and text.count(answer) == 3
        else:
            name = re.search(r"magic number for (\w{4})\? ", text[question:]).group(1)
            assert fact.startswith(f" The special magic number for {name} is {answer}.")
            assert len(re.findall(r"special magic number for \w{4} is \d{5}", text[:question])) == 3
        assert row["distance"] in DISTANCES


def test_variable_chain_leads_from_the_question_to_the_bound_number(examples):
    for row in (r for r in examples if r["task"] == "variable"):
        text, question = decode(row["input_ids"]), row["prompt_length"]
        answer = decode(t for t in row["labels"] if t != -100).strip(" .")
        name = re.search(r"value of VAR (\w{4})\?", text[question:]).group(1)
        hops = dict(re.findall(r"VAR (\w{4}) = VAR (\w{4})\.", text[:question]))
        while name in hops:
            name = hops[name]
        bound = re.search(rf" VAR {name} = (\d{{5}})\. ", text[:question])
        assert bound.group(1) == answer and bound.start() == question - row["distance"]
        assert len(hops) == 2


def test_same_seed_same_examples_other_seed_others():
    make = lambda seed: long_range_examples(CharTokenizer(), text_ids(), 400, [100], n=6, span=16, seed=seed)
    assert make(3)["input_ids"] == make(3)["input_ids"]
    assert make(3)["input_ids"] != make(4)["input_ids"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(distances=[10]), r"distances must lie in \[span, seq_len - 2 \* span\] = \[32, 336\]"),
    (dict(distances=[337]), r"distances must lie in"),
    (dict(tasks=["copy", "summary"]), r"tasks must be a non-empty subset of"),
    (dict(mix_text=1.5), r"mix_text must be in \[0, 1\]"),
    (dict(span=1), r"span must be an int >= 2"),
    (dict(ids=list(range(300))), r"the text has 300 tokens; examples of seq_len 400 need at least 432"),
    (dict(seq_len=70, distances=[32], span=8, tasks=["passkey"]), r"too short for this passkey example"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(ids=text_ids(), seq_len=400, distances=[100], span=32, n=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        long_range_examples(CharTokenizer(), **args)
