"""Each deployment artifact in the engine that serves it: perplexity under the default protocol and decode speed.

GGUF files run in llama.cpp (llama-cpp-python), compressed-tensors folders in transformers (with the
compressed-tensors package installed), toolkit models in PyTorch (the reference perplexity). Perplexity
uses the toolkit's windows (``toolkit.data``: 16 x 512 tokens of the pydoc evaluation half, tokenized once
by the model's tokenizer, so every engine scores the same ids) and its formula (mean NLL of tokens 1..L-1,
each window alone). Decode: prompt 256 tokens, 128 new tokens, greedy, 2 threads; systems interleaved
in ``--rounds`` rounds, each round loading every GGUF afresh; medians, and the per-round ratio of the first
two GGUFs (processes on shared machines vary by 10-20 %, so compare ratios from one run).

    .venv/bin/python benchmarks/bench_consumers.py \
        --gguf ours=runs/smollm2-int4-gptq-gguf/export/model.gguf \
        --quantize-q4_0 llama.cpp-Q4_0=runs/smollm2-fp32-gguf/export/model.gguf \
        --compressed-tensors ct=runs/smollm2-int4-gptq-compressed-tensors/export \
        --torch toolkit=runs/smollm2-int4-gptq/model --report out/consumers.json

vLLM (CPU build, its own environment: ``benchmarks/peers.py setup --only vllm``) as a consumer of compressed-tensors
and ModelOpt exports: ``--vllm LABEL=FOLDER`` (a model of ``--tokenizer``, e.g. recipes smollm2-int4-rtn-compressed-
tensors, smollm2-w8a8-smoothquant, smollm2-fp8-dynamic, smollm2-fp8-modelopt; each scheme in the dtype
``VLLM_DTYPE`` gives) and ``--vllm-tiny FAMILY ...`` (tiny seeded models of those families, exported here as W4A16
and W8A8 int8, ``--vllm-tiny-schemes``). vLLM's log is kept in ``WORKDIR/vllm.log``; a model it refuses is reported
with the root cause found there. vLLM
runs ``vllm_consumer.py`` in a subprocess on token ids: greedy tokens over 3 chat prompts x 32 tokens (EOS ignored)
are compared with ours (the first divergence, and the logit margin there on both sides), and for ``--vllm`` the
perplexity from ``prompt_logprobs`` on the same windows. Ours is the toolkit's model for tiny families and, for
folders, the float32 model the exporter's self-check reads back (``our_reading``: activations quantized as the
folder says; equal to the toolkit's model: tests/interop/test_export_compressed_tensors.py).

    .venv/bin/python benchmarks/bench_consumers.py --vllm smollm2-w4a16=runs/smollm2-int4-rtn-compressed-tensors/export \
        --vllm-tiny llama qwen3 phi3 gemma3 --report out/consumers-vllm.json

``--quantize-q4_0 LABEL=F32_GGUF`` makes llama.cpp's own Q4_0 (``llama_model_quantize``, its round-to-nearest;
it keeps a tied embedding at Q8_0, its default) from a float GGUF (recipe ``smollm2-fp32-gguf.yaml``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

HERE = Path(__file__).resolve().parent

QUESTION = "What is the capital of France?"
# short factual chat questions and a pattern the right answer contains (greedy, 40 tokens): a coarse check that
# quantization kept the instruct model answering; the float SmolLM2 misses some of them too
PROBES = ((QUESTION, r"paris"), ("How many legs does a spider have?", r"\b8\b|eight"), ("What is 2 + 2?", r"\b4\b|four"),
          ("What color is the sky on a clear day?", r"blue"),
          ("What is the largest planet in our solar system?", r"jupiter"), ("Who wrote Romeo and Juliet?", r"shakespeare"),
          ("At what temperature in Celsius does water boil at sea level?", r"\b100\b"),
          ("How many days are in a week?", r"\b7\b|seven"), ("What language is spoken in Spain?", r"spanish"),
          ("What is the chemical formula of water?", r"h2o|h₂o"))


def labelled(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        label, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=PATH, got {v!r}")
        out.append((label, Path(path)))
    return out


def windows(tokenizer_source: str, count: int, length: int) -> torch.Tensor:
    from toolkit import data, models
    from toolkit.data import WindowSpec

    tokenizer = models.load_tokenizer(models.resolve(tokenizer_source))
    return data.token_windows(tokenizer, WindowSpec("pydoc", "evaluation", length, count, "sequential", 0))


def nll_of(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of tokens 1..L-1 from ``logits [L, V]`` (the toolkit's formula)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[1:].unsqueeze(-1)).sum()), ids.numel() - 1


def gguf_perplexity(path: Path, wins: torch.Tensor, threads: int) -> float:
    from llama_cpp import Llama

    length = wins.shape[1]
    llm = Llama(model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                n_threads=threads, verbose=False)
    total, count = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w.tolist())
        s, n = nll_of(torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32)), w)
        total, count = total + s, count + n
    llm.close()
    return math.exp(total / count)


def gguf_speed(path: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    n_ctx = len(prompt) + new_tokens + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, verbose=False)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = time.perf_counter() - start
    llm.close()
    return {"prefill_ms": prefill * 1000, "decode_tok_s": new_tokens / decode}


def gguf_answers(path: Path, threads: int) -> dict[str, Any]:
    """Greedy chat answers to ``PROBES`` through the GGUF's own chat template; how many contain the right word."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    answers = []
    for question, _ in PROBES:
        reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=40, temperature=0.0)
        answers.append(str(reply["choices"][0]["message"]["content"]).strip())
    llm.close()
    right = sum(bool(re.search(p, a.lower())) for (_, p), a in zip(PROBES, answers, strict=True))
    return {"answer": answers[0], "probe_answers": answers, "probe_right": right}


