"""Replacing float linears with quantized ones, shared by every weight-quantization pass."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import decoder_layers, layout_of
from toolkit.quant.arithmetic import activation_scale, fp8_weight_scale, rtn_quantize
from toolkit.quant.calibration import input_maxima
from toolkit.quant.modules import FP8Linear, QuantEmbedding, QuantLinear, set_module
from toolkit.quant.spec import (
    ActivationSpec,
    QuantScheme,
    QuantSpec,
    QuantType,
    WeightStrategy,
    valid_group_sizes,
)
from toolkit.schema import SENTINELS

HEAD_BITS = (4, 8)


def check_head_bits(bits: int | None) -> None:
    """The head's precision setting, shared by every weight-quantization pass config."""
    if bits is not None and bits not in HEAD_BITS:
        raise ValueError(f"lm_head_bits must be 4, 8 or null (keep float), got {bits}")


@dataclass(frozen=True)
class WeightQuantConfig:
    """The settings every weight-quantization pass shares; each pass's frozen config extends it."""

    name: ClassVar[str]

    bits: int = 4
    group_size: int = field(default=32, metadata={SENTINELS: (-1,)})  # -1: one group per row
    symmetric: bool = True
    skip: tuple[str, ...] = ()  # fnmatch patterns of module names kept in float
    lm_head_bits: int | None = 8  # the head (and a tied embedding) at higher precision; None keeps it float
    type: QuantType = "int"  # the weights: "int" codes, or "float": fp8 e4m3 (bits 8, group_size -1)
    # fp8 weights: "tensor" gives one scale per matrix (ModelOpt FP8, compressed-tensors' FP8 preset), shared by the
    # linears a consumer fuses (q/k/v, gate/up); "group" follows group_size (-1: per output channel)
    strategy: WeightStrategy = "group"
    # quantized input activations of every quantized linear (None: float, W{bits}A16); the head keeps float inputs
    input_activations: ActivationSpec | None = None

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.group_size, self.symmetric, self.type, self.strategy)  # validates them
        check_head_bits(self.lm_head_bits)

    @property
    def scheme(self) -> QuantScheme:
        """What this config asks for: weights and, optionally, input activations (W8A8, WFP8AFP8 ...)."""
        weights = QuantSpec(self.bits, self.group_size, self.symmetric, self.type, self.strategy)
        return QuantScheme(weights, self.input_activations)

    @property
    def spec(self) -> QuantSpec:
        """The weight spec the weight-only passes run; a scheme they cannot run (quantized input activations,
        fp8 weights) is refused here, where every such pass reads its spec before any work."""
        return self.scheme.weight_only(self.name)


