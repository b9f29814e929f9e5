"""Decode speed of one export with and without ``BackendOptions.huge_pages`` (runtime/huge_pages.py).

Each run is a fresh process (on and off alternated, the order flipped every round, since the second of two sessions
in one process runs cheaper whatever it holds); "off" replaces the collapse with a no-op, so everything else is the
same. Prints both tok/s per round, the per-round ratios and their median.

    .venv/bin/python benchmarks/huge_pages_ab.py runs/smollm2-int4-rtn-head4-onnx/export --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import prompt_ids  # noqa: E402


def run_one(folder: Path, mode: str, a: argparse.Namespace) -> float:
    """Median decode tokens/s over ``a.repeats`` greedy generations in this process."""
    import toolkit.runtime.backend as backend

    if mode == "off":
        backend.back_with_huge_pages = lambda spans: 0  # type: ignore[assignment]
    from toolkit.runtime import GenerationConfig, load

    engine = load(folder, threads=a.threads, max_batch=1)
    prompt = prompt_ids(engine.tokenizer, a.prompt_tokens)
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    engine.generate(prompt, GenerationConfig(max_new_tokens=8))  # warm-up
    rates = []
    for _ in range(a.repeats):
        r = engine.generate(prompt, config)
        rates.append(r.timings.decode_tok_s)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.export, a.one, a)))
        return 0
    rates: dict[str, list[float]] = {"on": [], "off": []}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for i in range(a.rounds):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode], check=True,
                                 capture_output=True, text=True).stdout
            rates[mode].append(float(out.strip().splitlines()[-1]))
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    for mode, values in rates.items():
        print(f"huge pages {mode:>3}: " + " ".join(f"{v:.1f}" for v in values) + " tok/s")
    print("on/off per round: " + " ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
