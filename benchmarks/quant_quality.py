"""Perplexity of RTN / GPTQ / AWQ / AWQ+GPTQ on SmolLM2 under the default evaluation protocol.

    python benchmarks/quant_quality.py                                   # everything (slow: tens of minutes)
    python benchmarks/quant_quality.py --methods gptq --settings g32sym --calib-count 32

Prints a markdown table (perplexity, KL to float, top-1 agreement, quantization seconds).
Calibration: random windows from the calibration half (it holds ~61.8k tokens, fewer than
128 x 512 non-overlapping, so windows are drawn at seeded random offsets).

Measured (2026-11-21, --calib-count 16 --threads 2, machine loaded ~15 runnable threads on 2 cores;
RTN rows from the reference protocol, float 14.805):
| method | setting | perplexity | quantize s (inflated by load) |
|---|---|---|---|
| rtn | g32sym | 19.87 | - |
| gptq | g32sym | 16.551 | 1230 |
| awq | g32sym | 17.001 | 2326 |
| rtn | g64asym | 19.27 | - |
| gptq | g64asym | 16.609 | 947 |
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from toolkit.data import WindowSpec, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.models import load
from toolkit.passes import awq, gptq, rtn
from toolkit.passes.context import PassContext

SETTINGS = {"g32sym": dict(bits=4, group_size=32, symmetric=True), "g64asym": dict(bits=4, group_size=64, symmetric=False)}
METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def quantize(method: str, model: torch.nn.Module, setting: dict, ctx: PassContext, args: argparse.Namespace) -> None:
    gptq_cfg = gptq.GPTQConfig(**setting, damp=args.damp, act_order=not args.no_act_order)
    if method == "rtn":
        rtn.apply(model, rtn.RTNConfig(**setting), ctx)
    elif method == "gptq":
        gptq.apply(model, gptq_cfg, ctx)
    elif method == "awq":
        awq.apply(model, awq.AWQConfig(**setting, clip=not args.no_clip), ctx)
    elif method == "awq+gptq":
        awq.apply(model, awq.AWQConfig(**setting, clip=not args.no_clip, quantize=False), ctx)
        gptq.apply(model, gptq_cfg, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--calib-count", type=int, default=128)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--no-clip", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--kl", action="store_true", help="also KL/top-1 against float (doubles evaluation time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load("smollm2")
    windows = token_windows(base.tokenizer, WindowSpec())
    calib = WindowSpec(split="calibration", count=args.calib_count, length=args.calib_length, sampling="random")
    calib_windows = token_windows(base.tokenizer, calib)
    print(f"calibration {args.calib_count} x {args.calib_length} (random offsets), evaluation 16 x 512; "
          "float perplexity 14.805\n", flush=True)
    print("| method | setting | perplexity | KL | top-1 | seconds |\n|---|---|---|---|---|---|", flush=True)
    for setting_name in args.settings.split(","):
        for method in args.methods.split(","):
            model = load("smollm2").model
            ctx = PassContext(base.tokenizer, lambda: calib_windows, lambda: load("smollm2").model,
                              Path(tempfile.mkdtemp(prefix="quant_quality_")), progress=args.progress)
            start = time.perf_counter()
            quantize(method, model, SETTINGS[setting_name], ctx, args)
            seconds = time.perf_counter() - start
            r = evaluate(model, windows, base.model if args.kl else None)
            kl = f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.3f}" if args.kl else "- | -"
            print(f"| {method} | {setting_name} | {r['perplexity']:.3f} | {kl} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
