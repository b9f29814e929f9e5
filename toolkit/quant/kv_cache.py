"""An fp8 e4m3 KV cache in the PyTorch model: every attention layer's keys (after RoPE) and values rounded to e4m3 with
one static scale each, ``k_scale`` / ``v_scale``, as vLLM's ``kv_cache_dtype="fp8"`` cache stores them.

The rounding sits in front of the model's own attention function: a wrapper registered with transformers'
``AttentionInterface`` under its own name for each implementation it wraps (``fp8_kv_sdpa``, ``fp8_kv_eager``), which
reads the layer's scales and delegates to sdpa or to the family's own eager function (Gemma 2's soft-capping
included); the attention mask is the delegate's. Keys reach it after RoPE and, when generating, after the cache update
(the whole cache: entries rounded before round to themselves). The scales are float32 ``[1]`` buffers of the attention
module, so the state dict names them as compressed-tensors and vLLM do: ``model.layers.N.self_attn.k_scale``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from toolkit.errors import ToolkitError
from toolkit.models.architectures import decoder_layers, layout_of
from toolkit.quant.arithmetic import activation_scale, fake_quantize_activations
from toolkit.quant.spec import KVCacheSpec

SCALES = ("k_scale", "v_scale")  # the attention module's buffers, and their names in a compressed-tensors export
PREFIX = "fp8_kv_"  # + the wrapped implementation: the name registered with transformers
WRAPPED = {"sdpa": sdpa_mask, "eager": eager_mask}  # implementations the wrapper delegates to, with their masks


class Observer:
    """Running max |k| and max |v| of one attention layer (calibration: nothing is rounded while it is set)."""

    def __init__(self) -> None:
        self.k = torch.zeros(())
        self.v = torch.zeros(())

    def add(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.k = torch.maximum(self.k, key.detach().abs().amax().float().cpu())
        self.v = torch.maximum(self.v, value.detach().abs().amax().float().cpu())


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` stored as e4m3 with the per-tensor ``scale`` and read back (saturating at ±448)."""
    return fake_quantize_activations(x, "float", "tensor", scale)


def _delegate(base: str, module: nn.Module) -> Callable[..., Any]:
    if base == "eager":  # each family's own eager function (soft-capping, sinks ...), as its forward would pick
        return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]
    return ALL_ATTENTION_FUNCTIONS[base]  # type: ignore[no-any-return]


def _wrapper(base: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        # key, value: [B, KVH, S, D], keys after RoPE
        observer = getattr(module, "kv_observer", None)
        if observer is not None:
            observer.add(key, value)
        else:
            key, value = fp8_round(key, module.k_scale), fp8_round(value, module.v_scale)
        return _delegate(base, module)(module, query, key, value, attention_mask, **kwargs)
    return attention


def _register() -> None:
    for base, mask in WRAPPED.items():
        if PREFIX + base not in AttentionInterface._global_mapping:
            AttentionInterface.register(PREFIX + base, _wrapper(base))
            AttentionMaskInterface.register(PREFIX + base, mask)


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """Each decoder layer's attention module, in layer order."""
    rel = layout_of(model).attention
    return [layer.get_submodule(rel) for layer in decoder_layers(model)]


def install(model: PreTrainedModel, spec: KVCacheSpec) -> None:
    """Give every attention layer ``k_scale`` / ``v_scale`` buffers (ones, on the current default device: meta while a
    checkpoint is built) and switch the model to the rounding wrapper of its attention implementation."""
    base = model.config._attn_implementation
    if base not in WRAPPED and not str(base).startswith(PREFIX):
        raise ToolkitError(f"an fp8 KV cache rounds keys and values in front of sdpa or eager attention, not "
                           f"{base!r}: load the model with attn_implementation 'sdpa' or 'eager'")
    _register()
    for module in attention_modules(model):
        for name in SCALES:
            module.register_buffer(name, torch.ones(1, dtype=torch.float32))
        module.kv_cache = spec
    if not str(base).startswith(PREFIX):
        model.set_attn_implementation(PREFIX + base)


def spec_of(model: nn.Module) -> KVCacheSpec | None:
    """The KV cache ``install`` gave ``model`` (None: a float cache)."""
    modules = attention_modules(model)  # type: ignore[arg-type]
    return getattr(modules[0], "kv_cache", None) if modules else None


Scales = dict[str, tuple[torch.Tensor, torch.Tensor]]  # attention module name -> (k_scale, v_scale)


def scales(model: PreTrainedModel) -> Scales:
    """``(k_scale, v_scale)`` float32 ``[1]`` of each attention module, by its full name, in layer order."""
    arch = layout_of(model)
    return {f"{arch.layers}.{i}.{arch.attention}": (m.k_scale, m.v_scale)
            for i, m in enumerate(attention_modules(model))}


def load(model: PreTrainedModel, spec: KVCacheSpec, named: Scales, where: str) -> None:
    """Install ``spec`` on ``model`` with the scales an export holds (read back by ``where``); refuse scales that do
    not name exactly the model's attention modules."""
    install(model, spec)
    ours = scales(model)
    if set(named) != set(ours):
        missing, extra = sorted(set(ours) - set(named)), sorted(set(named) - set(ours))
        raise ToolkitError(f"{where}: the KV cache scales do not fit the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, (k, v) in named.items():
            ours[name][0].copy_(k.reshape(1))
            ours[name][1].copy_(v.reshape(1))


@torch.no_grad()
def calibrate(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> list[tuple[float, float]]:
    """Set every layer's scales to max |k| / 448 and max |v| / 448 of what its cache stores (keys after RoPE) over
    ``windows: [N, L]`` token ids, on the model as it is (its quantized linears included); returns the maxima."""
    modules = attention_modules(model)
    observers = [Observer() for _ in modules]
    for m, o in zip(modules, observers, strict=True):
        m.kv_observer = o
    device = next(model.parameters()).device
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(windows[i:i + batch_size].to(device), use_cache=False)
    finally:
        for m in modules:
            del m.kv_observer
    for m, o in zip(modules, observers, strict=True):
        m.k_scale.copy_(activation_scale(o.k.reshape(1), "float"))
        m.v_scale.copy_(activation_scale(o.v.reshape(1), "float"))
    return [(float(o.k), float(o.v)) for o in observers]


def check_float_cache(model: nn.Module, consumer: str) -> None:
    """Refuse, for ``consumer`` (an export whose runtime keeps a float KV cache), a model computing with an fp8 one:
    its self-check would compare a different model, and the deployment would lose what the evaluation measured."""
    if spec_of(model) is not None:
        raise ToolkitError(f"{consumer} keeps a float KV cache; this model computes with an fp8 one (the kv_cache "
                           "pass): export it with export_compressed_tensors or export_modelopt, or drop kv_cache")


def check_same(model: PreTrainedModel, exported: PreTrainedModel) -> None:
    """Refuse an export whose KV cache (read back into ``exported``) is not ``model``'s, bit for bit."""
    ours, theirs = spec_of(model), spec_of(exported)
    if ours != theirs:
        raise ToolkitError(f"the export's KV cache is {theirs}, the model's {ours}; this is a bug in the exporter, "
                           "please report it")
    if ours is None:
        return
    a, b = scales(model), scales(exported)
    if a.keys() != b.keys() or not all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n], strict=True)):
        raise ToolkitError("the exported KV cache scales differ from the model's; this is a bug in the exporter, "
                           "please report it")