def quantize_q4_0(source: Path, out: Path, threads: int) -> Path:
    import llama_cpp

    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    tmp = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")
    return tmp.replace(out)


def hf_perplexity(folder: Path, wins: torch.Tensor, compressed: bool) -> dict[str, Any]:
    from toolkit.evaluation import perplexity

    if compressed:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        from toolkit.quant import checkpoint

        model = checkpoint.load_model(folder)
    return {"perplexity": perplexity.evaluate(model, wins)["perplexity"]}


# checkpoint scheme -> the dtype vLLM's CPU kernels compute it in. The compressed-tensors ``format`` names the scheme;
# a ModelOpt checkpoint is named by its quant_method. W4A16 (pack-quantized): its CPU kernel takes uint4 / uint4b8 in
# bfloat16 only (float32 fails). W8A8 int8 (int-quantized): on a CPU with AMX it runs int8_scaled_mm_with_quant,
# which takes bfloat16 or half activations only (float32: "expect A to be bfloat16 or half"). FP8 (float-quantized,
# modelopt): vLLM CPU's fp8 kernels need AMX and write bfloat16 or float32; bfloat16 like the others (per-channel
# dynamic FP8 runs on its torch fallback, which also takes float32: --vllm-dtype float32). Static per-tensor
# FP8 on CPU (vLLM 0.32): ModelOpt FP8 runs as W8A16 (CPUFp8PerTensorScaledMMLinearKernel leaves the inputs in
# bfloat16, so the checkpoint's input scales are not applied: not the model the checkpoint describes), and
# compressed-tensors' FP8 preset fails at engine start (its CPU build has no static_scaled_fp8_quant).
VLLM_DTYPE = {"pack-quantized": "bfloat16", "int-quantized": "bfloat16", "float-quantized": "bfloat16",
              "modelopt": "bfloat16"}
VLLM_PROMPTS = 3
VLLM_TOP = 5  # log-probabilities vLLM returns per step: enough to find our token at a divergence


