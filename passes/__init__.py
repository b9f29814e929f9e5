"""The pass tables. Edit here to add a pass: one line each, no discovery magic.

``PASSES``: model -> model. ``apply(model, config, ctx: PassContext) -> model``.
``EXPORTS``: terminal steps that turn the model into a deployment artifact folder.
``export(model, tokenizer, config, folder) -> dict`` writes into ``folder`` (already atomic: the pipeline
renames it into place only on success) and returns metrics for the manifest; it raises ToolkitError
when its self-validation fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolkit.passes import awq, distill, export_hf_gptq, export_onnx, gptq, rtn

PASSES: dict[str, tuple[type, Callable[..., Any]]] = {
    "rtn": (rtn.RTNConfig, rtn.apply),
    "gptq": (gptq.GPTQConfig, gptq.apply),
    "awq": (awq.AWQConfig, awq.apply),
    "distill": (distill.DistillConfig, distill.apply),
}

EXPORTS: dict[str, tuple[type, Callable[..., Any]]] = {
    "export_hf_gptq": (export_hf_gptq.HFGPTQConfig, export_hf_gptq.export),
    "onnx": (export_onnx.ExportONNXConfig, export_onnx.export),
}

# Passes whose output depends on calibration data (their cache key includes the calibration spec).
NEEDS_CALIBRATION: frozenset[str] = frozenset({"gptq", "awq", "distill"})
