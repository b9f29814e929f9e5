"""Mixed precision chosen by measurement: which fused groups of linears cost the most to quantize, and which to
keep in float within a budget.

A *group* is the linears of one decoder layer that read the same input (q/k/v, o, gate/up, down: what vLLM and
TensorRT-LLM fuse into one kernel with one scheme, so a group is kept float or quantized as a whole). Its *cost* is
the mean KL per token of the model's next-token distribution against the float model's, on calibration windows,
with only that group quantized as the scheme says (weights rounded to nearest, input activations rounded as the
kernel rounds them; a static per-tensor input scale is taken per call here). KL adds up over the parts of a model
far better than perplexity does (``benchmarks/fp8_error_sources.py --sensitivity``), so the parts can be ranked one
at a time.

``keep_float_groups`` scores every decoder layer as a whole first, then the groups of the costliest layers, and
keeps float the costliest groups that fit the budget (a share of the quantized linears' weights: as
llm-compressor's ``ignore`` list and ModelOpt's AutoQuantize leave the sensitive layers in 16-bit). A group's cost
is at most about its layer's, so layers are visited from the costliest down until the budget is full with groups
costlier than the next layer's whole cost.

Each score reruns the model from the first changed layer only: the float model's input of every decoder layer is
kept, the layers before the changed one are bypassed (``_Feed``), so a change in the last layer costs one layer and
the head, not a whole forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from toolkit.evaluation.perplexity import kl_divergence_sum
from toolkit.models.architectures import decoder_layers, layout_of
from toolkit.quant.arithmetic import fake_quantize_activations, fake_quantize_weight
from toolkit.quant.spec import QuantScheme


@dataclass(frozen=True)
class KeepFloat:
    """A weight-quantization pass's mixed precision: keep float the fused groups of linears whose quantization
    costs the most KL against the float model, up to ``share`` of the quantized linears' weights."""

    share: float  # at most this fraction of the weights the pass would quantize stays float (0.03: 3 %)
    windows: int = 4  # calibration windows scored (the first ones of the pass's calibration set)

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"keep_float share must be in (0, 1) (a fraction of the quantized weights kept "
                             f"float, 0.03 for 3 %), got {self.share}")
        if self.windows < 1:
            raise ValueError(f"keep_float windows must be >= 1 calibration window, got {self.windows}")


@dataclass(frozen=True)
class GroupCost:
    layer: int
    names: tuple[str, ...]  # full module names of the group's linears
    weights: int  # parameters of the group's linears
    kl: float  # mean KL per token against the float model with this group quantized alone


@dataclass(frozen=True)
class Selection:
    kept: tuple[GroupCost, ...]  # the groups kept float, costliest first
    layer_costs: dict[int, float]  # KL with one whole layer quantized, every layer
    scored: tuple[GroupCost, ...]  # every group scored, costliest first
    budget: int  # weights that may stay float
    total: int  # weights the pass would quantize

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for g in self.kept for n in g.names)

    def report(self) -> dict[str, Any]:
        """What the choice was made of, for a pass's report (KL per token)."""
        kept_weights = sum(g.weights for g in self.kept)
        return {"kept_float": [{"names": list(g.names), "kl": g.kl, "share": g.weights / self.total}
                               for g in self.kept],
                "share_kept": kept_weights / self.total, "budget_share": self.budget / self.total,
                "layer_kl": {str(i): kl for i, kl in self.layer_costs.items()},
                "group_kl": {",".join(g.names): g.kl for g in self.scored}}


def choose(groups: list[GroupCost], budget: int) -> list[GroupCost]:
    """The costliest groups first, each taken if it still fits ``budget`` weights."""
    kept, left = [], budget
    for g in sorted(groups, key=lambda g: -g.kl):
        if g.weights <= left:
            kept.append(g)
            left -= g.weights
    return kept


