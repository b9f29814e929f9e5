"""Perplexity of SmolLM2 with quantized activations (W8A8 int8, FP8) under the default evaluation protocol.

    python benchmarks/activation_quality.py                       # every row below (about 15 min on 2 cores)
    python benchmarks/activation_quality.py --rows float,w8a8-sq --alphas 0.5

Rows: float; naive W8A8 (int8 per-channel RTN weights, int8 per-token dynamic activations, no smoothing);
W8A8 + SmoothQuant (alpha 0.5: the ``smollm2-w8a8-smoothquant`` recipe); W8A8 static (per-tensor activation scales
calibrated after SmoothQuant); FP8 dynamic (fp8 e4m3 per-channel weights, per-token dynamic activations: the
``smollm2-fp8-dynamic`` recipe); then the SmoothQuant alpha sweep. Heads stay float (as the recipes keep them),
so every difference is the body's. Prints a markdown table with the change against float.

Measured 2026-12-06 (2 threads, machine shared with other sessions; the run was cut at the report deadline, the
remaining rows were not reached):
| model | perplexity | vs float |
|---|---|---|
| float | 14.805 | - |
| w8a8-naive | 15.182 | +2.55 % |
| w8a8-sq (alpha 0.5) | 14.952 | +0.99 % |
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from toolkit.data import WindowSpec, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.models import load
from toolkit.passes import gptq, rtn, smoothquant
from toolkit.passes.context import PassContext
from toolkit.quant.spec import ActivationSpec

INT8_DYNAMIC = ActivationSpec("int", 8, "token", dynamic=True)
INT8_STATIC = ActivationSpec("int", 8, "tensor", dynamic=False)
FP8_DYNAMIC = ActivationSpec("float", 8, "token", dynamic=True)
W8A8 = rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_DYNAMIC, lm_head_bits=None)
W8A8_STATIC = rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_STATIC, lm_head_bits=None)
FP8 = rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None)
GPTQ_FP8 = gptq.GPTQConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None)
Step = Callable[[nn.Module, PassContext], nn.Module]


def _smooth(alpha: float) -> Step:
    return lambda m, ctx: smoothquant.apply(m, smoothquant.SmoothQuantConfig(alpha=alpha), ctx)  # type: ignore[arg-type]


def _rtn(config: rtn.RTNConfig) -> Step:
    return lambda m, ctx: rtn.apply(m, config, ctx)  # type: ignore[arg-type]


def _gptq(config: gptq.GPTQConfig) -> Step:
    return lambda m, ctx: gptq.apply(m, config, ctx)  # type: ignore[arg-type]


ROWS: dict[str, list[Step]] = {
    "float": [],
    "fp8-dynamic": [_rtn(FP8)],
    "fp8-dynamic-gptq": [_gptq(GPTQ_FP8)],
    "fp8-dynamic-sq-gptq": [_smooth(0.5), _gptq(GPTQ_FP8)],
    "w8a8-naive": [_rtn(W8A8)],
    "w8a8-sq": [_smooth(0.5), _rtn(W8A8)],
    "w8a8-static-sq": [_smooth(0.5), _rtn(W8A8_STATIC)],
    "w8a8-static": [_rtn(W8A8_STATIC)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--alphas", default="0.3,0.5,0.65,0.8", help="SmoothQuant alpha sweep for W8A8 dynamic")
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2", help="a model source (tiny-llama: a quick check of the rows)")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens (16: the protocol)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.model)
    windows = token_windows(base.tokenizer, WindowSpec(count=args.windows))
    calib = token_windows(base.tokenizer, WindowSpec(split="calibration", count=args.calib_count,
                                                     length=args.calib_length, sampling="random"))
    rows = {name: ROWS[name] for name in args.rows.split(",") if name}
    rows.update({f"w8a8-sq alpha {a}": [_smooth(float(a)), _rtn(W8A8)]
                 for a in args.alphas.split(",") if a and not ("w8a8-sq" in rows and float(a) == 0.5)})
    print(f"{args.model}; calibration (SmoothQuant, GPTQ, static scales) {args.calib_count} x {args.calib_length}; "
          f"evaluation {args.windows} x 512 (16: the default protocol)\n")
    print("| model | perplexity | vs float |\n|---|---|---|", flush=True)
    float_ppl = None
    for name, steps in rows.items():
        model = load(args.model).model
        with tempfile.TemporaryDirectory(prefix="activation_quality_") as work:
            ctx = PassContext(base.tokenizer, lambda: calib, lambda: load(args.model).model, Path(work))
            for step in steps:
                model = step(model, ctx)
        ppl = evaluate(model, windows)["perplexity"]
        float_ppl = ppl if name == "float" else float_ppl
        change = "-" if float_ppl is None or name == "float" else f"{100 * (ppl / float_ppl - 1):+.2f} %"
        print(f"| {name} | {ppl:.3f} | {change} |", flush=True)


if __name__ == "__main__":
    main()
