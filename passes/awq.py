"""AWQ activation-aware scaling (Lin et al. 2023), layer by layer on calibration windows.

For each ``ScaleMapping`` of the architecture (which norm or linear feeds which linears), a per-input-
channel scale ``s`` is searched on the quantization error of the linears' outputs, ``W·diag(s)`` is
written into the linears and ``1/s`` folded into the producer (norm weight or linear output rows), so
the float model computes the same function. Optional clipping then clamps each weight group to the
range that minimises its output error.

Composition: the pass always leaves a float model whose weights are easy to quantize. With
``quantize: true`` it finishes with round-to-nearest (AWQ proper); with ``quantize: false`` a later
``rtn`` or ``gptq`` pass with the same bits/group/symmetric quantizes (``awq`` then ``gptq``; a recipe
whose quantizing pass uses another format is refused when it is read, ``AWQConfig.check_followers``).
The next layer is calibrated on the scaled float layer: scaling is exact, so this is the float model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.algorithms.awq import clip_weight, search_clip, search_scales
from toolkit.algorithms.smoothing import fold_scales, prev_rows
from toolkit.models.architectures import Architecture, ScaleMapping, layout_of
from toolkit.models.shape import ModelShape
from toolkit.models.streaming import SkeletonModel
from toolkit.passes import rtn
from toolkit.passes.base import PassConfig, QuantPassConfig
from toolkit.passes.context import PassContext
from toolkit.quant.arithmetic import rtn_quantize
from toolkit.quant.calibration import LayerInputs, check_finite, stream_inputs, walk_layers
from toolkit.quant.moments import InputMoments
from toolkit.quant.streaming import StreamOptions, stream_calibrated
from toolkit.quant.surgery import LinearCodes, WeightQuantConfig, check_group_size, target_linears


@dataclass(frozen=True)
class AWQConfig(QuantPassConfig):
    """Shared settings; skip also keeps a module unscaled, lm_head_bits applies with ``quantize``."""
    name: ClassVar[str] = "awq"
    reads_calibration: ClassVar[bool] = True

    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    clip: bool = True  # search a per-group clipping range after scaling
    quantize: bool = True  # finish with RTN; false: only scale (and clip) for a following rtn/gptq pass
    batch_size: int = 8  # calibration windows per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1 alpha values (20 is usual), got {self.grid}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 window, got {self.batch_size}")

    def result_bytes(self, shape: ModelShape) -> float:
        return super().result_bytes(shape) if self.quantize else PassConfig.result_bytes(self, shape)

    def check_followers(self, later: tuple[PassConfig, ...]) -> None:
        """Scales searched against one format are only right for that format: without ``quantize``, the pass that
        quantizes the scaled model must use the same bits, group_size and symmetric."""
        quantizer = next((c for c in later if isinstance(c, QuantPassConfig)), None)
        if self.quantize or quantizer is None:
            return
        ours, theirs = _format(self), _format(quantizer)
        if ours != theirs:
            raise ValueError(f"awq searched its scales for {ours} but {quantizer.name} quantizes with {theirs}; "
                             f"give both passes the same bits, group_size and symmetric")


def _format(config: QuantPassConfig) -> str:
    return f"bits {config.bits}, group_size {config.group_size}, symmetric {str(config.symmetric).lower()}"


def _input_stats(layer: nn.Module, inputs: LayerInputs, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |x| per channel ``[in]`` and second moment ``XᵀX / n: [in, in]`` of ``module``'s input."""
    moments = InputMoments(module.in_features, track_abs=True)  # type: ignore[arg-type]
    stream_inputs(layer, inputs, {name: module}, lambda _, x: moments.add(x))
    return moments.abs_mean(), moments.second_moment()


