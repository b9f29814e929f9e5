"""Runs inside the vLLM environment (benchmarks/peers.py setup --only vllm), started by bench_consumers.py.

    $TOOLKIT_PEERS/vllm/bin/python benchmarks/vllm_consumer.py JOBS.json RESULTS.json

JOBS: a list of {"folder", "dtype", "prompts": [[ids]], "new_tokens", "top_logprobs", "windows": [[ids]] or [],
"max_model_len", "kv_cache_dtype"}, one per model. RESULTS: per job, per prompt vLLM's greedy tokens (EOS ignored) with the top log-probabilities at each
step, and per window the summed NLL of tokens 1..L-1 from ``prompt_logprobs`` (the toolkit's formula) and its
count (or {"error"} for a model vLLM refused). Token ids in, token ids out: vLLM never tokenizes, so both sides see the same ids. Imports no toolkit code
(this environment has its own torch and transformers).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# vLLM CPU's W4A16 kernel (cpu_gemm_wna16, ISA "amx" for bfloat16) runs AMX tile instructions without asking Linux for
# them (arch_prctl ARCH_REQ_XCOMP_PERM); in a process that never asked, the first one kills the worker with SIGILL
# (exit code -4): every tiny model died so, at any size (hidden 96 to 576). SmolLM2 survived because something else in
# its worker asked first. Asked here, at import: multiprocessing's spawn re-imports this file in every process vLLM
# starts (as __mp_main__), its engine and worker included. False (and harmless) on a CPU without AMX.
torch.cpu._init_amx()


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=job["folder"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
              skip_tokenizer_init=True, enforce_eager=True, kv_cache_dtype=job.get("kv_cache_dtype", "auto"))
    greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True,
                            logprobs=job["top_logprobs"], detokenize=False)
    loaded = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], greedy, use_tqdm=False)
    generated = time.perf_counter()
    generations = [{"tokens": list(o.outputs[0].token_ids),
                    "top_logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
                   for o in outs]
    windows = []
    if job["windows"]:
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        for o in llm.generate([TokensPrompt(prompt_token_ids=w) for w in job["windows"]], scoring, use_tqdm=False):
            ids = o.prompt_token_ids
            # prompt_logprobs[i]: {token: Logprob} for position i, the actual token always among them; [0] is None
            nll = -sum(o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids)))
            windows.append({"nll": nll, "tokens": len(ids) - 1})
    # wall seconds of each phase, in the log: where a slow kernel (FP8's torch fallback) spends a run
    print(f"load {loaded - start:.0f} s, greedy {generated - loaded:.0f} s, "
          f"{len(windows)} windows {time.perf_counter() - generated:.0f} s", flush=True)
    del llm  # shuts its engine process down before the next model loads
    gc.collect()
    return {"dtype": job["dtype"], "kv_cache_dtype": job.get("kv_cache_dtype", "auto"), "generations": generations,
            "windows": windows}


JOB_MARK = "=== vllm_consumer job"  # bench_consumers.py cuts the log at these lines to find a job's root cause


def main(jobs_path: str, results_path: str) -> None:
    """Every job in one process: vLLM's import and start-up cost minutes on 2 busy cores."""
    results = []
    for i, job in enumerate(json.loads(Path(jobs_path).read_text())):
        print(f"{JOB_MARK} {i} {job['folder']}", flush=True)  # where this job's part of the log begins
        try:
            results.append(run_job(job))
        except Exception as err:  # one model vLLM cannot run must not hide the others' results
            results.append({"error": f"{type(err).__name__}: {err}".splitlines()[0]})
        Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main(*sys.argv[1:3])
