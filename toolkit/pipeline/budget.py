"""Memory estimate of a run, checked against its budget before anything starts.

Figures are resident bytes on the CPU, from the model's config alone (no weights read): a float32 copy is
4 bytes a parameter; a streaming pass holds one decoder layer in float32 (plus GPTQ's work copies), the
calibration activations up to their budget, and the embedding or head while they are used. The estimate is
deliberately simple and errs high; ``Estimate.phases`` says which phase sets the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil

from toolkit.errors import ToolkitError
from toolkit.quant.formats import ToolkitPacked

PROCESS_BYTES = 700 * 2**20  # python, torch, transformers, tokenizer: measured ~0.6 GB before any model
GB = 1e9
# the most of the budget (beyond the process) that a float model evaluated in memory may take before the
# evaluation streams by itself: the peak of a run is then set by its passes, not by measuring them
EVALUATION_SHARE = 0.25


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, from its config."""

    parameters: int
    layer_parameters: int
    embedding_parameters: int
    hidden: int
    vocab: int
    max_in_features: int
    tied: bool

    @classmethod
    def of_config(cls, config: Any) -> ModelShape:
        from toolkit.models.architectures import decoder_layers
        from toolkit.models.streaming import empty_model

        model = empty_model(config)
        layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
        embed = model.get_input_embeddings().weight.numel()
        ins = [m.in_features for m in model.modules() if hasattr(m, "in_features")]
        return cls(sum(p.numel() for p in model.parameters()), layer, embed, int(config.hidden_size),
                   int(config.vocab_size), max(ins or [0]), bool(getattr(config, "tie_word_embeddings", False)))


@dataclass
class Estimate:
    phases: dict[str, int] = field(default_factory=dict)

    def add(self, phase: str, nbytes: float) -> None:
        self.phases[phase] = int(PROCESS_BYTES + nbytes)

    @property
    def peak(self) -> int:
        return max(self.phases.values(), default=PROCESS_BYTES)

    @property
    def largest(self) -> str:
        return max(self.phases, key=self.phases.__getitem__) if self.phases else "start"


def eval_bytes(shape: ModelShape, length: int, batch_size: int) -> float:
    """Logits, log-probabilities and their exp for one batch of windows (float32)."""
    return 3 * 4 * batch_size * length * shape.vocab


def in_memory_eval_bytes(shape: ModelShape, length: int, batch_size: int) -> float:
    """The baseline evaluated in memory: the float32 model, the 16-bit tensors it is converted from while the
    checkpoint loads, and one batch's logits."""
    return (4 + 2) * shape.parameters + eval_bytes(shape, length, batch_size)


def evaluation_streams(shape: ModelShape, length: int, batch_size: int, budget: int) -> bool:
    """The float baseline is too large a share of ``budget`` to be evaluated in memory."""
    return in_memory_eval_bytes(shape, length, batch_size) > EVALUATION_SHARE * max(budget - PROCESS_BYTES, 0)


def packed_bytes(shape: ModelShape, bits: int, group_size: int, head_bits: int | None) -> float:
    """A quantized artifact in memory: codes, float16 scales and uint8 zeros; float embedding unless tied."""
    group = group_size if group_size > 0 else shape.hidden
    per_weight = ToolkitPacked.stored_bits(bits) / 8 + 3 / group
    body = shape.parameters - shape.embedding_parameters * (1 if shape.tied else 2)
    head = shape.embedding_parameters * ((ToolkitPacked.stored_bits(head_bits) / 8 + 3 / group) if head_bits else 4)
    embed = 0 if (shape.tied and head_bits) else 4 * shape.embedding_parameters
    return body * per_weight + head + embed


