"""What every pass config says about itself: its recipe name, whether it reads calibration data, its kind, and
the memory it needs (the budget asks the config, never its fields).

A pass config is a frozen dataclass extending ``PassConfig`` (a model pass), ``QuantPassConfig`` (a
weight-quantization pass: the shared bits/group/symmetry settings) or ``ExportConfig`` (a terminal step that
writes a deployment folder). Choice settings are ``typing.Literal`` fields: the recipe schema refuses another
value with the allowed ones listed, and ``__post_init__`` does the same for a config built in Python.

Estimates are resident CPU bytes from the model's shape alone (``toolkit.models.shape.ModelShape``) and err
high; ``toolkit.pipeline.budget`` adds them up phase by phase.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from toolkit.models.shape import ModelShape
from toolkit.quant.formats import ToolkitPacked
from toolkit.quant.surgery import WeightQuantConfig
from toolkit.schema import check_choices

Kind = Literal["model", "export"]


class PassConfig:
    """A model pass (model -> model). Subclasses are frozen dataclasses and set ``name`` and ``reads_calibration``."""

    name: ClassVar[str]
    reads_calibration: ClassVar[bool]
    kind: ClassVar[Kind] = "model"

    def __post_init__(self) -> None:
        check_choices(self)

    def streaming_bytes(self, shape: ModelShape, calibration_tokens: int, activations_budget: int) -> float:
        """Run one decoder layer at a time: one layer in float32 with two work copies, the largest Hessian and its
        inverse (float64), the activation buffer (up to its budget), the embedding (layer-0 capture) in float32.
        Without calibration: a few row chunks of the widest weight."""
        if not self.reads_calibration:
            return 4 * shape.max_in_features * max(shape.hidden, 4096) * 3 + 64 * 2**20
        layer = 4 * shape.layer_parameters * 3
        hessian = 3 * 8 * shape.max_in_features ** 2
        acts = min(4 * calibration_tokens * shape.hidden, activations_budget)
        return layer + hessian + 2 * acts + 4 * shape.embedding_parameters

    def in_memory_bytes(self, shape: ModelShape, calibration_tokens: int) -> float:
        """The float32 model, its quantized copy as it is built, and the calibration activations."""
        return 4 * shape.parameters * 2 + 2 * 4 * calibration_tokens * shape.hidden

    def result_bytes(self, shape: ModelShape) -> float:
        """The model this pass leaves, in memory: float32 unless the pass quantizes."""
        return 4 * shape.parameters

    def check_followers(self, later: tuple[PassConfig, ...]) -> None:
        """Raise ValueError when the passes after this one in a recipe cannot follow it (read before any pass runs)."""

    def streams(self) -> bool:
        """Whether this config runs in the pass's layer-by-layer form (where it has one)."""
        return True


@dataclass(frozen=True)
class QuantPassConfig(WeightQuantConfig, PassConfig):
    """A weight-quantization pass: the shared settings plus what its own config adds."""

    def __post_init__(self) -> None:
        WeightQuantConfig.__post_init__(self)
        PassConfig.__post_init__(self)

    def streams(self) -> bool:
        """The layer-by-layer writers hold integer weight-only linears: W8A8 and fp8 schemes run in memory."""
        return self.input_activations is None and self.type == "int"

    def shared_settings(self) -> dict[str, Any]:
        """The settings every weight-quantization pass has, by name: to build another pass's config from this one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(WeightQuantConfig)}

    def result_bytes(self, shape: ModelShape) -> float:
        """Codes, float16 scales and uint8 zeros; the embedding stays float32 unless it is tied to a quantized head."""
        group = self.group_size if self.group_size > 0 else shape.hidden
        per_weight = ToolkitPacked.stored_bits(self.bits) / 8 + 3 / group
        body = shape.parameters - shape.embedding_parameters * (1 if shape.tied else 2)
        head_bits = self.lm_head_bits
        head = shape.embedding_parameters * ((ToolkitPacked.stored_bits(head_bits) / 8 + 3 / group) if head_bits else 4)
        embed = 0 if (shape.tied and head_bits) else 4 * shape.embedding_parameters
        return body * per_weight + head + embed


class ExportConfig(PassConfig):
    """A terminal step that turns the model into a deployment folder."""

    kind: ClassVar[Kind] = "export"
    holds_kv_cache: ClassVar[bool] = False  # writes an fp8 KV cache's scales (the kv_cache pass may precede it)

    def streaming_bytes(self, shape: ModelShape, calibration_tokens: int, activations_budget: int) -> float:
        """One float32 layer and the embedding/head, each with its copies."""
        return 3 * 4 * (shape.layer_parameters + shape.embedding_parameters)

    def in_memory_bytes(self, shape: ModelShape, calibration_tokens: int) -> float:
        """The exporter holds the float32 model and its graph's initializers."""
        return 3 * 4 * shape.parameters


@dataclass(frozen=True)
class CheckpointExportConfig(ExportConfig):
    """An export that writes a Hugging Face checkpoint and checks it by reloading it as a float model. ``tolerance``
    is keyword-only, so a subclass's own fields keep their positions."""

    tolerance: float = field(default=2e-2, kw_only=True)  # max |Δlogit| / max |logit|: export vs source model

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