def _scale_mapping(layer: nn.Module, prefix: str, inputs: LayerInputs, mapping: ScaleMapping,
                   targets: dict[str, nn.Linear], config: AWQConfig, arch: Architecture) -> dict[str, Any]:
    names = [n for n in mapping.linears if f"{prefix}.{n}" in targets]
    if len(names) != len(mapping.linears):  # a skipped linear must keep its input: no fold
        return {"skipped": "some linears are in skip"}
    linears = [layer.get_submodule(n) for n in names]
    rows = prev_rows(layer, mapping, linears)  # type: ignore[arg-type]
    if rows is None:
        return {"skipped": f"{mapping.prev} outputs are not {names[0]}'s inputs (grouped-query attention)"}
    for n, m in zip(names, linears, strict=False):
        check_finite(m.weight, f"the weight of {prefix}.{n}")
    act_mean, c = _input_stats(layer, inputs, f"{prefix}.{names[0]}", linears[0])
    w = torch.cat([m.weight.detach().float() for m in linears])  # type: ignore[misc]
    res = search_scales(w, act_mean, c, config.spec, config.grid)
    fold_scales(layer.get_submodule(mapping.prev), linears, res.scales, arch.norm_offset, rows)  # type: ignore[arg-type]
    if config.clip:  # never the queries' and keys' projections (the architecture row names them)
        exempt = arch.clip_exempt()
        c_scaled = c / torch.outer(res.scales, res.scales)  # the input is now X / s
        for n, m in zip(names, linears, strict=False):
            if n not in exempt:
                ratio = search_clip(m.weight.data, c_scaled, config.spec, config.grid)  # type: ignore[arg-type]
                m.weight.data.copy_(clip_weight(m.weight.data, ratio, config.spec))  # type: ignore[arg-type]
    return {"alpha": res.alpha, "error": res.error, "rtn_error": res.baseline}


def _scale_layer(arch: Architecture, prefix: str, layer: nn.Module, inputs: LayerInputs,
                 targets: dict[str, nn.Linear], config: AWQConfig, report: dict[str, Any]) -> None:
    for mapping in arch.awq:
        report[f"{prefix}.{mapping.prev}"] = _scale_mapping(layer, prefix, inputs, mapping, targets, config, arch)


def stream(src: SkeletonModel, out: Path, config: AWQConfig, ctx: PassContext, options: StreamOptions) -> dict[str, Any]:
    """AWQ with one decoder layer resident at a time: each layer is scaled (the same function as
    ``apply``), its scaled float outputs feed the next layer, and with ``quantize`` its linears are
    rounded to nearest as they are written (the order ``apply`` then ``rtn`` gives the same codes)."""
    config.scheme.weight_only(config.name)  # refuses a scheme this pass cannot run, before any work
    arch = src.layout
    targets = target_linears(src.model, config.skip)
    report: dict[str, Any] = {}

    def one_layer(prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[LinearCodes]:
        _scale_layer(arch, prefix, layer, inputs, targets, config, report)
        if not config.quantize:
            return []
        names = [n for n in targets if n.startswith(prefix + ".")]
        linears = {n: src.model.get_submodule(n) for n in names}
        return [LinearCodes(n, m, *rtn_quantize(m.weight.data, config.spec)) for n, m in linears.items()]

    # without quantize the head stays float too
    written = config if config.quantize else WeightQuantConfig(**{**config.shared_settings(), "lm_head_bits": None})
    stats = stream_calibrated(src, out, written, ctx.calibration(), options, one_layer, None, config.batch_size)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "awq.json").write_text(json.dumps(report, indent=2))
    return stats


@torch.no_grad()
def apply(model: PreTrainedModel, config: AWQConfig, ctx: PassContext) -> PreTrainedModel:
    """Scale (and clip) every mapped decoder linear in place; with ``quantize`` also run RTN."""
    config.scheme.weight_only(config.name)  # refuses a scheme this pass cannot run, before any work
    targets = target_linears(model, config.skip)
    check_group_size(targets, config.group_size)
    arch = layout_of(model)
    report: dict[str, Any] = {}

    def scale_layer(prefix: str, layer: nn.Module, inputs: LayerInputs) -> None:
        _scale_layer(arch, prefix, layer, inputs, targets, config, report)

    walk_layers(model, ctx.calibration(), config.batch_size, layout_of(model).layers, scale_layer, ctx.progress)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "awq.json").write_text(json.dumps(report, indent=2))
    if config.quantize:
        rtn.apply(model, rtn.RTNConfig(**config.shared_settings()), ctx)
    return model
