"""The packed format's arithmetic: per-group scales and zero points (min/max, round to nearest), codes, and their
dequantization, ``w ≈ (q - zero) * scale``.

Scales are stored as float16; codes are always computed against the float16-rounded scale so the
stored model is exactly what was evaluated. Conventions in ``toolkit.quant.spec``;
integer weights only (``spec.type == "int"``): fp8 weights have no codes and zero points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from toolkit.errors import ToolkitError

if TYPE_CHECKING:  # the spec imports this module: its methods are this arithmetic
    from toolkit.quant.spec import QuantSpec


def _integer(spec: QuantSpec) -> None:
    if spec.type != "int":
        raise ToolkitError(f"integer codes were asked of {spec.type} weights ({spec}); fp8 weights have no "
                           "integer arithmetic yet: use type: int")


def fp16_representable(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (storage dtype), never to zero or infinity."""
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny, max=torch.finfo(torch.float16).max).to(torch.float16).to(torch.float32)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points per group. ``w: [out, in]`` -> scales, zeros ``[out, G]``."""
    _integer(spec)
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, spec.groups(in_f), spec.group(in_f))
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = wg.abs().amax(dim=-1) / (half - 1)
        scale = fp16_representable(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zero
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = fp16_representable(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.round(-lo / scale).clamp(0, spec.qmax).to(torch.uint8)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes for ``w: [out, in]`` given per-group ``scale, zero: [out, G]`` -> ``uint8 [out, in]``."""
    _integer(spec)
    group = spec.group(w.shape[1])
    s = scale.repeat_interleave(group, dim=1)
    z = zero.to(torch.float32).repeat_interleave(group, dim=1)
    return torch.round(w.float() / s + z).clamp(0, spec.qmax).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``(q - zero) * scale`` with per-group parameters broadcast over ``group`` input channels."""
    out_f, in_f = q.shape
    qg = q.reshape(out_f, in_f // group, group).to(torch.float32)
    w = (qg - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scales, zeros)`` for ``w: [out, in]``."""
    scale, zero = compute_qparams(w, spec)
    return quantize(w, scale, zero, spec), scale, zero
