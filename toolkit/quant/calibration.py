"""Layer-by-layer calibration: capture the inputs of decoder layer 0, then walk the layers.

Only one layer's activations are kept at a time: ``hidden [N, L, H]`` float32 (128 x 512 x 576
= 151 MB for SmolLM2), held as batches in an ``ActivationBuffer`` (in memory up to its budget, the rest
spilled to disk), each batch replaced by the layer's output. A pass quantizes a layer, then
``advance`` runs the *quantized* layer to produce the next layer's inputs, so every layer is
calibrated on the outputs of the already-quantized ones (GPTQ sec. 4, "sequential").
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import decoder_layers, layer_types
from toolkit.quant.activations import ActivationBuffer
from toolkit.quant.moments import InputMaxima


class _Stop(Exception):
    """Raised from a hook to end a forward once the wanted activations are seen."""


@dataclass
class LayerInputs:
    hidden: ActivationBuffer  # batches [B, L, H] of the input hidden states of the current layer
    # per layer type, per batch: what the model passes a layer (position embeddings, mask); sliding-window
    # layers get another mask, Gemma 3's local layers other rotary embeddings
    kwargs_by_type: dict[str, list[dict[str, Any]]]
    types: list[str]  # layer type of each decoder layer
    batch_size: int
    layer: int = 0  # the layer ``hidden`` feeds (``walk_layers`` moves it)

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        return self.kwargs_by_type[self.types[self.layer]]

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for b, kw in enumerate(self.kwargs):
            yield self.hidden.get(b), kw


@dataclass
class LayerPair:
    """One decoder layer as it is being quantized, with its inputs from the (quantized) layers before it, beside a
    float copy of it taken before any change, with the float model's inputs (GPTAQ's asymmetric calibration)."""

    prefix: str
    layer: nn.Module
    inputs: LayerInputs
    reference: nn.Module
    reference_inputs: LayerInputs


def check_finite(t: torch.Tensor, what: str) -> None:
    # the sum is finite iff every element is (a huge finite sum overflowing is an error worth reporting too)
    if not torch.isfinite(t.sum()):
        raise ToolkitError(f"{what} holds NaN or Inf values; the model or its calibration overflowed — "
                           "check the input model (evaluate it in float) before quantizing")


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: keeps what it is given, passes the hidden states on."""

    def __init__(self, store: Callable[[torch.Tensor, dict[str, Any]], None] | None, last: bool) -> None:
        super().__init__()
        self.store, self.last = store, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        if self.store is not None:
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "cache")}
            self.store(hidden_states.detach().float(), kw)
        if self.last:
            raise _Stop
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int,
                         buffer: ActivationBuffer | None = None) -> LayerInputs:
    """Run the embedding part of ``model`` on ``windows: [N, L]``; keep what decoder layer 0 receives (in
    ``buffer``; by default an unbounded in-memory one) and the keyword arguments (mask, rotary embeddings)
    the first layer of every layer type receives.

    The layers are swapped for recorders while this runs, so a forward costs the embedding alone (and
    works on a skeleton whose decoder layers are still on the meta device)."""
    layers = decoder_layers(model)
    types = layer_types(model.config)
    firsts = {t: types.index(t) for t in dict.fromkeys(types)}  # layer type -> first layer of that type
    kwargs: dict[int, list[dict[str, Any]]] = {i: [] for i in firsts.values()}
    hidden = ActivationBuffer() if buffer is None else buffer

    def keep(i: int) -> Callable[[torch.Tensor, dict[str, Any]], None]:
        def store(h: torch.Tensor, kw: dict[str, Any]) -> None:
            kwargs[i].append(kw)
            if i == 0:
                check_finite(h, "the embedding output")
                hidden.append(h)
        return store

    originals = list(layers)
    last = max(firsts.values())
    for i in range(last + 1):
        layers[i] = _Recorder(keep(i) if i in kwargs else None, last=i == last)
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(hidden, {t: kwargs[i] for t, i in firsts.items()}, types, batch_size)


def _run_until(model: PreTrainedModel, handle: RemovableHandle, windows: torch.Tensor, batch_size: int) -> None:
    """Run ``model`` on ``windows`` batch by batch; the hook behind ``handle`` ends each forward with ``_Stop``."""
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()


@torch.no_grad()
def stream_module_inputs(model: PreTrainedModel, module: nn.Module, windows: torch.Tensor, batch_size: int,
                         fn: Callable[[torch.Tensor], None], what: str) -> None:
    """Call ``fn(x)`` with what ``module`` (named ``what`` in errors) receives when ``model`` runs
    ``windows: [N, L]``, batch by batch. Each forward stops at ``module`` (for the lm_head: the whole body
    runs, the 49152-wide matmul does not)."""

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        check_finite(x, f"the input of {what}")
        fn(x.float())
        raise _Stop

    _run_until(model, module.register_forward_pre_hook(hook), windows, batch_size)