def vllm_dtype(folder: Path) -> str:
    """The dtype vLLM runs ``folder`` in, from its checkpoint's scheme; refused before any work."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{folder} has no config.json: give the export folder of a compressed-tensors or "
                         "ModelOpt recipe")
    quant = json.loads(config_path.read_text()).get("quantization_config", {})
    scheme = quant.get("format") if quant.get("quant_method") == "compressed-tensors" else quant.get("quant_method")
    if scheme not in VLLM_DTYPE:
        raise SystemExit(f"{folder}: checkpoint scheme {scheme!r} has no vLLM dtype; known: "
                         f"{', '.join(VLLM_DTYPE)} (add it to VLLM_DTYPE in bench_consumers.py)")
    return VLLM_DTYPE[scheme]


# vLLM CPU's attention backend (CPUAttentionBackend.get_supported_head_sizes); any other head_dim kills its engine
# ("Unsupported CPU attention configuration: head_dim=16"), so it is refused here before vLLM starts
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim(config: dict[str, Any]) -> int:
    """A model's attention head size from its config.json: ``head_dim``, else hidden size / heads."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def check_vllm_head_dim(folder: Path) -> None:
    size = head_dim(json.loads((folder / "config.json").read_text()))
    if size not in VLLM_CPU_HEAD_SIZES:
        raise SystemExit(f"{folder}: head_dim {size} is not one vLLM CPU's attention runs "
                         f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); give a model with one of those")


