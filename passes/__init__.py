"""The pass registry, keyed by config type (as torchao's ``quantize_`` dispatches on ``type(config)``).

Each config class says its recipe name (``name``) and whether its output depends on calibration data
(``reads_calibration``), so the recipe keys, the cache keys and the handlers cannot drift apart. Add a pass
by writing one file (a frozen config and one function) and one line here.

``PASSES``: model -> model, ``apply(model, config, ctx: PassContext) -> model``.
``EXPORTS``: terminal steps that turn the model into a deployment folder,
``export(model, tokenizer, config, folder) -> dict``: writes into ``folder`` (already atomic: the pipeline
renames it into place only on success), returns metrics for the manifest, raises ToolkitError when its
self-validation fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolkit.passes import (
    awq,
    distill,
    export_compressed_tensors,
    export_gguf,
    export_hf_gptq,
    gptq,
    onnx,
    rtn,
)

PASSES: dict[type, Callable[..., Any]] = {
    rtn.RTNConfig: rtn.apply,
    gptq.GPTQConfig: gptq.apply,
    awq.AWQConfig: awq.apply,
    distill.DistillConfig: distill.apply,
}

# passes that also run with one decoder layer resident at a time, reading the input checkpoint's shards:
# ``stream(src: SkeletonModel, folder, config, ctx, options: StreamOptions) -> dict`` writes the packed
# artifact into ``folder`` (the same tensors ``apply`` then ``save_model`` would write); an export writes
# the same folder ``export`` would (from a float or a packed checkpoint)
STREAMING: dict[type, Callable[..., Any]] = {
    rtn.RTNConfig: rtn.stream,
    gptq.GPTQConfig: gptq.stream,
    awq.AWQConfig: awq.stream,
    onnx.ONNXConfig: onnx.stream,
}

EXPORTS: dict[type, Callable[..., Any]] = {
    onnx.ONNXConfig: onnx.export,
    export_hf_gptq.ExportHFGPTQConfig: export_hf_gptq.export,
    export_gguf.ExportGGUFConfig: export_gguf.export,
    export_compressed_tensors.ExportCompressedTensorsConfig: export_compressed_tensors.export,
}

# what each export holds: ``check_spec(scheme: QuantScheme)`` raises ToolkitError for the rest (every export
# refuses quantized activations), so a recipe is refused before its passes run (the GGUF and HF-GPTQ exporters
# call it again on the model they are given)
SPEC_CHECKS: dict[type, Callable[..., None]] = {
    export_hf_gptq.ExportHFGPTQConfig: export_hf_gptq.check_spec,
    export_gguf.ExportGGUFConfig: export_gguf.check_spec,
    export_compressed_tensors.ExportCompressedTensorsConfig: export_compressed_tensors.check_spec,
    onnx.ONNXConfig: onnx.check_spec,
}

# recipe name -> config class, derived from the classes themselves
CONFIGS: dict[str, type] = {cls.name: cls for cls in (*PASSES, *EXPORTS)}  # type: ignore[attr-defined]


def is_export(config: Any) -> bool:
    return type(config) in EXPORTS


def handler(config: Any) -> Callable[..., Any]:
    """The function registered for ``type(config)``."""
    return EXPORTS[type(config)] if is_export(config) else PASSES[type(config)]
