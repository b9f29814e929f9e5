"""Round-to-nearest quantization: integer weights (int2/3/4/8, symmetric or asymmetric, grouped) or fp8 e4m3
(per output channel, or per tensor with one scale shared by fused linears), optionally with quantized input
activations (W8A8 int8, FP8: dynamic per token, or static per tensor, whose scales are the one thing this pass
calibrates)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.streaming import SkeletonModel
from toolkit.passes.base import QuantPassConfig
from toolkit.passes.context import PassContext
from toolkit.quant.arithmetic import rtn_quantize
from toolkit.quant.spec import QuantSpec
from toolkit.quant.streaming import StreamOptions, stream_rtn
from toolkit.quant.surgery import (
    check_group_size,
    fused_weight_scales,
    install,
    install_fp8,
    quantize_head,
    static_input_scales,
    target_linears,
)


@dataclass(frozen=True)
class RTNConfig(QuantPassConfig):
    """Round-to-nearest needs nothing beyond the shared settings (bits, group, symmetry, type, input activations,
    skip, head bits)."""
    name: ClassVar[str] = "rtn"

    @property
    def reads_calibration(self) -> bool:  # type: ignore[override]
        """Only static activation scales are calibrated; weights are rounded without data."""
        acts = self.input_activations
        return acts is not None and not acts.dynamic

    @property
    def spec(self) -> QuantSpec:
        """RTN runs quantized input activations and fp8 weights too (``QuantScheme.runnable``)."""
        return self.scheme.runnable(self.name)


@torch.no_grad()
def apply(model: PreTrainedModel, config: RTNConfig, ctx: PassContext | None = None) -> PreTrainedModel:
    """Quantize every decoder linear in place; RTN reads calibration data only for static activation scales."""
    scheme = config.scheme
    spec = scheme.runnable(config.name)  # refuses a scheme this pass cannot run, before any work
    act = scheme.input_activations
    if config.reads_calibration and ctx is None:
        raise ToolkitError("rtn with static activation scales calibrates them: give it calibration data "
                           "(a PassContext), or use dynamic: true")
    linears = target_linears(model, config.skip)
    check_group_size(linears, config.group_size)
    input_scales = static_input_scales(model, linears, act, ctx.calibration()) if ctx and config.reads_calibration else {}
    weight_scales = fused_weight_scales(model, linears) if spec.per_tensor else {}
    for name, linear in linears.items():
        if spec.type == "float":
            module = install_fp8(model, name, linear, spec, act, scale=weight_scales.get(name))
        else:
            codes, scale, zero = rtn_quantize(linear.weight.data, spec)
            module = install(model, name, linear, codes, scale, zero, spec, act)
        if name in input_scales:
            module.input_scale.copy_(input_scales[name])
    if config.lm_head_bits is not None:
        quantize_head(model, QuantSpec(config.lm_head_bits, config.group_size, symmetric=True))
    return model


def stream(src: SkeletonModel, out: Path, config: RTNConfig, ctx: PassContext | None,
           options: StreamOptions) -> dict[str, Any]:
    """RTN one tensor at a time from the shards into a sharded packed folder (bit-identical to ``apply``)."""
    config.scheme.weight_only(f"{config.name} layer by layer")  # the runner streams weight-only configs only
    return stream_rtn(src, out, config, options)
