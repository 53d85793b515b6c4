"""Long-range training examples from the user's own text, as a ``datasets.Dataset``.

Each example is ``seq_len`` tokens of the user's text with a task planted in it whose answer lies
``distance`` tokens past the fact it needs (distances are chosen past the window, so that a window
alone cannot see the fact when the answer is due), mixed with plain running text:

* ``copy``     — a ``span``-token passage of the text, repeated ``distance`` tokens later; the
                 repeat is the answer (every token but its first, which nothing announces);
* ``passkey``  — a 5-digit key planted ``distance`` tokens before the question that asks for it;
* ``multikey`` — ``keys`` numbers under random 4-letter names planted across the text; the question
                 asks for one of them, planted ``distance`` tokens before it;
* ``variable`` — a number bound to a variable ``distance`` tokens before the question, then passed
                 along a chain of ``hops`` assignments (RULER's variable tracking); the question asks
                 for the value of the chain's last variable;
* ``text``     — running text, every token a target (``mix_text`` of the examples).

Columns: ``input_ids`` and ``labels`` (``-100`` except on the answer; all tokens for ``text``),
``prompt_length`` (where the prompt ends: at the question, or the repeat, from which a
``decode="full"`` configuration attends every key; ``seq_len`` for running text, all prompt),
``task`` and ``distance``.  The text is the caller's training text: keep it
disjoint from calibration and evaluation text (the recipe records which it used).
"""
from __future__ import annotations

import random

TASKS = ("copy", "passkey", "multikey", "variable")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"
MULTIKEY_NEEDLE = " The special magic number for {name} is {key}. "
MULTIKEY_QUESTION = " What is the special magic number for {name}? The special magic number for {name} is"
VARIABLE_BIND = " VAR {name} = {key}. "
VARIABLE_HOP = " VAR {name} = VAR {source}. "
VARIABLE_QUESTION = " What is the value of VAR {name}? The value of VAR {name} is"


