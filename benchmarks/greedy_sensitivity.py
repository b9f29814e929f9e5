"""How far an export's greedy tokens move when only our own float arithmetic changes: the folder as ours reads it
(``bench_consumers.our_reading``) in float32 against the same model in float64, over bench_consumers' 3 chat prompts
x 32 tokens (EOS ignored). With dynamic per-token activations a last-bit change of an input flips its fp8 or int8
code, so this is the floor under the greedy agreement any other engine (vLLM) can reach on that export.

    .venv/bin/python benchmarks/greedy_sensitivity.py runs/smollm2-fp8-dynamic/export --report out/sensitivity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_consumers as bench  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def float64_divergence(model: Any, prompts: list[list[int]], new_tokens: int) -> list[dict[str, Any]]:
    """Per prompt, where ``model``'s greedy run first differs from the same model's in float64 (``divergence``'s
    record: "vllm" and "vllm_margin" are the float64 run's token and log-probability margin)."""
    wide = copy.deepcopy(model).double()
    out = []
    for prompt in prompts:
        tokens, logits = bench.greedy(model, prompt, new_tokens)
        wide_tokens, wide_logits = bench.greedy(wide, prompt, new_tokens)
        # every token's log-probability in the float64 run, keyed as vLLM's top log-probabilities are
        top = [{str(t): float(v) for t, v in enumerate(x.log_softmax(-1).tolist())} for x in wide_logits]
        out.append(bench.divergence(tokens, wide_tokens, logits, top))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a compressed-tensors or ModelOpt export folder")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    prompts = bench.chat_prompts(AutoTokenizer.from_pretrained(a.folder))
    result = float64_divergence(bench.our_reading(a.folder), prompts, a.tokens)
    for i, c in enumerate(result):
        print(f"prompt {i}: " + ("float32 and float64 greedy equal" if c["equal"] else
              f"first divergence at token {c['first_divergence']} (float32 {c['ours']}, float64 {c['vllm']}): "
              f"float32 logit margin {c['our_margin']:.4f}, float64 logprob margin {c['vllm_margin']:.4f}"))
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(json.dumps({"folder": str(a.folder), "greedy": result}, indent=2))


if __name__ == "__main__":
    main()