class _Feed(nn.Module):
    """Stands in for a decoder layer before the first changed one: passes the hidden states on; the last one hands
    the next layer its input as the float model computed it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


class GroupScorer:
    """KL against the float model of ``model`` (float, in memory) with chosen linears quantized as ``scheme``, on
    ``windows: [N, L]``. Holds the float model's log-probabilities and every decoder layer's float input.
    ``round_weights=False`` rounds the inputs only (what ``benchmarks/fp8_error_sources.py --inputs-only`` studies)."""

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor, scheme: QuantScheme, batch_size: int,
                 round_weights: bool = True) -> None:
        self.model, self.scheme, self.round_weights = model, scheme, round_weights
        self.batches = list(windows.split(batch_size))
        self.tokens = windows.numel()
        layers = decoder_layers(model)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]  # [layer][batch] -> [B, L, H]

        def keep(i: int) -> Any:
            def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[i].append(hidden.detach().clone())
            return hook

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                self.reference = [F.log_softmax(self._logits(b), dim=-1) for b in self.batches]
        finally:
            for h in handles:
                h.remove()

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, use_cache=False).logits.float()

    @torch.no_grad()
    def kl(self, names: list[str]) -> float:
        """Mean KL per token with the linears ``names`` (all in decoder layers) quantized alone."""
        first = min(int(n.split(".")[len(layout_of(self.model).layers.split("."))]) for n in names)
        total = 0.0
        with self._quantized(names), self._bypassed(first) as feed:
            for b, batch in enumerate(self.batches):
                if feed is not None:
                    feed.hidden = self.inputs[first][b]
                total += kl_divergence_sum(self.reference[b], F.log_softmax(self._logits(batch), dim=-1))
        return total / self.tokens

    @contextlib.contextmanager
    def _bypassed(self, first: int) -> Iterator[_Feed | None]:
        """Layers ``0 .. first-1`` replaced by feeds; the last feed is returned (None when ``first`` is 0)."""
        layers = decoder_layers(self.model)
        originals = [layers[i] for i in range(first)]
        for i in range(first):
            layers[i] = _Feed()
        try:
            yield layers[first - 1] if first else None  # type: ignore[misc]
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer

    @contextlib.contextmanager
    def _quantized(self, names: list[str]) -> Iterator[None]:
        """The linears ``names`` compute with rounded weights and, when the scheme says so, rounded inputs."""
        act, spec = self.scheme.input_activations, self.scheme.weights
        saved, handles = {}, []
        for n in names:
            m = self.model.get_submodule(n)
            saved[n] = m.weight.data
            if self.round_weights:
                m.weight.data = fake_quantize_weight(m.weight.data.float(), spec).to(m.weight.dtype)
            if act is not None:
                handles.append(m.register_forward_pre_hook(
                    lambda _, a: (fake_quantize_activations(a[0], act.type, act.strategy, None),)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for n, w in saved.items():
                self.model.get_submodule(n).weight.data = w


def layer_groups(model: PreTrainedModel, targets: set[str]) -> dict[int, list[tuple[str, ...]]]:
    """Per decoder layer, its fused groups whose linears are all in ``targets`` (a group partly outside them, split
    by a ``skip`` list, is left as the pass quantizes it)."""
    layout = layout_of(model)
    found: dict[int, list[tuple[str, ...]]] = {}
    for i in range(len(decoder_layers(model))):
        for group in layout.sequential_groups():
            names = tuple(f"{layout.layers}.{i}.{rel}" for rel in group)
            if all(n in targets for n in names):
                found.setdefault(i, []).append(names)
    return found


def keep_float_groups(model: PreTrainedModel, windows: torch.Tensor, scheme: QuantScheme, targets: dict[str, nn.Linear],
                      keep: KeepFloat, batch_size: int, round_weights: bool = True) -> Selection:
    """The fused groups of ``targets`` to keep float: the costliest that fit ``keep.share`` of the targets' weights,
    scored on ``windows[:keep.windows]``."""
    scorer = GroupScorer(model, windows[: keep.windows], scheme, batch_size, round_weights)
    groups = layer_groups(model, set(targets))
    size = {n: m.weight.numel() for n, m in targets.items()}
    total = sum(size.values())
    budget = math.floor(keep.share * total)
    layer_costs = {i: scorer.kl([n for g in gs for n in g]) for i, gs in groups.items()}
    smallest = min((sum(size[n] for n in g) for gs in groups.values() for g in gs), default=0)
    scored: list[GroupCost] = []
    kept: list[GroupCost] = []
    for i in sorted(layer_costs, key=lambda i: -layer_costs[i]):
        full = budget - sum(g.weights for g in kept) < smallest
        if kept and full and layer_costs[i] < min(g.kl for g in kept):
            break  # no group of this layer, nor of any cheaper one, would displace a kept group
        scored += [GroupCost(i, g, sum(size[n] for n in g), scorer.kl(list(g))) for g in groups[i]]
        kept = choose(scored, budget)
    return Selection(tuple(kept), layer_costs, tuple(sorted(scored, key=lambda g: -g.kl)), budget, total)