def streaming_pass_bytes(shape: ModelShape, config: Any, calibration: Any, activations_budget: int,
                         shard_bytes: int) -> float:
    """One layer in float32 with two work copies, the largest Hessian and its inverse (float64), the
    activation buffer (up to its budget), the embedding (layer-0 capture) or head (GPTQ head) in float32."""
    layer = 4 * shape.layer_parameters * 3
    hessian = 3 * 8 * shape.max_in_features ** 2
    if not config.reads_calibration:
        return 4 * shape.max_in_features * max(shape.hidden, 4096) * 3 + 64 * 2**20
    acts = min(4 * calibration.count * calibration.length * shape.hidden, activations_budget)
    head = 4 * shape.embedding_parameters * (2 if getattr(config, "lm_head_method", "rtn") == "gptq" else 1)
    return layer + hessian + 2 * acts + head


def in_memory_pass_bytes(shape: ModelShape, calibration: Any) -> float:
    """The float32 model, its quantized copy as it is built, and the calibration activations."""
    acts = 4 * calibration.count * calibration.length * shape.hidden if calibration else 0
    return 4 * shape.parameters * 2 + 2 * acts


def budget_bytes(budget_gb: float | None) -> int:
    """The recipe's budget, or what the machine has available now."""
    return int(budget_gb * GB) if budget_gb is not None else int(psutil.virtual_memory().available)


def check(estimate: Estimate, budget: int, origin: str) -> None:
    if estimate.peak > budget:
        phases = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in estimate.phases.items())
        raise ToolkitError(
            f"{origin}: refused before starting: the run needs an estimated {estimate.peak / GB:.1f} GB of memory "
            f"({estimate.largest} is the largest; {phases}), above the memory budget of {budget / GB:.1f} GB. "
            "Raise 'memory: {budget_gb: ...}', or turn off what does not fit (evaluation: {baseline: false, "
            "kl: false}), or lower the calibration count"
        )


def estimate_run(recipe: Any, shape: ModelShape, streams: list[bool], activations_budget: int,
                 shard_bytes: int, export_streams: bool = False) -> Estimate:
    """Each phase of ``recipe`` on a model of ``shape``; ``streams[i]``: model step i runs layer by layer;
    ``export_streams``: so do the exports (their input is a folder on disk)."""
    est = Estimate()
    ev = recipe.evaluation
    float_model = 4 * shape.parameters
    if ev.baseline and ev.streaming:  # one float32 layer, the head in bf16 or float, the activations
        est.add("baseline evaluation (streaming)", 4 * shape.layer_parameters + 4 * shape.embedding_parameters
                + 2 * 4 * ev.count * ev.length * shape.hidden + eval_bytes(shape, ev.length, ev.batch_size))
    elif ev.baseline:
        est.add("baseline evaluation", in_memory_eval_bytes(shape, ev.length, ev.batch_size))
    last: Any = None
    model_steps = [s for s in recipe.passes if not s.is_export]
    for step, streaming in zip(model_steps, streams, strict=True):
        calib = recipe.calibration if step.reads_calibration else None
        if streaming:
            need = streaming_pass_bytes(shape, step.config, calib, activations_budget, shard_bytes)
        else:
            need = in_memory_pass_bytes(shape, calib)
        est.add(f"pass {step.name}{' (streaming)' if streaming else ''}", need)
        last = step.config
    for step in recipe.passes:
        if step.is_export and export_streams:  # one float32 layer and the embedding/head, each with its copies
            est.add(f"export {step.name} (streaming)", 3 * 4 * (shape.layer_parameters + shape.embedding_parameters))
        elif step.is_export:  # the exporter holds the model and its graph's initializers
            est.add(f"export {step.name}", 3 * float_model)
    if last is not None:
        bits = getattr(last, "bits", 32)
        after = packed_bytes(shape, bits, getattr(last, "group_size", -1), getattr(last, "lm_head_bits", None)) \
            if bits < 16 else float_model
        reference = float_model + eval_bytes(shape, ev.length, ev.batch_size) if ev.kl else 0
        est.add("evaluation after", after + eval_bytes(shape, ev.length, ev.batch_size) + reference)
    return est
