"""Runtime benchmark: our runtime on several exports vs transformers, onnxruntime-genai and llama.cpp.

One command measures, in the same run and under the same settings (prompt 256 tokens, 128 new
tokens, greedy, 2 threads, warm-up then repeats, medians): time to first token, prefill tok/s,
decode tok/s, p50/p90 inter-token latency, peak RSS, artifact bytes and the weight bandwidth
decode achieves. Every system runs in its own subprocess so that peak RSS is its own.

    .venv/bin/python benchmarks/bench_runtime.py \
        --artifact fp32=out/smol-fp32 --artifact int8=out/smol-int8 --artifact int4=out/smol-int4 \
        --genai out/smol-int4 --out out/bench --report out/bench/report.json

Decode against onnxruntime-genai (issue 22): our runtime on genai's own int4 graph and on our head4 export, the
same two reading the graph's next-token output (an ArgMax node; by default the runtime removes it at load and takes
numpy's argmax of the logits), genai:

    .venv/bin/python benchmarks/bench_runtime.py --transformers '' --gguf '' --rounds 5 \
        --artifact genai-graph=out/genai-int4 --artifact head4=runs/smollm2-int4-rtn-head4-onnx/export \
        --graph-argmax genai-graph=out/genai-int4 --graph-argmax head4=runs/smollm2-int4-rtn-head4-onnx/export \
        --genai out/genai-int4

Extra sections: ``--concurrency`` (8 sequences decoded together vs 1) and ``--memory`` (peak RSS
and KV bytes for request budgets 512 vs 4096). Peers that are not installed are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()


# --- measurement helpers (run inside the worker subprocess) ----------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def folder_bytes(path: Path) -> int:
    """Bytes of an export folder, or of a single file (the GGUF peer)."""
    from toolkit.paths import dir_bytes

    path = Path(path)
    return path.stat().st_size if path.is_file() else dir_bytes(path)


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[1::2])  # evaluation half of the corpus
    ids = tokenizer.encode(text[: n * 12])[:n]  # ours or a transformers tokenizer: both encode to a list
    if len(ids) < n:
        raise SystemExit(f"could not build a {n}-token prompt")
    return list(ids)


def summarize(runs: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """Medians over repeats; per-token latencies pooled for p50/p90."""
    lat = np.concatenate([np.asarray(r["token_latencies_s"]) for r in runs]) * 1000
    prefill = float(np.median([r["prefill_s"] for r in runs]))
    return {
        "ttft_ms": float(np.median([r["ttft_s"] for r in runs]) * 1000),
        "prefill_ms": prefill * 1000,
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_tok_s": float(np.median([len(r["token_latencies_s"]) / sum(r["token_latencies_s"]) for r in runs])),
        "itl_p50_ms": float(np.percentile(lat, 50)),
        "itl_p90_ms": float(np.percentile(lat, 90)),
        "new_tokens": int(np.median([len(r["token_latencies_s"]) + 1 for r in runs])),
        "samples": {"decode_ms_per_token": [float(x) for x in lat],
                    "ttft_ms": [r["ttft_s"] * 1000 for r in runs]},
    }


def repeat(fn: Any, warmup: int, repeats: int) -> list[dict[str, Any]]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


# --- systems -----------------------------------------------------------------------------------------
def inject_slowdown(backend: Any, fraction: float) -> None:
    """Make every prefill and decode call really take ``1 + fraction`` times as long (busy wait, not sleep:
    sub-millisecond sleeps overshoot). For checking that the CI gate catches a slowdown of a known size."""

    def slowed(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            until = time.perf_counter() + fraction * (time.perf_counter() - t0)
            while time.perf_counter() < until:
                pass
            return out

        return call

    backend.prefill, backend.decode = slowed(backend.prefill), slowed(backend.decode)


def run_ours(a: argparse.Namespace, next_token: bool = False) -> dict[str, Any]:
    from toolkit.runtime import BackendOptions, Engine, GenerationConfig, OrtBackend, Tokenizer, load

    if not next_token:
        engine = load(a.path, threads=a.threads, spin=a.spin)
    else:  # greedy steps read the graph's ArgMax output (added at load where the graph has none)
        backend = OrtBackend(Path(a.path), BackendOptions(threads=a.threads, spin=a.spin, next_token=True))
        engine = Engine(backend, Tokenizer.from_folder(Path(a.path)), max_batch=1)
    if a.slowdown:
        inject_slowdown(engine.backend, a.slowdown)
    ids = prompt_ids(engine.tokenizer, a.prompt_tokens)
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)

    def once() -> dict[str, Any]:
        t = engine.generate(ids, config).timings
        return {"ttft_s": t.ttft_s, "prefill_s": t.prefill_s, "token_latencies_s": t.token_latencies_s}

    # what the kernel collapsed into 2 MB pages in this process (0: refused, e.g. no contiguous memory left)
    return {"runs": repeat(once, a.warmup, a.repeats), "bytes": folder_bytes(a.path),
            "huge_page_mb": getattr(engine.backend, "huge_page_bytes", 0) / 2**20}


def run_transformers(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from toolkit.quant import checkpoint

    torch.set_num_threads(a.threads)
    loaded = checkpoint.load(a.path)
    ids = torch.tensor([prompt_ids(loaded.tokenizer, a.prompt_tokens)])

    class Clock(LogitsProcessor):  # called once per step, after that step's forward pass
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.stamps.append(time.perf_counter())
            return scores

    def once() -> dict[str, Any]:
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]))
        s = clock.stamps
        return {"ttft_s": s[0] - start, "prefill_s": s[0] - start, "token_latencies_s": list(np.diff(s))}

    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return {"runs": repeat(once, a.warmup, a.repeats), "bytes": weights}


def genai_folder(src: Path, threads: int) -> Path:
    """A view of ``src`` (symlinks) whose genai_config pins the thread count."""
    tmp = Path(tempfile.mkdtemp(prefix="genai-"))
    for f in src.iterdir():
        if f.name != "genai_config.json":
            (tmp / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (tmp / "genai_config.json").write_text(json.dumps(cfg))
    return tmp


def run_genai(a: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    model = og.Model(str(genai_folder(Path(a.path), a.threads)))
    ids = np.array([prompt_ids(AutoTokenizer.from_pretrained(a.path), a.prompt_tokens)], np.int32)

    def once() -> dict[str, Any]:
        params = og.GeneratorParams(model)
        total = ids.shape[1] + a.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # prefill
        gen.generate_next_token()  # the first token, chosen from the prefill's logits: no model run, so not a decode step
        gen.get_next_tokens()
        ttft = time.perf_counter() - t0
        lat = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            lat.append(time.perf_counter() - t)
        return {"ttft_s": ttft, "prefill_s": ttft, "token_latencies_s": lat}

    return {"runs": repeat(once, a.warmup, a.repeats), "bytes": folder_bytes(Path(a.path))}


def run_llamacpp(a: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=a.path, n_threads=a.threads, n_ctx=a.prompt_tokens + a.new_tokens + 16,
                verbose=False)
    from transformers import AutoTokenizer

    from toolkit import models

    tok = AutoTokenizer.from_pretrained(str(models.cached_gguf_checkpoint(Path(a.path))))
    ids = prompt_ids(tok, a.prompt_tokens)

    def once() -> dict[str, Any]:
        stamps = []
        llm.reset()  # else generate() reuses the previous repeat's KV prefix and skips the prefill
        t0 = time.perf_counter()
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == a.new_tokens:
                break
        return {"ttft_s": stamps[0] - t0, "prefill_s": stamps[0] - t0, "token_latencies_s": list(np.diff(stamps))}

    return {"runs": repeat(once, a.warmup, a.repeats), "bytes": folder_bytes(Path(a.path))}


def run_concurrency(a: argparse.Namespace) -> dict[str, Any]:
    """Aggregate decode tok/s of 8 sequences of different lengths decoded together vs one alone."""
    from toolkit.runtime import GenerationConfig, load

    engine = load(a.path, threads=a.threads, spin=a.spin, max_batch=a.batch)
    base = prompt_ids(engine.tokenizer, a.prompt_tokens)
    prompts = [base[: a.prompt_tokens // 2 + i * a.prompt_tokens // (2 * a.batch)] for i in range(a.batch)]
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)

    def aggregate(batch: list[list[int]]) -> float:
        start = time.perf_counter()
        results = engine.generate_batch(batch, config)
        wall = time.perf_counter() - start - sum(r.timings.prefill_s for r in results)  # decode phase only
        return sum(len(r.token_ids) - 1 for r in results) / wall

    aggregate(prompts[:1])
    pairs = [(aggregate(prompts[:1]), aggregate(prompts)) for _ in range(a.repeats)]  # interleaved: same load
    single, many = (float(np.median(x)) for x in zip(*pairs, strict=True))
    speedup = float(np.median([m / s for s, m in pairs]))
    return {"batch": a.batch, "single_tok_s": single, "batch_tok_s": many, "speedup": speedup}


def run_memory(a: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS and KV bytes for one request whose budget (prompt + max_new_tokens) is ``a.budget``."""
    from toolkit.runtime import GenerationConfig, load

    engine = load(a.path, threads=a.threads)
    ids = prompt_ids(engine.tokenizer, 64)
    rss_loaded = peak_rss_mb()
    stream = engine.stream(ids, GenerationConfig(max_new_tokens=a.budget - len(ids)))
    for _, _chunk in zip(range(16), stream, strict=False):  # allocation happens at admission
        pass
    cache = engine.backend.cache
    # touch every page so RSS shows the whole allocation, as a full-length request eventually would
    for b in cache.buffers:
        b.fill(0.0)
    return {"budget": a.budget, "kv_bytes": cache.nbytes, "capacity": cache.capacity,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()}


