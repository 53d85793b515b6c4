"""Run by :mod:`swa_patch.verify` with an interpreter that has vLLM (not swa_patch):
``python _vllm_driver.py JOB.json OUT.json``.  JOB: ``{"folder": ..., "prompts": [[ids...], ...],
"max_model_len": n}``; OUT: ``{"logprobs": [[logprob of token i given tokens < i, for i >= 1],
...], "vllm": version}``.  One checkpoint per process: vLLM keeps process-wide state (a second
MoE model in the same process failed to load)."""
import json
import os
import sys


def main(job_file: str, out_file: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine in this process: faster start
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(job_file) as f:
        job = json.load(f)
    llm = LLM(model=job["folder"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=job["max_model_len"], seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params)
    logprobs = [[out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]
                for out, ids in zip(outputs, job["prompts"])]
    with open(out_file, "w") as f:
        json.dump({"logprobs": logprobs, "vllm": vllm.__version__}, f)


if __name__ == "__main__":   # vLLM may spawn workers
    main(*sys.argv[1:3])