@torch.no_grad()
def input_maxima(model: PreTrainedModel, modules: dict[str, nn.Module], stop_at: nn.Module, windows: torch.Tensor,
                 batch_size: int) -> dict[str, InputMaxima]:
    """``max |x|`` per input channel of each of ``modules`` (``nn.Linear``) when ``model`` runs ``windows: [N, L]``;
    each forward ends at ``stop_at`` (the head: its matmul is not needed)."""
    maxima = {n: InputMaxima(m.in_features, m.weight.device) for n, m in modules.items()}  # type: ignore[arg-type]

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            check_finite(x, f"the input of {name}")
            maxima[name].add(x)
        return hook

    def stop(_: nn.Module, args: tuple[Any, ...]) -> None:
        raise _Stop

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        _run_until(model, stop_at.register_forward_pre_hook(stop), windows, batch_size)
    finally:
        for h in handles:
            h.remove()
    return maxima


def _layer_out(layer: nn.Module, hidden: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def stream_inputs(layer: nn.Module, inputs: LayerInputs, modules: dict[str, nn.Module],
                  fn: Callable[[str, torch.Tensor], None]) -> None:
    """Call ``fn(name, x)`` with the input ``x: [B, L, in]`` of each of ``modules`` for every batch.

    Each forward stops at the last of ``modules`` to run, so collecting statistics for the attention
    projections costs only the input norm.
    """
    remaining: set[str] = set()

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            check_finite(x, f"the input of {name}")
            fn(name, x.float())
            remaining.discard(name)
            if not remaining:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        for hidden, kw in inputs.batches():
            remaining.update(modules)
            with contextlib.suppress(_Stop):
                _layer_out(layer, hidden, kw)
    finally:
        for h in handles:
            h.remove()


def _batch_inputs(layer: nn.Module, hidden: torch.Tensor, kw: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The input of each of ``modules`` when ``layer`` runs one batch; the forward stops once all are seen."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            check_finite(x, f"the input of {name}")
            seen[name] = x.float()
            if len(seen) == len(modules):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        with contextlib.suppress(_Stop):
            _layer_out(layer, hidden, kw)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def stream_input_pairs(pair: LayerPair, names: list[str], fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """Call ``fn(name, x, x_ref)`` for every batch with the input of each of ``names`` (submodules, relative to the
    layer) in the layer as it is now (on its own inputs) and in the reference layer (on the reference inputs),
    token for token."""
    for (hidden, kw), (ref_hidden, ref_kw) in zip(pair.inputs.batches(), pair.reference_inputs.batches(), strict=True):
        ref = _batch_inputs(pair.reference, ref_hidden, ref_kw, {n: pair.reference.get_submodule(n) for n in names})
        now = _batch_inputs(pair.layer, hidden, kw, {n: pair.layer.get_submodule(n) for n in names})
        for n in names:
            fn(n, now[n], ref[n])


@torch.no_grad()
def advance(layer: nn.Module, inputs: LayerInputs, name: str) -> None:
    """Replace ``inputs.hidden`` by the output of ``layer``, batch by batch."""
    for b, (hidden, kw) in enumerate(inputs.batches()):
        out = _layer_out(layer, hidden, kw)
        check_finite(out, f"the output of {name}")
        inputs.hidden.put(b, out)


def walk_layers(model: PreTrainedModel, windows: torch.Tensor, batch_size: int, layers_path: str,
                fn: Callable[[str, nn.Module, LayerInputs], None], progress: bool = False) -> None:
    """``fn(prefix, layer, inputs)`` for each decoder layer in order, then advance through the (changed) layer."""
    inputs = capture_layer_inputs(model, windows, batch_size)
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress, leave=False)):
        prefix = f"{layers_path}.{i}"
        inputs.layer = i
        fn(prefix, layer, inputs)
        advance(layer, inputs, prefix)


def walk_layer_pairs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int, layers_path: str,
                     fn: Callable[[LayerPair], None], progress: bool = False) -> None:
    """``walk_layers`` carrying the float model's hidden states too: ``fn(pair)`` for each decoder layer in order,
    then both streams advance, the quantized one through the (changed) layer, the float one through the copy.
    Twice ``walk_layers``' activation memory, and one float copy of a layer."""
    inputs = capture_layer_inputs(model, windows, batch_size)
    reference_inputs = LayerInputs(ActivationBuffer.of(inputs.hidden.get(b).clone() for b in range(len(inputs.hidden))),
                                   inputs.kwargs_by_type, inputs.types, batch_size)
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress, leave=False)):
        prefix = f"{layers_path}.{i}"
        inputs.layer = reference_inputs.layer = i
        pair = LayerPair(prefix, layer, inputs, copy.deepcopy(layer), reference_inputs)
        fn(pair)
        advance(pair.reference, reference_inputs, f"{prefix} (float)")
        advance(layer, inputs, prefix)
