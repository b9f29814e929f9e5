"""Quantized modules that compute from packed storage (``QuantLinear``, a tied ``QuantEmbedding``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.quant.arithmetic import dequantize
from toolkit.quant.formats import ToolkitPacked, packed_width
from toolkit.quant.spec import QuantScheme, QuantSpec

BLOCK_WEIGHTS = 1 << 25  # linears above 32 M weights dequantize in output-row blocks (SmolLM2's head: 28 M)


class QuantLinear(nn.Module):
    """A linear layer computing from packed integer weights.

    Buffers: ``qweight`` (packed codes, ``[out, in/2]`` for <=4 bits, ``[out, in]`` for 8),
    ``scales`` (float16 ``[out, G]``), ``qzeros`` (uint8 ``[out, G]``), optional ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False) -> None:
        super().__init__()
        QuantScheme(spec).weight_only("a quantized linear (QuantLinear)")  # integer codes only
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.groups(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(spec.bits, in_features), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None
    ) -> QuantLinear:
        out_f, in_f = q.shape
        layer = cls(in_f, out_f, spec, bias=bias is not None)
        for key, t in ToolkitPacked.pack(q, scale, zero, spec).items():
            getattr(layer, key).copy_(t)
        if bias is not None and layer.bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def unpacked(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``codes, scales, zeros`` of the output rows ``rows`` (a slice or index tensor)."""
        packed = {"qweight": self.qweight[rows], "scales": self.scales[rows], "qzeros": self.qzeros[rows]}
        return ToolkitPacked.unpack(packed, self.spec, (packed["qweight"].shape[0], self.in_features))

    def codes(self) -> torch.Tensor:
        return self.unpacked()[0]

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        return dequantize(*self.unpacked(rows), self.spec.group(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.out_features * self.in_features <= BLOCK_WEIGHTS:
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        # a 128k-vocabulary head: output-row blocks, so its float weight is never whole
        step = max(1, BLOCK_WEIGHTS // self.in_features)
        blocks = [slice(r, min(r + step, self.out_features)) for r in range(0, self.out_features, step)]
        return torch.cat([F.linear(x, self.dequantized_weight(b).to(x.dtype), None if bias is None else bias[b])
                          for b in blocks], dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
            f"group={self.spec.group_size}, symmetric={self.spec.symmetric}"
        )


class QuantEmbedding(nn.Module):
    """Token embedding that reads rows of a (tied) ``QuantLinear`` lm_head: weights stored once."""

    def __init__(self, head: QuantLinear, padding_idx: int | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.head = [head]  # a list keeps the head out of this module's state dict (it is saved once)
        self.padding_idx = padding_idx
        self.scale = scale  # rows are multiplied by it (Gemma's sqrt(hidden), kept from the replaced embedding)

    @classmethod
    def replacing(cls, old: nn.Module, head: QuantLinear) -> QuantEmbedding:
        """The quantized stand-in for the input embedding ``old`` (its padding index and output scale kept)."""
        return cls(head, getattr(old, "padding_idx", None), float(getattr(old, "scalar_embed_scale", 1.0)))

    @property
    def weight_source(self) -> QuantLinear:
        return self.head[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.weight_source
        flat = ids.reshape(-1)
        rows = dequantize(*head.unpacked(flat), head.spec.group(head.in_features))
        rows = rows.reshape(*ids.shape, head.in_features)
        return rows * self.scale if self.scale != 1.0 else rows


def reads_head(model: nn.Module, head_name: str) -> bool:
    """The input embedding reads the head's weights (tied): known from the modules alone, before any is loaded."""
    embed, head = model.get_input_embeddings(), model.get_submodule(head_name)
    return isinstance(embed, QuantEmbedding) or (isinstance(head, nn.Linear) and head.weight is embed.weight)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
