"""Quantized modules that compute from packed storage (``QuantLinear``, ``FP8Linear``, a tied ``QuantEmbedding``).

Both linears optionally quantize their input activations (``ActivationSpec``: int8 or fp8 e4m3, dynamic per token
or static per tensor with a calibrated ``input_scale``): on CPU as quantize -> dequantize before a float matmul,
so evaluation measures the numbers the deployed W8A8 / FP8 kernel multiplies.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.quant import kv_cache
from toolkit.quant.arithmetic import (
    FP8,
    dequantize,
    fake_quantize_activations,
    fake_quantize_ste,
    fp8_codes,
    fp8_dequantize,
    fp8_quantize,
    fp8_weight_scale,
    fp16_representable,
    quantize,
)
from toolkit.quant.formats import ToolkitPacked, packed_width
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

BLOCK_WEIGHTS = 1 << 25  # linears above 32 M weights dequantize in output-row blocks (SmolLM2's head: 28 M)


class QuantLinear(nn.Module):
    """A linear layer computing from packed integer weights.

    Buffers: ``qweight`` (packed codes, ``[out, in/2]`` for <=4 bits, ``[out, in]`` for 8),
    ``scales`` (float16 ``[out, G]``), ``qzeros`` (uint8 ``[out, G]``), optional ``bias``, and ``input_scale``
    (float32 ``[1]``) when ``act`` is static.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 act: ActivationSpec | None = None) -> None:
        super().__init__()
        QuantScheme(spec).weight_only("a quantized linear (QuantLinear)")  # integer codes only
        self.in_features, self.out_features, self.spec, self.act = in_features, out_features, spec, act
        _input_scale_buffer(self, act)
        groups = spec.groups(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(spec.bits, in_features), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None,
        act: ActivationSpec | None = None,
    ) -> QuantLinear:
        out_f, in_f = q.shape
        layer = cls(in_f, out_f, spec, bias=bias is not None, act=act)
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

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.spec, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantized_input(self, x)
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
            + ("" if self.act is None else f", input={self.act.name}")
        )


