"""SmoothQuant (Xiao et al. 2023): per-channel smoothing factors from calibration input maxima, folded into the
producing norm or linear (the fold AWQ uses, ``toolkit.algorithms.smoothing``) for every mapping of the
architecture's row, layer by layer on calibration windows.

The pass leaves a float model computing the same function whose activations quantize better: follow it with
``rtn`` or ``gptq`` with ``input_activations`` (W8A8). Each layer is measured on the outputs of the already-smoothed
layers before it; smoothing is exact, so these are the float model's. The factors' spread per mapping goes to
``<workdir>/smoothquant.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.algorithms.smoothing import fold_scales, prev_rows
from toolkit.algorithms.smoothquant import smoothing_scales
from toolkit.models.architectures import Architecture, ScaleMapping, layout_of
from toolkit.passes.base import PassConfig
from toolkit.passes.context import PassContext
from toolkit.quant.calibration import LayerInputs, check_finite, stream_inputs, walk_layers
from toolkit.quant.moments import InputMaxima
from toolkit.quant.surgery import target_linears


@dataclass(frozen=True)
class SmoothQuantConfig(PassConfig):
    name: ClassVar[str] = "smoothquant"
    reads_calibration: ClassVar[bool] = True

    alpha: float = 0.5  # migration strength: s = max|X|^alpha / max|W|^(1 - alpha) (paper eq. 4)
    skip: tuple[str, ...] = ()  # fnmatch patterns of linears left unsmoothed (and their mapping with them)
    batch_size: int = 8  # calibration windows per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (0.5 is usual; 0.75-0.8 for models with strong activation "
                             f"outliers), got {self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 window, got {self.batch_size}")


def _smooth_mapping(layer: nn.Module, prefix: str, inputs: LayerInputs, mapping: ScaleMapping,
                    targets: dict[str, nn.Linear], config: SmoothQuantConfig, arch: Architecture) -> dict[str, Any]:
    names = [n for n in mapping.linears if f"{prefix}.{n}" in targets]
    if len(names) != len(mapping.linears):  # a skipped linear must keep its input: no fold
        return {"skipped": "some linears are in skip"}
    linears: list[nn.Linear] = [layer.get_submodule(n) for n in names]  # type: ignore[misc]
    rows = prev_rows(layer, mapping, linears)
    if rows is None:
        return {"skipped": f"{mapping.prev} outputs are not {names[0]}'s inputs (grouped-query attention)"}
    for n, m in zip(names, linears, strict=True):
        check_finite(m.weight, f"the weight of {prefix}.{n}")
    maxima = InputMaxima(linears[0].in_features, linears[0].weight.device)
    stream_inputs(layer, inputs, {f"{prefix}.{names[0]}": linears[0]}, lambda _, x: maxima.add(x))
    s = smoothing_scales(maxima.abs_max, torch.cat([m.weight.detach() for m in linears]), config.alpha)
    fold_scales(layer.get_submodule(mapping.prev), linears, s, arch.norm_offset, rows)
    return {"act_max": maxima.tensor_max(), "s_min": float(s.min()), "s_max": float(s.max())}


@torch.no_grad()
def apply(model: PreTrainedModel, config: SmoothQuantConfig, ctx: PassContext) -> PreTrainedModel:
    """Smooth every mapped decoder linear in place (the model's float function is unchanged)."""
    targets = target_linears(model, config.skip)
    arch = layout_of(model)
    report: dict[str, Any] = {}

    def smooth_layer(prefix: str, layer: nn.Module, inputs: LayerInputs) -> None:
        for mapping in arch.awq:
            report[f"{prefix}.{mapping.prev}"] = _smooth_mapping(layer, prefix, inputs, mapping, targets, config, arch)

    walk_layers(model, ctx.calibration(), config.batch_size, arch.layers, smooth_layer, ctx.progress)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "smoothquant.json").write_text(json.dumps(report, indent=2))
    return model
