"""Two of our exports decoded alternately, for a graph change too small for separate processes to resolve.

Each process loads both exports (``load``, as a user would), warms both up, then decodes the same prompt greedily
``--pairs`` times each, alternating A B B A, and reports B's decode tokens/s over A's per pair. The second session
created in a process runs a few % cheaper or dearer whatever it holds (README, issue #22), so the processes
alternate which export is loaded first and the summary gives the median ratio for each order and their geometric
mean, which cancels that bias. Tokens are compared too: two exports of the same weights must decode the same text.

    .venv/bin/python benchmarks/exports_ab.py OLD_EXPORT NEW_EXPORT --processes 2 --pairs 12
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import prompt_ids  # noqa: E402


def run_one(a: argparse.Namespace, b_first: bool) -> dict[str, object]:
    """This process: B's tok/s over A's for each pair, and whether the two decoded the same tokens."""
    from toolkit.runtime import GenerationConfig, load

    folders = {"a": a.a, "b": a.b}
    # keyed by role, not folder: A against itself (the noise floor) still loads two sessions
    engines = {n: load(folders[n], threads=a.threads, max_batch=1) for n in (("b", "a") if b_first else ("a", "b"))}
    prompt = prompt_ids(engines["a"].tokenizer, a.prompt_tokens)
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    for engine in engines.values():
        engine.generate(prompt, GenerationConfig(max_new_tokens=8))  # warm-up
    ratios, same = [], True
    for i in range(a.pairs):
        runs = {n: engines[n].generate(prompt, config) for n in (("a", "b") if i % 2 == 0 else ("b", "a"))}
        ratios.append(runs["b"].timings.decode_tok_s / runs["a"].timings.decode_tok_s)
        same = same and runs["a"].token_ids == runs["b"].token_ids
    return {"ratios": ratios, "same_tokens": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the baseline export")
    p.add_argument("b", type=Path, help="the export compared with it")
    p.add_argument("--processes", type=int, default=2, help="fresh processes, alternately loading A or B first")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--one", choices=("a-first", "b-first"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a, a.one == "b-first")))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    by_order: dict[str, list[float]] = {"a-first": [], "b-first": []}
    same = True
    for i in range(a.processes):
        order = "a-first" if i % 2 == 0 else "b-first"
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", order], check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        by_order[order] += result["ratios"]
        same = same and result["same_tokens"]
        print(f"process {i + 1} ({order}): B/A per pair " + " ".join(f"{x:.3f}" for x in result["ratios"]))
    medians = {k: statistics.median(v) for k, v in by_order.items() if v}
    summary = " ".join(f"{k} {m:.3f}" for k, m in medians.items())
    both = math.sqrt(medians["a-first"] * medians["b-first"]) if len(medians) == 2 else next(iter(medians.values()))
    print(f"B/A decode tokens/s: median {summary}; both orders {both:.3f}; same tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
