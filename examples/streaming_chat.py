"""A multi-turn chat that never runs out of memory: one bounded cache carried across
``generate()`` calls, so the conversation can go on forever while the KV memory stays at
``sinks + window`` tokens per layer (older turns slide out of view; the sinks stay).

    python examples/streaming_chat.py                      # interactive
    python examples/streaming_chat.py --script questions.txt   # one user turn per line

Each turn appends the user's message (ChatML, as SmolLM2 expects) to the same stream and
passes the whole conversation's ids with the cache: ``generate()`` feeds only the tokens the
cache has not seen (it slices by ``cache.get_seq_length()``, the stream length).
"""
from __future__ import annotations

import argparse
import sys

import torch

from swa_patch import make_cache, patch_model
from swa_patch.models import load_model
from swa_patch.streaming import cache_bytes


class StreamingChat:
    def __init__(self, model, tokenizer, window: int = 1020, sinks: int = 4, max_new_tokens: int = 200,
                 system: str = "You are a helpful assistant.", positions=None, **generate_kwargs):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.generate_kwargs = generate_kwargs or dict(do_sample=True, temperature=0.7, top_p=0.9)
        patch_model(model, window=window, sinks=sinks, positions=positions)
        self.cache = make_cache(model)
        self.ids = torch.empty(1, 0, dtype=torch.long)   # every token of the conversation (8 B each)
        self._append(f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")

    def _append(self, text: str):
        if text:
            new = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            self.ids = torch.cat([self.ids, new], dim=1)

    def turn(self, message: str) -> str:
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string")
        self._append(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), cache=self.cache,
                                  max_new_tokens=self.max_new_tokens, eos_token_id=end,
                                  pad_token_id=end, **self.generate_kwargs)
        reply_ids = out[:, self.ids.shape[1]:]
        self.ids = out
        if reply_ids[0, -1].item() != end:         # cut off by max_new_tokens: close the turn
            self._append("<|im_end|>")
        self._append("\n")
        return self.tokenizer.decode(reply_ids[0], skip_special_tokens=True).strip()

    @property
    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--script", default=None, help="a file with one user message per line")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    chat = StreamingChat(model, tokenizer, args.window, args.sinks, args.max_new_tokens)
    lines = open(args.script) if args.script else iter(lambda: input("you> "), None)
    try:
        for line in lines:
            if not line.strip():
                continue
            print(f"you> {line.strip()}" if args.script else "", end="\n" if args.script else "")
            print(f"bot> {chat.turn(line.strip())}")
            print(f"     [{chat.ids.shape[1]} tokens so far, KV cache {chat.kv_bytes / 2**20:.1f} MiB]",
                  file=sys.stderr)
    except (EOFError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
