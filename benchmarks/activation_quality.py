"""Perplexity of SmolLM2 with quantized activations (W8A8 int8, FP8) under the default evaluation protocol.

    python benchmarks/activation_quality.py                       # every row below (hours on a shared 2-core host)
    python benchmarks/activation_quality.py --rows float,w8a8-sq --alphas 0.5
    python benchmarks/activation_quality.py --model tiny-llama --windows 1 --calib-count 2 --calib-length 32

Rows: float; FP8 dynamic (fp8 e4m3 per-channel weights rounded to nearest, per-token dynamic activations); FP8
dynamic with GPTQ on the e4m3 grid (the ``smollm2-fp8-dynamic`` recipe: the same checkpoint format), and with
SmoothQuant (alpha 0.5) before it, with asymmetric calibration (GPTAQ: ``asymmetric: true``) and with the
per-channel scale search (``scale_search: true``), with GPTQ dampening 0.1 and 0.001, with SmoothQuant alpha 0.65, with
the layer norms folded into their readers (``rotate`` with ``steps: 0``; RTN and GPTQ) and with the fitted residual
rotation of ``passes/rotate.py`` before it (RTN and GPTQ); naive W8A8 (int8 per-channel RTN weights, int8 per-token dynamic activations, no
smoothing); W8A8 + SmoothQuant (alpha 0.5: the ``smollm2-w8a8-smoothquant`` recipe); W8A8 static (per-tensor
activation scales calibrated, with and without SmoothQuant); then the SmoothQuant alpha sweep of W8A8 dynamic.
Calibration (SmoothQuant, GPTQ, static scales): 32 random 512-token windows of the calibration half. Heads stay
float (as the recipes keep them), so every difference is the body's. Prints a markdown table with the change
against float; rows can run in separate processes (``--rows``, ``--alphas ""``), float is then read from the
process that ran it.

Measured 2026-12-06 (default protocol, heads float; rows from three runs: float and FP8 RTN / GPTQ on a shared
machine, the static rows and the sweep idle, ``--rows float,w8a8-static,w8a8-static-sq --alphas 0.3,0.65,0.8``):
| model | perplexity | vs float |
|---|---|---|
| float | 14.805 | - |
| fp8-dynamic | 15.311 | +3.42 % |
| fp8-dynamic-gptq | 14.975 | +1.15 % |
| w8a8-naive | 15.182 | +2.55 % |
| w8a8-sq (alpha 0.5) | 14.952 | +0.99 % |
| w8a8-sq alpha 0.3 / 0.65 / 0.8 | 15.242 / 14.932 / 15.251 | +2.95 % / +0.86 % / +3.01 % |
| w8a8-static | 35.031 | +136.62 % |
| w8a8-static-sq | 19.277 | +30.20 % |
(w8a8-naive and alpha 0.5 from an earlier run of the same code path.)
Screened on 4 windows (2026-12-06, a heavily loaded shared machine; ``--rows float,fp8-dynamic-gptq --windows 4``
and the asymmetric row alone): float 15.163, fp8-dynamic-gptq 15.375 (+1.40 %), fp8-dynamic-gptq-asymmetric 15.555
(+2.58 %: worse; the float target moves the weights by a median 4 % of their norm, max 11 %, fitting the 32
calibration windows rather than the model). fp8-dynamic-gptq-scale-search: on held-out real inputs of every third
layer (H from 2 windows, error on a third) it lowers GPTQ's relative output error from 0.413e-3 to 0.363e-3 with fp8
weights alone and from 0.836e-3 to 0.785e-3 with fp8 inputs as well, yet the model is worse: 15.012 (+1.40 %) on the
16 windows against 14.975 (+1.15 %) without it (``toolkit run`` of recipes/smollm2-fp8-dynamic.yaml with
``scale_search: true`` added, empty cache, idle 2-core VM).
Issue #23's attempts on the default protocol (2026-12-06, host loaded by other sessions, one process per row,
``--rows <row> --alphas ""``; float 14.805 from the table above):
| model | perplexity | vs float |
|---|---|---|
| fp8-dynamic-rot-gptq | 15.041 | +1.59 % |
| fp8-dynamic-fold-gptq | 14.966 | +1.09 % |
The fitted rotation halves the fp8 input-rounding cost with weights float or rounded to nearest on the 4-window
screen (benchmarks/fp8_rotation_screen.py: +0.76 % against +1.68 % inputs only, +2.26 % against +2.96 % RTN), yet
after GPTQ it is worse than GPTQ alone (+1.59 % against +1.15 %; not analysed further). Folding the layer norms
into their readers before GPTQ (no rotation) gives +1.09 %: 0.06 points better than GPTQ alone, within what a
different calibration draw could move, and still above +1.0 %; the recipe is unchanged. The floor these attempts
face is benchmarks/fp8_error_sources.py's: fp8 inputs alone, weights float, +1.23 % on the 16 windows. SmoothQuant
(alpha 0.5) before the fp8 GPTQ, ``--rows fp8-dynamic-sq-gptq --alphas ""`` (idle, 2026-12-06): 15.015, +1.42 % against
float's 14.805, worse than GPTQ alone. Not measured (no time left in the session): fp8-dynamic-sq0.65-gptq, the two
dampening rows, 64 and 128 calibration windows (``--rows fp8-dynamic-gptq --calib-count 64``).
With KL against float (x 1e-4; the KL column since 2026-12-06), ``--rows fp8-dynamic-rotloss-gptq,fp8-dynamic-gptq
--alphas ""`` (host loaded by another session; float 14.805):
| model | perplexity | vs float | KL x 1e-4 |
|---|---|---|---|
| fp8-dynamic-rotloss-gptq | 14.990 | +1.25 % | 127.4 |
| fp8-dynamic-gptq | 14.982 | +1.20 % | 147.2 |
The loss-weighted rotation (``rotate`` with ``objective: loss``) removes 13 % of the recipe's KL; perplexity does not
see it: at this KL it moves by tenths of a percent with the rounding's draw (fp8_error_sources.py ``--draws``).
Keeping the three groups fp8_error_sources.py ``--groups`` ranks first in float (the smollm2-fp8-dynamic-mixed
recipe), ``--rows "" --alphas "" --skip "model.layers.29.mlp.*,model.layers.10.self_attn.[qkv]_proj"`` (2026-12-07,
idle for the first row; float 14.805):
| model | perplexity | vs float | KL x 1e-4 |
|---|---|---|---|
| fp8-dynamic-gptq-skip | 14.948 | +0.97 % | 118.0 |
| fp8-dynamic-rotloss-gptq-skip | 14.974 | +1.14 % | 114.6 |
With those groups float the loss-weighted rotation takes only 3 % of the KL away (it mostly acted on them), and
unties the head: the mixed recipe does without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from toolkit.data import WindowSpec, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.models import load
from toolkit.passes import gptq, rotate, rtn, smoothquant
from toolkit.passes.context import PassContext
from toolkit.quant.spec import ActivationSpec

INT8_DYNAMIC = ActivationSpec("int", 8, "token", dynamic=True)
INT8_STATIC = ActivationSpec("int", 8, "tensor", dynamic=False)
FP8_DYNAMIC = ActivationSpec("float", 8, "token", dynamic=True)
W8A8 = rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_DYNAMIC, lm_head_bits=None)
W8A8_STATIC = rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_STATIC, lm_head_bits=None)
FP8 = rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None)
GPTQ_FP8 = gptq.GPTQConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None)
GPTQ_FP8_ASYMMETRIC = dataclasses.replace(GPTQ_FP8, asymmetric=True)
GPTQ_FP8_SEARCH = dataclasses.replace(GPTQ_FP8, scale_search=True)
GPTQ_FP8_DAMP_HIGH = dataclasses.replace(GPTQ_FP8, damp=0.1)
GPTQ_FP8_DAMP_LOW = dataclasses.replace(GPTQ_FP8, damp=0.001)
ROTATE = rotate.RotateConfig()  # the residual rotation fitted to fp8 input rounding, layer norms folded
ROTATE_LOSS = rotate.RotateConfig(objective="loss")  # the same, each reader weighted by its loss gradients
FOLD = rotate.RotateConfig(steps=0)  # the layer norms folded into their readers, no rotation
Step = Callable[[nn.Module, PassContext], nn.Module]


def _smooth(alpha: float) -> Step:
    return lambda m, ctx: smoothquant.apply(m, smoothquant.SmoothQuantConfig(alpha=alpha), ctx)  # type: ignore[arg-type]


def _rotate(config: rotate.RotateConfig) -> Step:
    return lambda m, ctx: rotate.apply(m, config, ctx)  # type: ignore[arg-type]


def _rtn(config: rtn.RTNConfig) -> Step:
    return lambda m, ctx: rtn.apply(m, config, ctx)  # type: ignore[arg-type]


def _gptq(config: gptq.GPTQConfig) -> Step:
    return lambda m, ctx: gptq.apply(m, config, ctx)  # type: ignore[arg-type]


ROWS: dict[str, list[Step]] = {
    "float": [],
    "fp8-dynamic": [_rtn(FP8)],
    "fp8-dynamic-gptq": [_gptq(GPTQ_FP8)],
    "fp8-dynamic-sq-gptq": [_smooth(0.5), _gptq(GPTQ_FP8)],
    "fp8-dynamic-sq0.65-gptq": [_smooth(0.65), _gptq(GPTQ_FP8)],
    "fp8-dynamic-fold": [_rotate(FOLD), _rtn(FP8)],
    "fp8-dynamic-fold-gptq": [_rotate(FOLD), _gptq(GPTQ_FP8)],
    "fp8-dynamic-rot": [_rotate(ROTATE), _rtn(FP8)],
    "fp8-dynamic-rot-gptq": [_rotate(ROTATE), _gptq(GPTQ_FP8)],
    "fp8-dynamic-rotloss": [_rotate(ROTATE_LOSS), _rtn(FP8)],
    "fp8-dynamic-rotloss-gptq": [_rotate(ROTATE_LOSS), _gptq(GPTQ_FP8)],
    "fp8-dynamic-gptq-damp0.1": [_gptq(GPTQ_FP8_DAMP_HIGH)],
    "fp8-dynamic-gptq-damp0.001": [_gptq(GPTQ_FP8_DAMP_LOW)],
    "fp8-dynamic-gptq-asymmetric": [_gptq(GPTQ_FP8_ASYMMETRIC)],
    "fp8-dynamic-gptq-scale-search": [_gptq(GPTQ_FP8_SEARCH)],
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
    parser.add_argument("--skip", default="", help="comma-separated module patterns kept float: adds the rows "
                        "fp8-dynamic-gptq-skip and fp8-dynamic-rotloss-gptq-skip (fp8_error_sources.py --groups ranks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.model)
    windows = token_windows(base.tokenizer, WindowSpec(count=args.windows))
    calib = token_windows(base.tokenizer, WindowSpec(split="calibration", count=args.calib_count,
                                                     length=args.calib_length, sampling="random"))
    rows = {name: ROWS[name] for name in args.rows.split(",") if name}
    if args.skip:
        skipping = dataclasses.replace(GPTQ_FP8, skip=tuple(args.skip.split(",")))
        rows.update({"fp8-dynamic-gptq-skip": [_gptq(skipping)],
                     "fp8-dynamic-rotloss-gptq-skip": [_rotate(ROTATE_LOSS), _gptq(skipping)]})
    rows.update({f"w8a8-sq alpha {a}": [_smooth(float(a)), _rtn(W8A8)]
                 for a in args.alphas.split(",") if a and not ("w8a8-sq" in rows and float(a) == 0.5)})
    print(f"{args.model}; calibration (SmoothQuant, GPTQ, static scales) {args.calib_count} x {args.calib_length}; "
          f"evaluation {args.windows} x 512 (16: the default protocol)\n")
    print("| model | perplexity | vs float | KL x 1e-4 |\n|---|---|---|---|", flush=True)
    float_ppl, reference = None, load(args.model).model
    for name, steps in rows.items():
        model = load(args.model).model
        with tempfile.TemporaryDirectory(prefix="activation_quality_") as work:
            ctx = PassContext(base.tokenizer, lambda: calib, lambda: load(args.model).model, Path(work))
            for step in steps:
                model = step(model, ctx)
        found = evaluate(model, windows, reference=reference)
        ppl = found["perplexity"]
        float_ppl = ppl if name == "float" else float_ppl
        change = "-" if float_ppl is None or name == "float" else f"{100 * (ppl / float_ppl - 1):+.2f} %"
        print(f"| {name} | {ppl:.3f} | {change} | {1e4 * found['kl_divergence']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
