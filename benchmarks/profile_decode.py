"""Where a greedy decode step's time goes: inside onnxruntime's run vs the Python around it (cProfile).

Timed with the calling thread's CPU time and one ORT thread (the graph then runs on the calling thread), so
time other processes take from a shared machine is not counted. ``--graph-argmax`` reads the graph's next-token
ArgMax output (added at load where the graph has none) instead of numpy's argmax of the [1, V] logits. cProfile
adds about a microsecond per Python call, so the Python share it shows is an upper bound.

    .venv/bin/python benchmarks/profile_decode.py runs/smollm2-int4-rtn-head4-onnx/export --tokens 128
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

from toolkit.runtime import BackendOptions, Engine, GenerationConfig, OrtBackend, Tokenizer

PROMPT = "Write a long story about a dragon who learns to code."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--graph-argmax", action="store_true", help="read the graph's next-token ArgMax output")
    p.add_argument("--top", type=int, default=12, help="functions listed, by own time")
    a = p.parse_args(argv)
    backend = OrtBackend(a.export, BackendOptions(threads=1, next_token=a.graph_argmax))
    engine = Engine(backend, Tokenizer.from_folder(a.export), max_batch=1)
    config = GenerationConfig(max_new_tokens=a.tokens, min_new_tokens=a.tokens)  # as the benchmarks run
    engine.generate(PROMPT, config)  # warm-up
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


if __name__ == "__main__":
    sys.exit(main())
