"""How the fp8 KV cache's rounding moves perplexity: a packed model folder with an fp8 KV cache (the ``kv_cache`` pass)
evaluated with its keys and values rounded several ways, the scales kept: e4m3 to nearest (what the model and vLLM's
``kv_cache_dtype="fp8"`` do), e4m3 truncated toward zero, e5m2 to nearest, and a float cache. A diagnostic for an
engine whose fp8 cache costs more than ours; the default evaluation windows (16 x 512 pydoc).

    .venv/bin/python benchmarks/kv_cache_rounding.py runs/smollm2-fp8-dynamic-kv/model
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from toolkit.evaluation import perplexity
from toolkit.quant import checkpoint, kv_cache

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def e4m3_truncated(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 with the 3-bit mantissa truncated toward zero (normal range; subnormals to nearest)."""
    y = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX)
    exponent = torch.floor(torch.log2(y.abs().clamp(min=2.0**-6)))
    step = 2.0 ** (exponent - 3)
    return (torch.trunc(y / step) * step * scale).to(x.dtype)


def e5m2(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = (x.float() / scale).clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2).to(torch.float32)
    return (y * scale).to(x.dtype)


ROUNDINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "e4m3 to nearest": kv_cache.fp8_round, "e4m3 truncated": e4m3_truncated, "e5m2 to nearest": e5m2,
    "float cache": lambda x, scale: x}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a packed model folder with an fp8 KV cache")
    p.add_argument("--tokenizer", default="smollm2")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--only", nargs="*", choices=list(ROUNDINGS), default=list(ROUNDINGS))
    a = p.parse_args()
    from bench_consumers import windows

    wins = windows(a.tokenizer, a.count, a.length)
    model = checkpoint.load_model(a.folder)
    if kv_cache.spec_of(model) is None:
        raise SystemExit(f"{a.folder} has no fp8 KV cache: give the model folder of a recipe with the kv_cache pass")
    original = kv_cache.fp8_round
    for name in a.only:
        kv_cache.fp8_round = ROUNDINGS[name]  # type: ignore[assignment]
        try:
            ppl = perplexity.evaluate(model, wins)["perplexity"]
        finally:
            kv_cache.fp8_round = original
        print(f"{name}: perplexity {ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
