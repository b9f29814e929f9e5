"""Soak: 1,000 sequential short requests must not grow the process's memory.

    .venv/bin/python benchmarks/soak_runtime.py out/tiny-fp32            # tiny graph: ~1 minute
    .venv/bin/python benchmarks/soak_runtime.py out/smol-int4 --requests 1000

Prompts of 5-40 tokens and budgets that vary within 4x (so the cache is reused, not reallocated).
RSS is read after a warm-up and at the end; exit 1 when it grew by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import psutil

from toolkit.runtime import GenerationConfig, load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-growth-mb", type=float, default=8.0)
    a = p.parse_args(argv)
    engine = load(a.artifact, threads=a.threads)
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "memory", "stays", "flat"]
    proc = psutil.Process()
    reallocations, last_cache = 0, None
    rss_warm = 0.0
    start = time.perf_counter()
    for i in range(a.requests):
        prompt = " ".join(rng.choice(words, int(rng.integers(2, 12))))
        config = GenerationConfig(max_new_tokens=int(rng.integers(8, 25)), seed=i, do_sample=bool(i % 2))
        engine.generate(prompt, config)
        if engine.backend.cache is not last_cache:
            reallocations, last_cache = reallocations + 1, engine.backend.cache
        if i + 1 == a.warmup:
            rss_warm = proc.memory_info().rss / 2**20
    rss_end = proc.memory_info().rss / 2**20
    result = {"requests": a.requests, "seconds": round(time.perf_counter() - start, 1),
              "rss_after_warmup_mb": round(rss_warm, 1), "rss_end_mb": round(rss_end, 1),
              "growth_mb": round(rss_end - rss_warm, 2), "cache_allocations": reallocations}
    print(json.dumps(result))
    return 0 if result["growth_mb"] <= a.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