def run_ours_graph_argmax(a: argparse.Namespace) -> dict[str, Any]:
    return run_ours(a, next_token=True)


WORKERS = {"ours": run_ours, "ours-graph-argmax": run_ours_graph_argmax, "transformers": run_transformers, "genai": run_genai,
           "llamacpp": run_llamacpp,
           "concurrency": run_concurrency, "memory": run_memory}


# --- driver ------------------------------------------------------------------------------------------
def spawn(kind: str, path: str, a: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--worker", kind, "--path", str(path), "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
           "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--slowdown", str(a.slowdown)]
    cmd += [] if a.spin else ["--no-spin"]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def systems(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = [(f"ours {name}", "ours", path) for name, path in (s.split("=", 1) for s in a.artifact)]
    out += [(f"ours {name} (the graph's ArgMax output)", "ours-graph-argmax", path)
            for name, path in (s.split("=", 1) for s in a.graph_argmax)]
    if a.transformers:
        out.append(("transformers eager fp32", "transformers", a.transformers))
    if a.genai:
        out.append(("onnxruntime-genai " + Path(a.genai).name, "genai", a.genai))
    gguf = default_gguf() if a.gguf is None else a.gguf
    if gguf:
        out.append(("llama.cpp " + Path(gguf).name, "llamacpp", gguf))
    return out


PEER_MODULES = {"genai": "onnxruntime_genai", "llamacpp": "llama_cpp"}


def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    """Every system once per round, each in a fresh process, the order rotated between rounds.

    A process is its own sample: on a shared virtual machine decode speed varies by up to ~20 % from one process
    to the next (memory placement, neighbours) while staying steady inside one, so figures pool the repeats of
    all rounds and ratios against a peer are taken round by round (same minutes) before the median.
    """
    report: dict[str, Any] = {"settings": {k: getattr(a, k) for k in ("prompt_tokens", "new_tokens", "threads",
                                                                       "repeats", "warmup", "spin", "rounds",
                                                                       "slowdown")},
                              "systems": [], "notes": []}
    todo = []
    for label, kind, path in systems(a):
        module = PEER_MODULES.get(kind)
        if module and not installed(module):
            report["notes"].append(f"{label}: skipped, `{module}` is not installed")
        else:
            todo.append((label, kind, path))
    raws: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in todo}
    for r in range(a.rounds):
        for label, kind, path in todo[r % len(todo):] + todo[: r % len(todo)] if todo else []:
            print(f"round {r + 1}/{a.rounds}: measuring {label} ...", file=sys.stderr)
            raw = spawn(kind, path, a)
            if "error" in raw:
                report["notes"].append(f"{label}: failed in round {r + 1}: {raw['error']}")
            else:
                raws[label].append({**raw, "round": r})
    for label, kind, path in todo:
        if not raws[label]:
            continue
        runs = [run for raw in raws[label] for run in raw["runs"]]
        row = {"system": label, "kind": kind, "path": str(path), "artifact_bytes": raws[label][0]["bytes"],
               "peak_rss_mb": max(raw["peak_rss_mb"] for raw in raws[label]), "processes": len(raws[label]),
               **summarize(runs, a.prompt_tokens)}
        per = [summarize(raw["runs"], a.prompt_tokens) for raw in raws[label]]
        row["per_process_decode_tok_s"] = [x["decode_tok_s"] for x in per]
        row["per_process_prefill_tok_s"] = [x["prefill_tok_s"] for x in per]
        if "huge_page_mb" in raws[label][0]:
            row["huge_page_mb_by_process"] = [raw["huge_page_mb"] for raw in raws[label]]
        row["rounds"] = [raw["round"] for raw in raws[label]]  # a failed round leaves a gap: pair by round, not index
        row["samples_by_process"] = {k: [x["samples"][k] for x in per] for k in per[0]["samples"]}
        row["weight_gb_s"] = row["artifact_bytes"] * row["decode_tok_s"] / 1e9  # bytes read per token x tok/s
        report["systems"].append(row)
    report["ratios"] = peer_ratios(report["systems"])
    if a.concurrency:
        print("measuring concurrency ...", file=sys.stderr)
        report["concurrency"] = spawn("concurrency", a.concurrency, a, batch=8)
    if a.memory:
        print("measuring memory budgets ...", file=sys.stderr)
        report["memory"] = [spawn("memory", a.memory, a, budget=b) for b in (512, 4096)]
    return report