def long_range_examples(tokenizer, ids, seq_len: int, distances, tasks=TASKS, n: int = 256, mix_text: float = 0.5,
                        span: int = 32, keys: int = 4, hops: int = 2, seed: int = 0):
    """``n`` examples (``mix_text`` of them running text, the rest spread evenly over ``tasks`` x
    ``distances``) drawn from ``ids``, the token ids of the training text (1-D)."""
    from datasets import Dataset

    ids = [int(t) for t in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
    distances = _check(seq_len, distances, tasks, n, mix_text, span, keys, hops, len(ids))
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    n_text = round(n * mix_text)
    plan = [(t, d) for t in tasks for d in distances]
    rows = []
    for i in range(n):
        if i < n_text:
            start = rng.randrange(len(ids) - seq_len + 1)
            block = ids[start:start + seq_len]
            rows.append({"input_ids": block, "labels": block, "prompt_length": seq_len, "task": "text", "distance": 0})
            continue
        task, distance = plan[(i - n_text) % len(plan)]
        rows.append(BUILDERS[task](rng, encode, ids, seq_len, distance, span=span, keys=keys, hops=hops))
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def _check(seq_len, distances, tasks, n, mix_text, span, keys, hops, n_ids) -> list[int]:
    for name, value, low in (("seq_len", seq_len, 2), ("n", n, 1), ("span", span, 2), ("keys", keys, 1),
                             ("hops", hops, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    distances = sorted(set(int(d) for d in distances))
    if not distances or distances[0] < span or distances[-1] > seq_len - 2 * span:
        raise ValueError(f"distances must lie in [span, seq_len - 2 * span] = [{span}, {seq_len - 2 * span}] "
                         f"(room for the fact before and the answer after), got {distances}")
    if not 0 <= mix_text <= 1:
        raise ValueError(f"mix_text must be in [0, 1], got {mix_text}")
    if n_ids < seq_len + span:
        raise ValueError(f"the text has {n_ids} tokens; examples of seq_len {seq_len} need at least {seq_len + span}")
    return distances


def _example(task, distance, pieces, boundary: int) -> dict:
    """``pieces``: (token ids, is answer) in order; the answer's tokens are the labels.  The prompt
    ends where piece ``boundary`` begins (the question, or the repeat): from there a decode="full"
    configuration attends every key, as the probes' prompts do."""
    input_ids, labels, prompt_length = [], [], None
    for i, (tokens, answer) in enumerate(pieces):
        if i == boundary:
            prompt_length = len(input_ids)
        input_ids += tokens
        labels += tokens if answer else [-100] * len(tokens)
    return {"input_ids": input_ids, "labels": labels, "prompt_length": prompt_length, "task": task,
            "distance": distance}


def _filler(rng, ids, length: int) -> list[int]:
    start = rng.randrange(len(ids) - length + 1)
    return ids[start:start + length]


def _key(rng) -> str:
    return str(rng.randrange(10_000, 100_000))


def _name(rng) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))


def copy_example(rng, encode, ids, seq_len, distance, span, **_) -> dict:
    """[text][passage][text: distance - span][passage again]: the repeat starts ``distance`` after the original."""
    passage = _filler(rng, ids, span)
    between = _filler(rng, ids, distance - span)
    lead = _filler(rng, ids, seq_len - distance - span)
    return _example("copy", distance, [(lead, False), (passage, False), (between, False), (passage[:1], False),
                                       (passage[1:], True)], boundary=3)


def _with_facts(task, rng, encode, ids, seq_len, facts, question, answer) -> dict:
    """``seq_len`` tokens of running text with ``facts`` ((tokens, distance): the fact starts that many
    tokens before the question) planted in it, then ``question`` and ``answer``.  A fact that would
    overlap the one before goes right after it; the first fact is the one asked about, and the
    example's ``distance`` is where it really landed."""
    question, answer = encode(question), encode(answer)
    at_question = seq_len - len(question) - len(answer)
    text = _filler(rng, ids, max(1, at_question - sum(len(f) for f, _ in facts)))
    pieces, pos, used, asked = [], 0, 0, None
    for start, i, fact in sorted((at_question - d, i, f) for i, (f, d) in enumerate(facts)):
        start = max(start, pos)
        pieces += [(text[used:used + start - pos], False), (fact, False)]
        used, pos = used + start - pos, start + len(fact)
        asked = at_question - start if i == 0 else asked
    if pos > at_question:
        raise ValueError(f"seq_len {seq_len} is too short for this {task} example: its facts need {pos} tokens "
                         f"before the question at {at_question}")
    pieces += [(text[used:used + at_question - pos], False), (question, False), (answer, True)]
    return _example(task, asked, pieces, boundary=len(pieces) - 2)


def passkey_example(rng, encode, ids, seq_len, distance, **_) -> dict:
    key = _key(rng)
    return _with_facts("passkey", rng, encode, ids, seq_len,
                       [(encode(PASSKEY_NEEDLE.format(key=key)), distance)], PASSKEY_QUESTION, f" {key}.")


def multikey_example(rng, encode, ids, seq_len, distance, keys, **_) -> dict:
    names = set()
    while len(names) < keys:
        names.add(_name(rng))
    names = sorted(names)
    asked = rng.choice(names)
    values = {name: _key(rng) for name in names}
    question = MULTIKEY_QUESTION.format(name=asked)
    facts = [(encode(MULTIKEY_NEEDLE.format(name=name, key=values[name])), distance)
             for name in [asked, *(n for n in names if n != asked)]]
    far = seq_len - len(encode(question)) - len(encode(f" {values[asked]}."))   # the farthest a fact can start
    taken = [(distance - len(facts[0][0]), distance)]                            # (end, start) before the question
    for i, (fact, _) in enumerate(facts[1:], 1):
        for _ in range(100):    # the other keys anywhere else, overlapping no fact
            d = rng.randrange(len(fact), far + 1)
            if all(d - len(fact) >= start or d <= end for end, start in taken):
                taken.append((d - len(fact), d))
                facts[i] = (fact, d)
                break
        else:
            raise ValueError(f"seq_len {seq_len} leaves no room for {keys} keys beside one at distance {distance}")
    return _with_facts("multikey", rng, encode, ids, seq_len, facts, question, f" {values[asked]}.")


def variable_example(rng, encode, ids, seq_len, distance, hops, **_) -> dict:
    chain = []
    while len(chain) < hops + 1:
        name = _name(rng)
        if name not in chain:
            chain.append(name)
    key = _key(rng)
    facts = [(encode(VARIABLE_BIND.format(name=chain[0], key=key)), distance)]
    for i in range(1, hops + 1):     # each hop after the one before, all between the binding and the question
        facts.append((encode(VARIABLE_HOP.format(name=chain[i], source=chain[i - 1])), distance * (hops + 1 - i)
                      // (hops + 1)))
    return _with_facts("variable", rng, encode, ids, seq_len, facts,
                       VARIABLE_QUESTION.format(name=chain[-1]), f" {key}.")


BUILDERS = {"copy": copy_example, "passkey": passkey_example, "multikey": multikey_example,
            "variable": variable_example}
