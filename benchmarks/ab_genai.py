"""A/B of runtime overhead: our runtime vs onnxruntime-genai's og.Generator on the SAME graph.

Runs alternate in one process (ours, genai, ours, genai, ...) so that load on a shared machine hits
both alike; the figures are medians of the per-pair ratios. Same prompt (256 tokens), 128 new
tokens, greedy, same thread count; spinning threads like genai's unless ``--no-spin``.

    .venv/bin/python benchmarks/ab_genai.py out/smol-int4 --pairs 5

On a shared machine wall time mostly measures the other processes. ``--cpu`` runs both on one ORT thread (the
graph then runs on the calling thread), interleaves single decode steps (ours, ours reading the graph's ArgMax,
genai, ours, ...) and compares the medians of each step's CPU time of the calling thread: what each side asks
of the CPU, not what the neighbours leave it. Wall-time effects of two threads (spinning, wake-ups) do not show.

    .venv/bin/python benchmarks/ab_genai.py out/smol-int4 --cpu --pairs 4
    .venv/bin/python benchmarks/ab_genai.py out/smol-int4 --cpu --genai genai-int4  # our graph vs genai's build
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import genai_folder, prompt_ids  # noqa: E402

from toolkit.runtime import GenerationConfig, OrtBackend, load  # noqa: E402


def step_cpu_times(backend: OrtBackend, ids: list[int], total: int) -> Iterator[float]:
    """Prefill ``ids`` into row 0, then greedy one-token decode steps up to ``total`` positions: each step's CPU
    seconds on the calling thread (the graph runs there with one intra-op thread)."""
    backend.allocate(1, total)
    token = int(backend.prefill(0, np.array(ids, np.int64), 0).argmax())
    for n in range(len(ids), total - 1):
        t0 = time.thread_time()
        token, _ = backend.decode_row(token, n, with_logits=False)  # one stream's step, as the scheduler runs it
        yield time.thread_time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="a folder with genai_config.json (onnxruntime-genai build)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-spin", dest="spin", action="store_false")
    p.add_argument("--cpu", action="store_true", help="CPU time per interleaved step, one thread (shared machines)")
    p.add_argument("--genai", type=Path, help="--cpu: the graph genai runs (e.g. its own int4 build); default: artifact")
    a = p.parse_args(argv)
    if a.cpu:
        return cpu_steps(a)
    import onnxruntime_genai as og

    engine = load(a.artifact, threads=a.threads, spin=a.spin)
    ids = prompt_ids(engine.tokenizer, a.prompt_tokens)
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    model = og.Model(str(genai_folder(a.artifact, a.threads)))

    def ours() -> tuple[float, float, list[int]]:
        r = engine.generate(ids, config)
        return r.timings.prefill_s, r.timings.decode_tok_s, r.token_ids

    def genai() -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        total = len(ids) + a.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([ids], np.int32))
        prefill = time.perf_counter() - t0
        tokens, t1 = [], time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return prefill, (len(tokens) - 1) / (time.perf_counter() - t1), tokens

    ours(), genai()  # warm-up
    rows = []
    for _ in range(a.pairs):
        (po, do, to), (pg, dg, tg) = ours(), genai()
        rows.append({"ours_prefill_ms": po * 1000, "genai_prefill_ms": pg * 1000, "ours_decode_tok_s": do,
                     "genai_decode_tok_s": dg, "same_tokens": to == tg})
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k != "same_tokens"}
    med["decode_ratio"] = float(np.median([r["ours_decode_tok_s"] / r["genai_decode_tok_s"] for r in rows]))
    med["prefill_speed_ratio"] = float(np.median([r["genai_prefill_ms"] / r["ours_prefill_ms"] for r in rows]))
    med["same_tokens"] = all(r["same_tokens"] for r in rows)
    med["spin"] = a.spin
    print(json.dumps(med, indent=1))
    return 0


def cpu_steps(a: argparse.Namespace) -> int:
    import onnxruntime_genai as og

    from toolkit.runtime import BackendOptions, OrtBackend, Tokenizer

    ids = prompt_ids(Tokenizer.from_folder(a.artifact), a.prompt_tokens)
    total = len(ids) + a.new_tokens
    model = og.Model(str(genai_folder(a.genai or a.artifact, 1)))

    def ours(next_token: bool) -> Callable[[], Iterator[float]]:
        backend = OrtBackend(a.artifact, BackendOptions(threads=1, next_token=next_token))

        return lambda: step_cpu_times(backend, ids, total)

    def genai() -> Iterator[float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids], np.int32))
        gen.generate_next_token()  # the first token comes from the prefill's logits (no model run)
        while not gen.is_done():
            t0 = time.thread_time()
            gen.generate_next_token()
            gen.get_next_tokens()
            yield time.thread_time() - t0

    systems = {"ours": ours(False), "ours_graph_argmax": ours(True), "genai": genai}
    times: dict[str, list[float]] = {k: [] for k in systems}
    for round_ in range(a.pairs + 1):  # round 0 warms up
        for step in zip(*(f() for f in systems.values()), strict=True):
            for k, dt in zip(systems, step, strict=True):
                times[k] += [dt] if round_ else []
    ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    print(json.dumps({"cpu_ms_per_step": ms, **{f"{k}_vs_genai": ms[k] / ms["genai"] for k in ms if k != "genai"},
                      "steps": len(times["genai"])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
