"""Where a greedy decode step's time goes: inside onnxruntime's run vs the Python around it (cProfile).

Timed with the calling thread's CPU time and one ORT thread (the graph then runs on the calling thread), so
time other processes take from a shared machine is not counted. ``--graph-argmax`` reads the graph's next-token
ArgMax output (added at load where the graph has none) instead of numpy's argmax of the [1, V] logits. cProfile
adds about a microsecond per Python call, so the Python share it shows is an upper bound.

    .venv/bin/python benchmarks/profile_decode.py runs/smollm2-int4-rtn-head4-onnx/export --tokens 128

``--gaps N`` profiles nothing: it runs N generates on ``--threads`` threads and prints, per generate, the median CPU
time of the calling thread between the end of one ``run_with_iobinding`` and the start of the next, the host loop's
share of a step without cProfile's per-call cost (compare versions by alternating them; a loop that only calls
``run_with_iobinding`` takes ~10 us).

    .venv/bin/python benchmarks/profile_decode.py runs/smollm2-int4-rtn-head4-onnx/export --gaps 3 --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from toolkit.runtime import BackendOptions, Engine, GenerationConfig, OrtBackend, Tokenizer

PROMPT = "Write a long story about a dragon who learns to code."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--graph-argmax", action="store_true", help="read the graph's next-token ArgMax output")
    p.add_argument("--top", type=int, default=12, help="functions listed, by own time")
    p.add_argument("--gaps", type=int, default=0, metavar="N", help="N generates: the host loop's CPU between steps")
    p.add_argument("--threads", type=int, default=1, help="ORT threads (the profile: keep 1, see above)")
    a = p.parse_args(argv)
    backend = OrtBackend(a.export, BackendOptions(threads=a.threads, next_token=a.graph_argmax))
    engine = Engine(backend, Tokenizer.from_folder(a.export), max_batch=1)
    config = GenerationConfig(max_new_tokens=a.tokens, min_new_tokens=a.tokens)  # as the benchmarks run
    engine.generate(PROMPT, config)  # warm-up
    if a.gaps:
        return host_gaps(engine, config, a.gaps)
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    engine.generate(PROMPT, config)
    profile.disable()
    stats = pstats.Stats(profile)
    rows = stats.stats  # type: ignore[attr-defined]
    step = sum(v[3] for k, v in rows.items() if k[2] == "decode_one_token")
    run = sum(v[2] for k, v in rows.items() if k[0] == "~" and "run_with_iobinding" in k[2])  # prefill's run too
    whole = sum(v[2] for v in rows.values())
    n = a.tokens - 1  # the first token comes from the prefill
    print(f"{a.export} ({'graph argmax' if a.graph_argmax else 'logits argmax in numpy'}), {n} decode steps: "
          f"decode_one_token {1000 * step / n:.3f} ms/step CPU; whole generate {1000 * whole / n:.3f} ms/token, "
          f"session.run {100 * run / whole:.1f} % of it, Python {1000 * (whole - run) / n:.3f} ms/token")
    stats.sort_stats("tottime").print_stats(a.top)
    return 0


def host_gaps(engine: Engine, config: GenerationConfig, generates: int) -> int:
    session = engine.backend.session  # type: ignore[attr-defined]
    run, stamps = session.run_with_iobinding, []

    def timed(*args: Any, **kw: Any) -> Any:
        start = time.thread_time()
        try:
            return run(*args, **kw)
        finally:
            stamps.append((start, time.thread_time()))

    session.run_with_iobinding = timed
    medians = []
    for _ in range(generates):
        stamps.clear()
        engine.generate(PROMPT, config)
        steps = stamps[1:]  # the prefill's call first
        medians.append(statistics.median(b[0] - a[1] for a, b in itertools.pairwise(steps)) * 1e6)
    print(f"host loop between decode steps (calling thread's CPU, median per generate): "
          f"{', '.join(f'{m:.0f}' for m in medians)} us; median {statistics.median(medians):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
