"""Weight quantization math and the quantized modules that compute from packed storage.

Convention everywhere (RTN, GPTQ, AWQ, exporters): unsigned codes ``q`` in ``[0, 2^bits - 1]``,
one scale and one integer zero point per group of ``group_size`` consecutive input channels,
``w ≈ (q - zero) * scale``. Symmetric quantization fixes ``zero = 2^(bits-1)`` and
``scale = absmax / (2^(bits-1) - 1)`` (int4: absmax/7, codes 1..15 used), the format
onnxruntime's MatMulNBits uses with its default zero point 8.
Scales are stored as float16; codes are always computed against the float16-rounded scale so the
stored model is exactly what was evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.formats import layout_for

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 32  # -1: one group per whole row
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, or -1 for whole rows; got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def valid_group_sizes(in_dims: list[int]) -> list[int]:
    """Group sizes (>= 8, even) that divide every input dimension, largest last."""
    g = 0
    for d in in_dims:
        g = math.gcd(g, d)
    return [s for s in range(8, g + 1) if g % s == 0 and s % 2 == 0]


def fp16_representable(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (storage dtype), never to zero or infinity."""
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny, max=torch.finfo(torch.float16).max).to(torch.float16).to(torch.float32)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points per group. ``w: [out, in]`` -> scales, zeros ``[out, G]``."""
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


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scales, zeros)`` for ``w: [out, in]``."""
    scale, zero = compute_qparams(w, spec)
    return quantize(w, scale, zero, spec), scale, zero


class QuantLinear(nn.Module):
    """A linear layer computing from packed integer weights.

    Buffers: ``qweight`` (packed codes, ``[out, in/2]`` for <=4 bits, ``[out, in]`` for 8),
    ``scales`` (float16 ``[out, G]``), ``qzeros`` (uint8 ``[out, G]``), optional ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.groups(in_features)
        packed_in = in_features // 2 if spec.bits <= 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed_in, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None
    ) -> QuantLinear:
        out_f, in_f = q.shape
        layer = cls(in_f, out_f, spec, bias=bias is not None)
        layer.qweight.copy_(layout_for(spec.bits).pack(q))
        layer.scales.copy_(scale.to(torch.float16))
        layer.qzeros.copy_(zero.to(torch.uint8))
        if bias is not None and layer.bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def codes(self) -> torch.Tensor:
        return layout_for(self.spec.bits).unpack(self.qweight)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.qzeros, self.spec.group(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
            f"group={self.spec.group_size}, symmetric={self.spec.symmetric}"
        )


class QuantEmbedding(nn.Module):
    """Token embedding that reads rows of a (tied) ``QuantLinear`` lm_head: weights stored once."""

    def __init__(self, head: QuantLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        self.head = [head]  # a list keeps the head out of this module's state dict (it is saved once)
        self.padding_idx = padding_idx

    @property
    def weight_source(self) -> QuantLinear:
        return self.head[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.weight_source
        flat = ids.reshape(-1)
        q = layout_for(head.spec.bits).unpack(head.qweight[flat])
        rows = dequantize(q, head.scales[flat], head.qzeros[flat], head.spec.group(head.in_features))
        return rows.reshape(*ids.shape, head.in_features)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
