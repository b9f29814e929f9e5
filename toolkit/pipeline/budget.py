"""Memory estimate of a run, checked against its budget before anything starts.

Figures are resident bytes on the CPU, from the model's config alone (no weights read): a float32 copy is
4 bytes a parameter. Each pass says what it needs (``toolkit.passes.base.PassConfig``: streaming, in memory,
and the model it leaves); this module adds the evaluations and the process. The estimate is deliberately
simple and errs high; ``Estimate.phases`` says which phase sets the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil

from toolkit.errors import ToolkitError
from toolkit.models.shape import ModelShape
from toolkit.passes.base import PassConfig

PROCESS_BYTES = 700 * 2**20  # python, torch, transformers, tokenizer: measured ~0.6 GB before any model
GB = 1e9
# the most of the budget (beyond the process) that a float model evaluated in memory may take before the
# evaluation streams by itself: the peak of a run is then set by its passes, not by measuring them
EVALUATION_SHARE = 0.25


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
    last: PassConfig | None = None
    model_steps = [s for s in recipe.passes if not s.is_export]
    for step, streaming in zip(model_steps, streams, strict=True):  # each pass says what it needs
        tokens = recipe.calibration.count * recipe.calibration.length if step.reads_calibration else 0
        if streaming:
            need = step.config.streaming_bytes(shape, tokens, activations_budget)
        else:
            need = step.config.in_memory_bytes(shape, tokens)
        est.add(f"pass {step.name}{' (streaming)' if streaming else ''}", need)
        last = step.config
    for step in recipe.passes:
        if step.is_export:  # an export streams from the folder on disk, or holds the model in memory
            need = step.config.streaming_bytes(shape, 0, activations_budget) if export_streams \
                else step.config.in_memory_bytes(shape, 0)
            est.add(f"export {step.name}{' (streaming)' if export_streams else ''}", need)
    if last is not None:
        reference = float_model + eval_bytes(shape, ev.length, ev.batch_size) if ev.kl else 0
        est.add("evaluation after", last.result_bytes(shape) + eval_bytes(shape, ev.length, ev.batch_size) + reference)
    return est