def peer_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our systems against each peer: the median over rounds of (ours / peer) in that round."""
    ours = [r for r in rows if r["kind"] == "ours"]
    peers = [r for r in rows if r["kind"] != "ours"]
    out = []
    for o in ours:
        for p in peers:
            shared = sorted(set(o["rounds"]) & set(p["rounds"]))

            def by_round(row: dict[str, Any], key: str, rounds: list[int] = shared) -> list[float]:
                return [row[key][row["rounds"].index(r)] for r in rounds]

            pairs = list(zip(by_round(o, "per_process_decode_tok_s"), by_round(p, "per_process_decode_tok_s"),
                             strict=True))
            pre = list(zip(by_round(o, "per_process_prefill_tok_s"), by_round(p, "per_process_prefill_tok_s"),
                           strict=True))
            if pairs:
                out.append({"ours": o["system"], "peer": p["system"], "rounds": len(pairs),
                            "decode_ratio": float(np.median([x / y for x, y in pairs])),
                            "decode_ratio_per_round": [x / y for x, y in pairs],
                            "prefill_ratio": float(np.median([x / y for x, y in pre]))})
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"Prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, greedy, {s['threads']} threads, "
             f"{s['warmup']} warm-up + {s['repeats']} repeats in each of {s['rounds']} fresh processes (medians)"
             + (f", ours slowed down by {s['slowdown']:.0%} on purpose" if s.get("slowdown") else "") + ".", "",
             "| system | TTFT ms | prefill tok/s | decode tok/s | ITL p50 ms | ITL p90 ms | peak RSS MB | "
             "artifact MB | weights GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["systems"]:
        lines.append(f"| {r['system']} | {r['ttft_ms']:.0f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['itl_p50_ms']:.2f} | {r['itl_p90_ms']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['artifact_bytes'] / 1e6:.1f} | {r['weight_gb_s']:.1f} |")
    for r in report["systems"]:
        if r.get("huge_page_mb_by_process"):
            lines.append(f"\n{r['system']}: MB in 2 MB pages per process "
                         + ", ".join(f"{x:.0f}" for x in r["huge_page_mb_by_process"]) + ".")
    for q in report.get("ratios", []):
        per_round = ", ".join(f"{x:.2f}" for x in q["decode_ratio_per_round"])
        lines.append(f"\n{q['ours']} / {q['peer']}: decode {q['decode_ratio']:.3f}x (per round {per_round}), "
                     f"prefill {q['prefill_ratio']:.3f}x, median over {q['rounds']} rounds.")
    c = report.get("concurrency")
    if c and "error" in c:
        lines.append(f"Concurrency: failed: {c['error']}")
    elif c:
        lines += ["", f"Concurrency: {c['batch']} sequences decode {c['batch_tok_s']:.1f} tok/s in aggregate vs "
                      f"{c['single_tok_s']:.1f} alone ({c['speedup']:.2f}x)."]
    for m in report.get("memory", []):
        if "error" in m:
            lines.append(f"Memory: failed: {m['error']}")
        else:
            lines.append(f"Memory: budget {m['budget']} -> KV {m['kv_bytes'] / 1e6:.1f} MB (capacity {m['capacity']}), "
                         f"peak RSS {m['peak_rss_mb']:.0f} MB (after load {m['rss_after_load_mb']:.0f} MB).")
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    rows = report["systems"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2))
    names = [r["system"] for r in rows]
    axes[0].barh(names, [r["decode_tok_s"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("decode tok/s (higher is better)")
    axes[1].barh(names, [r["ttft_ms"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("time to first token, ms (lower is better)")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def gate_report(report: dict[str, Any], perplexity: float | None, export: Path | None) -> dict[str, Any]:
    """The first system in toolkit-report/1 form, for ``toolkit compare`` (toolkit/evaluation/compare.py).

    ``model`` names what was measured (export bytes, source model, recipe), so the gate can refuse to
    compare two different models.
    """
    from toolkit.evaluation.compare import model_identity

    first = report["systems"][0]
    return {"schema": "toolkit-report/1", "name": first["system"],
            "model": model_identity(export) if export is not None else {},
            "metrics": {"perplexity": perplexity} if perplexity is not None else {},
            "latency": first["samples"], "latency_groups": first["samples_by_process"]}


def default_gguf() -> str | None:
    try:
        from toolkit.models import smollm2_gguf_path

        return str(smollm2_gguf_path())
    except Exception:  # the bundled GGUF is optional for this benchmark
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=FOLDER", help="our export (repeatable)")
    p.add_argument("--graph-argmax", action="append", default=[], metavar="NAME=FOLDER",
                   help="our runtime reading the graph's next-token ArgMax (a peer row: the ratio is the ArgMax's cost)")
    p.add_argument("--transformers", default="smollm2", help="model source for transformers eager ('' skips)")
    p.add_argument("--genai", default=None, help="onnxruntime-genai folder (genai_config.json)")
    # resolved by the driver only: finding the bundled GGUF imports toolkit.models (torch), which would inflate
    # the peak RSS measured in every worker process
    p.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the bundled SmolLM2's; '' skips)")
    p.add_argument("--concurrency", default=None, metavar="FOLDER", help="export for the 8-vs-1 sequence benchmark")
    p.add_argument("--memory", default=None, metavar="FOLDER", help="export for the budget 512 vs 4096 check")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per system, interleaved (default 3)")
    p.add_argument("--slowdown", type=float, default=0.0,
                   help="make our runtime this fraction slower on purpose (0.1: 10%%), to check the CI gate")
    p.add_argument("--no-spin", dest="spin", action="store_false",
                   help="keep ORT threads from spinning (ours; genai always spins)")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--report", type=Path, default=None, help="write the first system as a toolkit-report/1")
    p.add_argument("--perplexity", type=float, default=None, help="perplexity to record in --report")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=512, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        result = WORKERS[a.worker](a)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    report = benchmark(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_runtime.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    note = chart(report, a.out / "bench_runtime.png") if report["systems"] else "chart skipped: nothing measured"
    table += f"Note: {note}\n" if note else ""
    (a.out / "bench_runtime.md").write_text(table)
    if a.report and report["systems"]:
        export = Path(a.artifact[0].split("=", 1)[1]) if a.artifact else None
        a.report.write_text(json.dumps(gate_report(report, a.perplexity, export), indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