@dataclass
class LinearCodes:
    """One linear's quantization result before it is installed (in memory) or written (streaming): the float
    module it replaces, its codes ``[out, in]`` and its scales and zeros ``[out, in / group]``."""

    name: str
    linear: nn.Linear
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def target_linears(model: PreTrainedModel, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Float ``nn.Linear`` modules to quantize: all but the head and names matching a ``skip`` pattern. A pattern
    that matches no linear is refused (a misspelt skip list would otherwise quantize what it meant to keep)."""
    head = layout_of(model).head
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [p for p in skip if not any(fnmatch.fnmatch(name, p) for name in linears)]
    if unmatched:
        example = next((n for n in linears if n != head), head)
        raise ToolkitError(f"skip pattern(s) {unmatched} match no linear of this model (fnmatch patterns of module "
                           f"names, such as {example!r})")
    return {name: m for name, m in linears.items()
            if name != head and not any(fnmatch.fnmatch(name, p) for p in skip)}


def check_group_size(linears: dict[str, nn.Module], group_size: int) -> None:
    if group_size == -1:
        return
    dims = sorted({m.in_features for m in linears.values()})  # type: ignore[attr-defined]
    bad = [d for d in dims if d % group_size]
    if bad:
        valid = ", ".join(str(s) for s in valid_group_sizes(dims))
        raise ToolkitError(
            f"group_size {group_size} does not divide input dimension(s) {bad}; valid choices: {valid}, "
            "or -1 (one group per row)"
        )


def install(model: nn.Module, name: str, linear: nn.Linear, codes: torch.Tensor,
            scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, act: ActivationSpec | None = None) -> QuantLinear:
    qlinear = QuantLinear.from_codes(codes, scale, zero, spec, linear.bias, act)
    set_module(model, name, qlinear)
    return qlinear


def install_fp8(model: nn.Module, name: str, linear: nn.Linear, spec: QuantSpec,
                act: ActivationSpec | None = None, *, scale: torch.Tensor | None = None,
                codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> FP8Linear:
    """Put ``linear`` in place as fp8 e4m3 weights: rounded to nearest here (per-channel scales, or per tensor:
    ``scale`` when given), or the ``codes = (w8, scale)`` found elsewhere (GPTQ)."""
    if codes is None:
        qlinear = FP8Linear.from_weight(linear.weight.data, spec, linear.bias, act, scale)
    else:
        qlinear = FP8Linear.from_codes(*codes, spec, linear.bias, act)
    set_module(model, name, qlinear)
    return qlinear


def fused_groups(model: PreTrainedModel) -> list[tuple[int, tuple[str, ...], list[str]]]:
    """``(layer, relative names, full names)`` of every group of linears one input feeds and a consumer fuses into
    one matmul (q/k/v, gate/up: the architecture table's projections; an already fused projection is a group of
    one)."""
    arch = layout_of(model)
    return [(i, group, [f"{arch.layers}.{i}.{rel}" for rel in group])
            for i in range(len(decoder_layers(model)))
            for group in (arch.attention_projections(), arch.mlp_projections())]


def fused_weight_scales(model: PreTrainedModel, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """One per-tensor fp8 weight scale ``[1, 1]`` for each of ``linears``, shared by the linears a consumer fuses
    (``fused_groups``): their largest ``max |w|`` / 448. vLLM requantizes fused shards with unequal scales to the
    largest (a second rounding), and ModelOpt's export equalizes them the same way, so with one shared scale the
    checkpoint holds exactly the numbers the consumer multiplies."""
    absmax = {n: m.weight.detach().abs().amax().float() for n, m in linears.items()}
    for _, _, names in fused_groups(model):
        present = [n for n in names if n in absmax]
        if present:
            shared = torch.stack([absmax[n] for n in present]).amax()
            absmax.update(dict.fromkeys(present, shared))
    return {n: fp8_weight_scale(a.reshape(1, 1)) for n, a in absmax.items()}


def _per_tensor_scale(m: nn.Module | None) -> torch.Tensor | None:
    return m.weight_scale if isinstance(m, FP8Linear) and m.spec.per_tensor else None


def check_fused_scales(model: PreTrainedModel, linears: dict[str, nn.Module], consumer: str) -> None:
    """Refuse, for ``consumer`` (an export), unequal static input scales or per-tensor fp8 weight scales among
    linears a consumer fuses: vLLM runs them with one input scale (the largest) and requantizes unequal weight
    scales to the largest, so unequal ones are not the numbers our model computes with."""
    kinds = (("static input scales", lambda m: getattr(m, "input_scale", None),
              "calibrate them on one input (rtn or gptq with input_activations do)"),
             ("per-tensor weight scales", _per_tensor_scale, "quantize them with one shared scale (rtn does)"))
    for i, group, names in fused_groups(model):
        members = [linears.get(n) for n in names]
        if None in members and any(m is not None for m in members):
            raise ToolkitError(f"layer {i}: {', '.join(group)} are partly quantized, partly float (a skip list "
                               f"splitting them); {consumer}'s consumers fuse these linears and need one scheme for "
                               "all of them: skip all or none")
        for what, scale_of, fix in kinds:
            scales = {float(s) for m in members if (s := scale_of(m)) is not None}
            if len(scales) > 1:
                raise ToolkitError(f"layer {i}: the {what} of {', '.join(group)} differ ({sorted(scales)}); "
                                   f"{consumer}'s consumers fuse these linears with one scale: {fix}")


def static_input_scales(model: PreTrainedModel, linears: dict[str, nn.Linear], act: ActivationSpec | None,
                        windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per-tensor input scales ``[1]`` of ``linears`` from ``max |x|`` over the calibration ``windows`` on the model
    as it is now (before its linears are replaced); empty unless ``act`` is static. Linears that read one
    input (q/k/v, gate/up) see the same maximum, so the scale a consumer's fused kernel needs equal is equal."""
    if act is None or act.dynamic:
        return {}
    head = model.get_submodule(layout_of(model).head)
    maxima = input_maxima(model, dict(linears), head, windows, batch_size)
    return {n: activation_scale(torch.tensor([m.tensor_max()]), act.type) for n, m in maxima.items()}


Quantizer = Callable[[torch.Tensor, QuantSpec], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def quantize_head(model: PreTrainedModel, spec: QuantSpec, quantizer: Quantizer = rtn_quantize) -> None:
    """Quantize the lm_head (round-to-nearest unless ``quantizer`` says otherwise: ``w, spec -> codes,
    scales, zeros``); a tied input embedding then reads the same packed rows."""
    layout = layout_of(model)
    head = model.get_submodule(layout.head)
    if not isinstance(head, nn.Linear):
        return
    check_group_size({layout.head: head}, spec.group_size)
    tied = model.get_input_embeddings().weight is head.weight
    codes, scale, zero = quantizer(head.weight.data, spec)
    qhead = install(model, layout.head, head, codes, scale, zero, spec)
    if tied:
        model.set_input_embeddings(QuantEmbedding.replacing(model.get_input_embeddings(), qhead))
