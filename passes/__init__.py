"""The pass registry: one record per pass, keyed by its config type (as torchao's ``quantize_`` dispatches on
``type(config)``).

A config class (``toolkit.passes.base``) says its recipe name, whether its output depends on calibration data, its
kind (a model pass or an export) and the memory it needs; its record here says which functions run it. Add a pass
by writing one file (a frozen config and one function) and one line here.

``run`` of a model pass: ``apply(model, config, ctx: PassContext) -> model``.
``run`` of an export (a terminal step that turns the model into a deployment folder):
``export(model, tokenizer, config, folder, *, history) -> dict``: writes into ``folder`` (already atomic: the
pipeline renames it into place only on success), returns metrics for the manifest, raises ToolkitError when its
self-validation fails; ``history`` holds the configs of the model passes that made the model (``ctx.history``).
``stream``, for a pass that also runs with one decoder layer resident at a time from the input checkpoint's
shards: ``stream(src: SkeletonModel, folder, config, ctx, options: StreamOptions) -> dict`` writes the packed
artifact into ``folder`` (the same tensors ``apply`` then ``save_model`` would write); an export writes the same
folder ``export`` would (from a float or a packed checkpoint).
``holds``, for an export that holds only some quantizations: ``holds(scheme: QuantScheme)`` raises ToolkitError for the
others (every export refuses quantized activations), so a recipe is refused before its passes run (the exporter
calls it again on the model it is given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit.passes import (
    awq,
    distill,
    export_compressed_tensors,
    export_gguf,
    export_hf_gptq,
    export_modelopt,
    gptq,
    kv_cache,
    onnx,
    rotate,
    rtn,
    smoothquant,
)
from toolkit.passes.base import PassConfig
from toolkit.quant.spec import QuantScheme


@dataclass(frozen=True)
class Pass:
    """How one pass runs: ``run`` (its apply or export), and its streaming form and spec check when it has them."""

    run: Callable[..., Any]
    stream: Callable[..., Any] | None = None
    holds: Callable[[QuantScheme, PassConfig], None] | None = None  # (an earlier pass's scheme, the export's config)


PASSES: dict[type[PassConfig], Pass] = {
    rtn.RTNConfig: Pass(rtn.apply, stream=rtn.stream),
    gptq.GPTQConfig: Pass(gptq.apply, stream=gptq.stream),
    awq.AWQConfig: Pass(awq.apply, stream=awq.stream),
    smoothquant.SmoothQuantConfig: Pass(smoothquant.apply),
    rotate.RotateConfig: Pass(rotate.apply),
    distill.DistillConfig: Pass(distill.apply),
    kv_cache.KVCacheConfig: Pass(kv_cache.apply),
    onnx.ONNXConfig: Pass(onnx.export, stream=onnx.stream, holds=onnx.check_spec),
    export_hf_gptq.ExportHFGPTQConfig: Pass(export_hf_gptq.export, holds=export_hf_gptq.check_spec),
    export_gguf.ExportGGUFConfig: Pass(export_gguf.export, holds=export_gguf.check_spec),
    export_compressed_tensors.ExportCompressedTensorsConfig: Pass(export_compressed_tensors.export,
                                                                holds=export_compressed_tensors.check_spec),
    export_modelopt.ExportModelOptConfig: Pass(export_modelopt.export, holds=export_modelopt.check_spec),
}


def configs() -> dict[str, type[PassConfig]]:
    """Recipe name -> config class, read from the registry (so a pass registered later is found too)."""
    return {cls.name: cls for cls in PASSES}


def entry(config: PassConfig) -> Pass:
    """The record registered for ``type(config)``."""
    return PASSES[type(config)]