class FP8Linear(nn.Module):
    """A linear layer computing from fp8 e4m3 weights with one float32 scale per output channel, or one for the
    whole matrix (``spec.strategy == "tensor"``).

    Buffers: ``weight`` (float8_e4m3fn ``[out, in]``), ``weight_scale`` (float32 ``[out, 1]``, per tensor ``[1, 1]``),
    optional ``bias``, and ``input_scale`` (float32 ``[1]``) when ``act`` is static.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 act: ActivationSpec | None = None) -> None:
        super().__init__()
        QuantScheme(spec, act).runnable("a quantized linear (FP8Linear)")  # per-channel or -tensor fp8, symmetric inputs
        if spec.type != "float":
            raise ValueError(f"FP8Linear holds fp8 weights, not {spec}; integer weights are a QuantLinear")
        self.in_features, self.out_features, self.spec, self.act = in_features, out_features, spec, act
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale", torch.ones(1 if spec.per_tensor else out_features, 1, dtype=torch.float32))
        _input_scale_buffer(self, act)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None,
                    act: ActivationSpec | None = None, scale: torch.Tensor | None = None) -> FP8Linear:
        """Round ``w: [out, in]`` to fp8 e4m3 with per-channel scales, or per tensor: ``scale`` ``[1, 1]`` when given
        (one shared by linears a consumer fuses), else ``max |w| / 448``."""
        if spec.per_tensor and scale is None:
            scale = fp8_weight_scale(w.abs().amax().reshape(1, 1))
        return cls.from_codes(*fp8_quantize(w, scale), spec, bias, act)

    @classmethod
    def from_codes(cls, w8: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None,
                   act: ActivationSpec | None = None) -> FP8Linear:
        """The layer holding e4m3 codes ``w8: [out, in]`` with ``scale`` ``[out, 1]`` (per channel) or ``[1, 1]``
        (per tensor), rounded here or elsewhere (GPTQ)."""
        out_f, in_f = w8.shape
        layer = cls(in_f, out_f, spec, bias=bias is not None, act=act)
        layer.weight.copy_(w8)
        layer.weight_scale.copy_(scale.reshape(layer.weight_scale.shape))
        if bias is not None and layer.bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.spec, self.act)

    def dequantized_weight(self) -> torch.Tensor:
        return fp8_dequantize(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantized_input(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fp8 e4m3 per-{'tensor' if self.spec.per_tensor else 'channel'}"
                + ("" if self.act is None else f", input={self.act.name}"))


QuantizedLinear = QuantLinear | FP8Linear


class TrainingLinear(nn.Module):
    """A quantized linear while its codes train (quantization-aware training): the weight as a float32 parameter
    (the codes' dequantization to start), rounded to the layer's own grid in every forward with the rounding's
    gradient passed straight through (``fake_quantize_ste``), the scales as ``scales · exp(theta)`` (one fp8 scale
    per tensor stays: consumers share it across fused linears), zero points, format and input rounding as the layer
    has them. ``freeze()`` gives back the layer's own kind holding the codes and scales the training reached, which
    compute exactly what the last forward did."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.layer = layer
        self.layer.requires_grad_(False)
        self.weight = nn.Parameter(layer.dequantized_weight().float())
        fp8 = isinstance(layer, FP8Linear)
        self.register_buffer("base_scale", (layer.weight_scale if fp8 else layer.scales).float().clone())
        self.register_buffer("zero", None if fp8 else layer.unpacked()[2].clone())
        per_tensor = fp8 and layer.spec.per_tensor
        self.theta = None if per_tensor else nn.Parameter(torch.zeros(self.base_scale.shape))

    def scale(self) -> torch.Tensor:
        """The scales the forward rounds against: integer ones already rounded to float16 as stored (the
        rounding's gradient straight through), so the frozen layer computes exactly what training last did."""
        if self.theta is None:
            return self.base_scale
        s = self.base_scale * self.theta.exp()
        if isinstance(self.layer, FP8Linear):
            return s
        return fp16_representable(s.detach()) + (s - s.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = fake_quantize_ste(self.weight, self.scale(), self.zero, layer.spec)
        x = quantized_input(layer, x)
        return F.linear(x, w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> QuantizedLinear:
        layer, w = self.layer, self.weight.detach().float()
        new: QuantizedLinear
        if isinstance(layer, FP8Linear):
            scale = self.scale().detach().float()
            new = FP8Linear.from_codes(fp8_codes(w, scale), scale, layer.spec, layer.bias, layer.act)
        else:
            assert self.zero is not None
            scale = self.scale().detach()  # float16-representable already
            codes = quantize(w, scale, self.zero, layer.spec)
            new = QuantLinear.from_codes(codes, scale.to(torch.float16), self.zero, layer.spec, layer.bias, layer.act)
        if hasattr(layer, "input_scale"):
            new.input_scale.copy_(layer.input_scale)
        return new


def _input_scale_buffer(module: nn.Module, act: ActivationSpec | None) -> None:
    """A static activation scale is a buffer (saved with the weights); a dynamic one is computed per call."""
    if act is not None and not act.dynamic:
        module.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))


def quantized_input(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the module's kernel reads it: unchanged (float activations) or fake-quantized by ``module.act``."""
    act = module.act
    if act is None:
        return x
    scale = None if act.dynamic else module.input_scale
    return fake_quantize_activations(x, act.type, act.strategy, scale)  # type: ignore[arg-type]


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
    """The integer-weight linears (what the weight-only exporters read)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized linear, integer or fp8 weights (what the packed checkpoint stores)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear | FP8Linear)}


def activation_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The quantized linears that quantize their inputs or hold fp8 weights: what a consumer computing with float
    activations and integer codes cannot run."""
    return {n: m for n, m in quantized_linears(model).items() if m.act is not None or isinstance(m, FP8Linear)}


def input_quantizer(act: ActivationSpec, scale: torch.Tensor | None) -> Callable[..., tuple[torch.Tensor]]:
    """A forward pre-hook quantizing a plain ``nn.Linear``'s input as ``act`` says (static: with ``scale``): how an
    exporter's float reload computes what the deployed kernel does, without ``QuantLinear``."""
    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (fake_quantize_activations(args[0], act.type, act.strategy, scale),)
    return hook


def stored_floats(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose float parameters (embedding, norms, biases, a float head) went through ``dtype``,
    as an export stores them: with quantized activations a float16 rounding upstream flips activation codes, so an
    export is compared with the model it holds, not with one it cannot hold."""
    copy = deepcopy(model)
    with torch.no_grad():
        for p in copy.parameters():
            p.copy_(p.to(dtype))
    return copy


def check_weight_only(model: nn.Module, consumer: str) -> None:
    """Refuse, in one line before any work, a model whose linears quantize their inputs or hold fp8 weights, for
    ``consumer`` (an export) that computes with float activations and integer codes: the recipe check sees the
    recipe's scheme, this one the model (read from a cached or given folder)."""
    for m in activation_modules(model).values():
        m.scheme.weight_only(consumer)
    kv_cache.check_float_cache(model, consumer)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
