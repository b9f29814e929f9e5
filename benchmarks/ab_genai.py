"""A/B of runtime overhead: our runtime vs onnxruntime-genai's og.Generator on the SAME graph.

Runs alternate in one process (ours, genai, ours, genai, ...) so that load on a shared machine hits
both alike; the figures are medians of the per-pair ratios. Same prompt (256 tokens), 128 new
tokens, greedy, same thread count; spinning threads like genai's unless ``--no-spin``.

    .venv/bin/python benchmarks/ab_genai.py out/smol-int4 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import genai_folder, prompt_ids  # noqa: E402

from toolkit.runtime import GenerationConfig, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="a folder with genai_config.json (onnxruntime-genai build)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-spin", dest="spin", action="store_false")
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