def vllm_job(folder: Path, prompts: list[list[int]], windows: list[list[int]], new_tokens: int,
             dtype: str | None = None, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """One model for ``vllm_consumer.py``, run in ``dtype`` (default: its scheme's ``VLLM_DTYPE``) with vLLM's
    ``kv_cache_dtype`` (``fp8``: an e4m3 cache with the checkpoint's ``k_scale`` / ``v_scale``, 1.0 where it has
    none)."""
    # a scored window asks for one token after it: vLLM refuses prompt + output past max_model_len
    longest = max(len(x) for x in [*(w + [0] for w in windows), *(p + [0] * new_tokens for p in prompts)])
    return {"folder": str(folder), "dtype": dtype or vllm_dtype(folder), "prompts": prompts, "new_tokens": new_tokens,
            "top_logprobs": VLLM_TOP, "windows": windows, "max_model_len": longest, "kv_cache_dtype": kv_cache_dtype}


# VLLM_CPU_INT4_W4A8=0: on a CPU with AMX, vLLM's default (1) runs W4A16 checkpoints with int8 dynamic per-token
# activations (its W4A8 kernel), a different model from the one the checkpoint describes (SmolLM2 W4A16: perplexity
# 20.509 with it, +3.24 % over ours, the size of naive W8A8's loss). Off, vLLM computes W4A16 in bfloat16 (19.893,
# +0.14 %). That kernel uses AMX tiles without asking Linux for them, which killed the tiny models' worker (SIGILL);
# vllm_consumer.py asks in every vLLM process. VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: FP8 dynamic on CPU runs torch's
# unfused fallback (ChannelWiseTorchFP8ScaledMMLinearKernel: torch._scaled_mm into float32, then both scales), and once
# one 4096-token prefill step with full-vocabulary log-probabilities outlasted vLLM's default 300 s on a busy 2-core
# host ("RPC call to execute_model timed out"), killing the engine. With it raised, SmolLM2 FP8 dynamic's whole check
# took 4-5 minutes of vLLM time on a loaded host (load 24-64 s, greedy 53-142 s, 16 windows 56-119 s, vllm.log's
# "load ... greedy ... windows" line; py-spy on the worker: 59 % of its samples in that kernel's apply_scaled_mm).
VLLM_ENV = {"VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}
JOB_MARK = "=== vllm_consumer job"  # vllm_consumer.py's line before each job
# a line of vLLM's log that names an exception, bare or logged at ERROR level by one of its processes:
# "(Worker pid=9) ERROR 12-06 09:49:31 [multiproc_executor.py:1063] RuntimeError: ..." (WARNING lines are not causes)
# A worker killed by a signal inside a native kernel leaves no exception, only "Worker proc ... died unexpectedly".
EXCEPTION_LINE = re.compile(r"^(?:\([^)]*\) )?(?:ERROR [\d-]+ [\d:]+ \[[^\]]*\] )?"
                            r"((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*|Worker proc .* died unexpectedly.*)$")


def root_cause(log: str, job: int) -> str | None:
    """The first exception that job ``job``'s part of vLLM's log names: the engine process's own error, which the
    caller only sees as ``EngineDeadError`` ("see stack trace above")."""
    parts = re.split(rf"^{re.escape(JOB_MARK)} \d+ .*$", log, flags=re.MULTILINE)
    if job + 1 >= len(parts):
        return None
    for line in parts[job + 1].splitlines():
        match = EXCEPTION_LINE.match(line.strip())
        if match and not match.group(1).startswith(("EngineDeadError", "vllm.v1.engine.exceptions.EngineDeadError")):
            return match.group(1)
    return None


def vllm_run(jobs: list[dict[str, Any]], threads: int, log: Path) -> list[dict[str, Any]]:
    """vLLM's greedy tokens and window NLLs per job, from ``vllm_consumer.py`` in the vLLM environment; its output
    is kept in ``log``, and a job that failed names the root cause found there."""
    env = {**os.environ, **VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs_path, results_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_path.write_text(json.dumps(jobs))
        with log.open("w") as out:
            code = subprocess.run([str(peers.vllm_python()), str(HERE / "vllm_consumer.py"), str(jobs_path),
                                   str(results_path)], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        done = json.loads(results_path.read_text()) if results_path.is_file() else []
    text = log.read_text(errors="replace")
    tail = " | ".join(text.strip().splitlines()[-3:])
    results = done + [{"error": f"vLLM exited with {code}: {tail}"}] * (len(jobs) - len(done))
    for i, r in enumerate(results):
        cause = root_cause(text, i) if "error" in r else None
        if cause is not None:
            r["root_cause"] = cause
        if "error" in r:
            r["log"] = str(log)
    return results


def greedy(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Our greedy continuation (EOS ignored, as vLLM is asked) and the logits that chose each token."""
    ids, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            steps.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], steps


def divergence(ours: list[int], theirs: list[int], our_logits: list[torch.Tensor],
               their_top: list[dict[str, float]]) -> dict[str, Any]:
    """Where two greedy runs first differ, and how close each side was to the other's choice there."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if at is None:
        return {"equal": True}
    mine, other = ours[at], theirs[at]
    logits, top = our_logits[at], their_top[at]
    return {"equal": False, "first_divergence": at, "ours": mine, "vllm": other,
            # logit(ours) - logit(vLLM's) in our model; logprob(vLLM's) - logprob(ours) in vLLM's (None: not in top-k)
            "our_margin": float(logits[mine] - logits[other]),
            "vllm_margin": top[str(other)] - top[str(mine)] if str(mine) in top else None}


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q, _ in PROBES[:VLLM_PROMPTS]]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def vllm_compare(model: Any, prompts: list[list[int]], got: dict[str, Any], wins: torch.Tensor | None
                 ) -> dict[str, Any]:
    """vLLM's run of one model against ours: greedy tokens prompt by prompt, and perplexity on ``wins``."""
    if "error" in got:
        return {"engine": "vLLM (CPU)", **got}
    comparisons = []
    for prompt, gen in zip(prompts, got["generations"], strict=True):
        tokens, logits = greedy(model, prompt, len(gen["tokens"]))
        comparisons.append(divergence(tokens, gen["tokens"], logits, gen["top_logprobs"]))
    out: dict[str, Any] = {"engine": "vLLM (CPU)", "dtype": got["dtype"], "kv_cache_dtype": got.get("kv_cache_dtype"),
                           "greedy": comparisons,
                           "greedy_equal": sum(c["equal"] for c in comparisons)}
    if wins is not None:
        from toolkit.evaluation import perplexity

        nll = sum(w["nll"] for w in got["windows"]) / sum(w["tokens"] for w in got["windows"])
        out["perplexity"] = math.exp(nll)
        out["our_perplexity"] = perplexity.evaluate(model, wins)["perplexity"]
    return out


def our_reading(folder: Path) -> Any:
    """The export as ours computes it: the float32 model its exporter's self-check reads back (weights dequantized
    from the stored codes, 8-bit linears' inputs quantized as the folder says), equal to the toolkit's model."""
    from toolkit.passes import export_compressed_tensors, export_modelopt

    quant_method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    read = export_modelopt._reload_float if quant_method == "modelopt" else export_compressed_tensors._reload_float
    return read(folder)[0]


def vllm_consumers(a: argparse.Namespace, wins: torch.Tensor) -> dict[str, dict[str, Any]]:
    """``--vllm`` folders (scored on ``wins`` too) and ``--vllm-tiny`` families, all in one vLLM process."""
    from transformers import AutoTokenizer

    entries = []  # label, our model, folder, tokenizer, windows
    for label, folder in labelled(a.vllm):
        entries.append((label, our_reading(folder), folder, AutoTokenizer.from_pretrained(folder), wins))
    for family in a.vllm_tiny:
        for scheme in a.vllm_tiny_schemes:
            entries.append((f"tiny-{family}-{scheme}", *tiny_export(family, scheme, a.workdir), None))
    prompts = [chat_prompts(tokenizer) for _, _, _, tokenizer, _ in entries]
    jobs = [vllm_job(folder, p, [] if w is None else w.tolist(), a.vllm_tokens, a.vllm_dtype, a.vllm_kv_cache_dtype)
            for (_, _, folder, _, w), p in zip(entries, prompts, strict=True)]
    results = {}
    for (label, model, _, _, w), p, got in zip(entries, prompts, vllm_run(jobs, a.threads, a.workdir / "vllm.log"), strict=True):
        results[label] = vllm_compare(model, p, got, w)
        print_vllm(label, results[label])
    return results


# --vllm-tiny exports each family in these schemes (default: the two vLLM CPU runs; fp8 ones are tried on request)
TINY_SCHEMES = ("w4a16", "w8a8", "fp8", "fp8-modelopt", "fp8-static", "fp8-static-modelopt")
# token ids the static fp8 schemes calibrate their input scales on (a tiny model has no calibration text)
TINY_CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def tiny_rtn(scheme: str) -> Any:
    """RTN settings of a ``TINY_SCHEMES`` entry: W4A16 int4 group 32 symmetric with an int8 head (pack-quantized);
    W8A8 int8 per-channel weights with int8 dynamic per-token activations, head float (int-quantized); FP8 dynamic
    (fp8 e4m3 per-channel weights, fp8 per-token activations, head float) and FP8 static (per-tensor weights and
    calibrated per-tensor inputs: compressed-tensors' FP8 preset, ModelOpt's FP8), as compressed-tensors
    float-quantized or a ModelOpt checkpoint."""
    from toolkit.passes.rtn import RTNConfig
    from toolkit.quant.spec import ActivationSpec

    if scheme == "w4a16":
        return RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8)
    if scheme.startswith("fp8-static"):
        return RTNConfig(bits=8, group_size=-1, symmetric=True, type="float", strategy="tensor", lm_head_bits=None,
                         input_activations=ActivationSpec("float", 8, "tensor", dynamic=False))
    kind = "int" if scheme == "w8a8" else "float"
    return RTNConfig(bits=8, group_size=-1, symmetric=True, type=kind, lm_head_bits=None,
                     input_activations=ActivationSpec(kind, 8, "token", dynamic=True))


def vllm_head_override(family: str) -> dict[str, int]:
    """``head_dim=32`` for a tiny family whose head size vLLM CPU's attention does not run (tiny mistral's 16),
    none for the others: the same architecture, with heads vLLM can load."""
    from toolkit.models.tiny import family_config

    config = family_config(family).to_dict()
    if head_dim(config) in VLLM_CPU_HEAD_SIZES:
        return {}
    if "head_dim" not in config:
        raise SystemExit(f"tiny {family}: head size {head_dim(config)} is not one vLLM CPU runs, and its config "
                         "has no head_dim to set; leave it out of --vllm-tiny")
    return {"head_dim": 32}


def tiny_export(family: str, scheme: str, workdir: Path) -> tuple[Any, Path, Any]:
    """A tiny ``family`` model (heads vLLM CPU runs) quantized by RTN as ``tiny_rtn(scheme)`` says, exported as
    compressed-tensors."""
    from toolkit.models.tiny import tiny_model, tiny_tokenizer
    from toolkit.passes import export_compressed_tensors, export_modelopt
    from toolkit.passes.context import PassContext
    from toolkit.passes.rtn import apply as rtn_apply
    from toolkit.paths import atomic_dir

    model, tokenizer = tiny_model(family, **vllm_head_override(family)), tiny_tokenizer()
    ctx = PassContext(tokenizer, lambda: TINY_CALIBRATION, lambda: model, workdir)
    rtn_apply(model, tiny_rtn(scheme), ctx)
    folder = workdir / f"tiny-{family}-{scheme}"
    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            if scheme.endswith("modelopt"):
                export_modelopt.export(model, tokenizer, export_modelopt.ExportModelOptConfig(), tmp)
            else:
                export_compressed_tensors.export(model, tokenizer,
                                                 export_compressed_tensors.ExportCompressedTensorsConfig(), tmp)
    return model, folder, tokenizer


def print_vllm(label: str, r: dict[str, Any]) -> None:
    if "error" in r:
        cause = f"; root cause: {r['root_cause']}" if "root_cause" in r else ""
        print(f"{label}: vLLM: {r['error']}{cause} (log: {r['log']})")
        return
    print(f"{label}: vLLM ({r['dtype']}, kv cache {r['kv_cache_dtype']}) greedy equal to ours on "
          f"{r['greedy_equal']}/{len(r['greedy'])} prompts")
    for i, c in enumerate(r["greedy"]):
        if not c["equal"]:
            vm = "not in its top-5" if c["vllm_margin"] is None else f"{c['vllm_margin']:.4f}"
            print(f"  prompt {i}: first divergence at token {c['first_divergence']} (ours {c['ours']}, vLLM "
                  f"{c['vllm']}): our logit margin {c['our_margin']:.4f}, vLLM logprob margin {vm}")
    if "perplexity" in r:
        print(f"  perplexity vLLM {r['perplexity']:.3f} vs ours {r['our_perplexity']:.3f} "
              f"({100 * (r['perplexity'] / r['our_perplexity'] - 1):+.2f} %)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", action="append", default=[], help="LABEL=FILE.gguf (llama.cpp)")
    p.add_argument("--quantize-q4_0", action="append", default=[], help="LABEL=F32.gguf: llama.cpp's own Q4_0 of it")
    p.add_argument("--compressed-tensors", action="append", default=[], help="LABEL=FOLDER (transformers)")
    p.add_argument("--torch", action="append", default=[], help="LABEL=MODEL_FOLDER (the toolkit's PyTorch model)")
    p.add_argument("--vllm", action="append", default=[], help="LABEL=FOLDER: compressed-tensors export in vLLM (CPU)")
    p.add_argument("--vllm-tiny", nargs="*", default=[], metavar="FAMILY",
                   help="tiny models of these families, exported as W4A16 and run in vLLM (CPU)")
    p.add_argument("--vllm-tiny-schemes", nargs="+", default=["w4a16", "w8a8"], choices=TINY_SCHEMES,
                   help="the compressed-tensors schemes each --vllm-tiny family is exported in")
    p.add_argument("--vllm-tokens", type=int, default=32, help="greedy tokens per prompt compared with vLLM")
    p.add_argument("--vllm-dtype", choices=["bfloat16", "float32"],
                   help="the dtype vLLM runs every model in (default: each scheme's VLLM_DTYPE); float32 is ours, "
                        "which vLLM CPU's FP8 torch fallback accepts and its int4 and int8 kernels refuse")
    p.add_argument("--vllm-kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"], default="auto",
                   help="vLLM's KV cache for every --vllm model: auto (the model's dtype), or fp8 / fp8_e4m3 / "
                        "fp8_e5m2 with the checkpoint's k_scale / v_scale (the kv_cache pass; 1.0 where it has none)")
    p.add_argument("--tokenizer", default="smollm2", help="model source whose tokenizer makes the windows")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("out/bench-consumers"))
    p.add_argument("--report", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for _, folder in labelled(a.vllm):
        vllm_dtype(folder)
        check_vllm_head_dim(folder)
    if a.vllm or a.vllm_tiny:
        try:
            peers.vllm_python()
        except peers.PeerUnavailable as err:
            print(f"vLLM: skipped: {err}")
            a.vllm, a.vllm_tiny = [], []
    ggufs = labelled(a.gguf)
    for label, src in labelled(a.quantize_q4_0):
        out = a.workdir / f"{label}.gguf"
        ggufs.append((label, out if out.is_file() else quantize_q4_0(src, out, a.threads)))
    wins = windows(a.tokenizer, a.count, a.length)
    results: dict[str, dict[str, Any]] = {}
    for label, path in ggufs:
        results[label] = {"engine": "llama.cpp", "perplexity": gguf_perplexity(path, wins, a.threads),
                          **gguf_answers(path, a.threads), "bytes": path.stat().st_size, "rounds": []}
        print(f"{label}: perplexity {results[label]['perplexity']:.3f}", flush=True)
    for label, folder in labelled(a.compressed_tensors):
        results[label] = {"engine": "transformers + compressed-tensors", **hf_perplexity(folder, wins, compressed=True)}
        print(f"{label}: perplexity {results[label]['perplexity']:.3f}", flush=True)
    if a.vllm or a.vllm_tiny:
        results.update(vllm_consumers(a, wins))
    for label, folder in labelled(a.torch):
        results[label] = {"engine": "toolkit PyTorch", **hf_perplexity(folder, wins, compressed=False)}
        print(f"{label}: perplexity {results[label]['perplexity']:.3f}", flush=True)
    prompt = wins.reshape(-1)[: a.prompt_tokens].tolist()
    for _ in range(a.rounds):  # interleaved, so a slow spell of the machine hits every system alike
        for label, path in ggufs:
            results[label]["rounds"].append(gguf_speed(path, prompt, a.new_tokens, a.threads))
    for label, _ in ggufs:
        r = results[label]
        r["decode_tok_s"] = statistics.median(x["decode_tok_s"] for x in r["rounds"])
        r["prefill_ms"] = statistics.median(x["prefill_ms"] for x in r["rounds"])
        r["read_gb_s"] = r["bytes"] * r["decode_tok_s"] / 1e9  # upper bound: every weight byte read once a token
    report: dict[str, Any] = {"windows": f"{a.count} x {a.length} pydoc evaluation", "threads": a.threads,
                              "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "systems": results}
    if len(ggufs) >= 2:
        first, second = (results[label]["rounds"] for label, _ in ggufs[:2])
        report["decode_ratio_per_round"] = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(first, second, strict=True)]
    print("| system | engine | perplexity | decode tok/s | prefill ms | MB | GB/s read |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        if "perplexity" not in r:  # a tiny model in vLLM, or a vLLM that failed: printed above
            continue
        speed = (f"{r['decode_tok_s']:.1f} | {r['prefill_ms']:.0f} | {r['bytes'] / 1e6:.1f} | {r['read_gb_s']:.1f}"
                 if "decode_tok_s" in r else " | | | ")
        print(f"| {label} | {r['engine']} | {r['perplexity']:.3f} | {speed} |")
    for label, r in results.items():
        if "answer" in r:
            print(f"{label}: {QUESTION!r} -> {r['answer']!r}; {r['probe_right']}/{len(PROBES)} probe answers right")
    if "decode_ratio_per_round" in report:
        ratios = ", ".join(f"{x:.3f}" for x in report["decode_ratio_per_round"])
        print(f"decode ratio {ggufs[0][0]} / {ggufs[1][0]} per round: {ratios}")
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
