"""Wall time and peak memory of GPTQ (or AWQ) on SmolLM2 with the default calibration.

    python benchmarks/quantize_time.py                 # GPTQ int4 g32 sym, 128 x 512 calibration windows
    python benchmarks/quantize_time.py --method awq --count 32

Targets: <= 5 min and <= 3 GB peak RSS on 2 cores. One run (quantization is minutes long);
the calibration tokenization is included, model loading is not.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolkit.data import WindowSpec, token_windows
from toolkit.models import load
from toolkit.passes import awq, gptq
from toolkit.passes.context import PassContext


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load("smollm2")
    rss_loaded = peak_rss_mb()
    spec = WindowSpec(split="calibration", count=args.count, length=args.length, sampling="random")
    start = time.perf_counter()
    ctx = PassContext(lm.tokenizer, lambda: token_windows(lm.tokenizer, spec), lambda: load("smollm2").model,
                      Path(tempfile.mkdtemp(prefix="quantize_time_")), progress=True)
    if args.method == "gptq":
        gptq.apply(lm.model, gptq.GPTQConfig(), ctx)
    else:
        awq.apply(lm.model, awq.AWQConfig(), ctx)
    seconds = time.perf_counter() - start
    print(f"{args.method} int4 g32 sym, calibration {args.count} x {args.length}, {args.threads} threads: "
          f"{seconds:.1f} s wall, peak RSS {peak_rss_mb():.0f} MB (after loading the model: {rss_loaded:.0f} MB)")


if __name__ == "__main__":
    main()
