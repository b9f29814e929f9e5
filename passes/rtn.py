"""Round-to-nearest weight-only quantization (int2/3/4/8, symmetric or asymmetric, grouped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from toolkit.models.streaming import SkeletonModel
from toolkit.passes.base import QuantPassConfig
from toolkit.passes.context import PassContext
from toolkit.quant.arithmetic import rtn_quantize
from toolkit.quant.spec import QuantSpec
from toolkit.quant.streaming import StreamOptions, stream_rtn
from toolkit.quant.surgery import check_group_size, install, quantize_head, target_linears


@dataclass(frozen=True)
class RTNConfig(QuantPassConfig):
    """Round-to-nearest needs nothing beyond the shared settings (bits, group, symmetry, skip, head bits)."""
    name: ClassVar[str] = "rtn"
    reads_calibration: ClassVar[bool] = False


@torch.no_grad()
def apply(model: PreTrainedModel, config: RTNConfig, ctx: PassContext | None = None) -> PreTrainedModel:
    """Quantize every decoder linear in place; RTN reads no calibration data."""
    config.scheme.weight_only(config.name)  # refuses a scheme this pass cannot run, before any work
    linears = target_linears(model, config.skip)
    check_group_size(linears, config.group_size)
    for name, linear in linears.items():
        codes, scale, zero = rtn_quantize(linear.weight.data, config.spec)
        install(model, name, linear, codes, scale, zero, config.spec)
    if config.lm_head_bits is not None:
        quantize_head(model, QuantSpec(config.lm_head_bits, config.group_size, symmetric=True))
    return model


def stream(src: SkeletonModel, out: Path, config: RTNConfig, ctx: PassContext | None,
           options: StreamOptions) -> dict[str, Any]:
    """RTN one tensor at a time from the shards into a sharded packed folder (bit-identical to ``apply``)."""
    config.scheme.weight_only(config.name)  # refuses a scheme this pass cannot run, before any work
    return stream_rtn(src, out, config, options)
