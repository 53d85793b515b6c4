"""Text data through ``datasets``: a Hub name, or local text / JSON-lines files; tokenised,
separated by EOS and packed into blocks of ``seq_len`` tokens (the remainder is dropped)."""
from __future__ import annotations

import os
from itertools import chain

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".json", ".jsonl")


def load_texts(name: str, config: str | None = None, split: str = "train", text_field: str = "text"):
    """A ``datasets.Dataset`` with a ``text_field`` column.  ``name``: a local file, a folder of
    such files, or a dataset name on the Hub (where reachable)."""
    from datasets import load_dataset

    if os.path.exists(name):
        files = ([os.path.join(name, f) for f in sorted(os.listdir(name))] if os.path.isdir(name) else [name])
        if all(f.endswith(TEXT_SUFFIXES) for f in files):
            ds = load_dataset("text", data_files=files, sample_by="document", split="train")
        elif all(f.endswith(JSON_SUFFIXES) for f in files):
            ds = load_dataset("json", data_files=files, split="train")
        else:
            raise ValueError(f"--dataset {name!r}: local files must all be text ({', '.join(TEXT_SUFFIXES)}) "
                             f"or JSON lines ({', '.join(JSON_SUFFIXES)})")
        if split != "train":
            raise ValueError(f"--dataset-split {split!r}: a local file has only the 'train' split")
    else:
        ds = load_dataset(name, config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"--text-field {text_field!r} is not a column of {name!r} "
                         f"(columns: {ds.column_names})")
    return ds


def pack(ds, tokenizer, seq_len: int, text_field: str = "text", num_proc: int | None = None):
    """Tokenise, append EOS to every document, concatenate and cut into ``seq_len`` blocks:
    a dataset with one ``input_ids`` column of equal-length rows."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    def group(batch):
        flat = list(chain.from_iterable(batch["ids"]))
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, n, seq_len)]}

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                desc="tokenising")
    # each map batch of 1000 documents drops its last partial block (< seq_len tokens)
    return ds.map(group, batched=True, batch_size=1000, remove_columns=["ids"],
                  desc=f"packing into {seq_len}-token blocks")
