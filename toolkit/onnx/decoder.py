"""The decoder graph: attention-mask arithmetic, rotary caches, decoder layers; tensor names from the contract.

What a runtime feeds (both targets; ``P`` cached columns, ``S`` new tokens, rows left-padded; the names are
``TensorNames`` of ``toolkit.runtime.contract``):
- input ids ``[B,S] int64``; position ids ``[B,S] int64`` = ``cumsum(attention_mask) - 1`` at the new columns
  (read by the standard target's RotaryEmbedding; the ort graph ignores it, see below);
- attention mask ``[B,M] int64``: 1 for real tokens, 0 for left padding, one column per cache column.
  ort target without buffer sharing: ``M = P+S`` and each layer's past key and value are ``[B,KVH,P,D]`` (P=0
  for the prefill: a zero-length tensor); its present key and value come back as ``[B,KVH,P+S,D]``.
- ort target, shared buffer (onnxruntime-genai's ``past_present_share_buffer``): bind the SAME preallocated
  ``[B,KVH,C,D]`` OrtValue as a layer's past key and its present key (likewise value) through IO
  binding; GroupQueryAttention sees equal pointers and writes the S new rows in place at columns ``[P, P+S)``.
  The mask is then either ``[B, P+S]`` or ``[B, C]`` with zeros after column ``P+S-1``; both work, because the
  graph derives everything from the index of the last 1, per row. Rows may have different lengths (each
  written from column 0, its mask ``1`` up to its own last column): the runtime decodes ragged batches this
  way. Requirements: ``P+S <= C <= max_positions``, and a step with ``S > 1`` after the prefill needs
  ``B = 1`` (GroupQueryAttention's rule for chunked prompts).
- standard target (what TensorRT's ONNX parser reads): each layer's past key and value are the whole
  fixed-capacity cache ``[B,KVH,C,D]`` and present has the same shape: TensorScatter (axis -2) writes the S new
  rows at each row's columns ``[last-S, last)`` and Attention (no past/present inputs) attends over all C columns
  under a mask that hides padding, unwritten columns and the future. Bind one buffer as past and present
  (onnxruntime's TensorScatter then writes in place), or feed the whole row and take present back. The mask
  may be ``[B, M]`` for any ``P+S <= M <= C``; ragged rows and chunked prompts work as in the ort target.

Masking, computed in the graph from ``attention_mask [B, M]``:
``last[b]`` = 1 + index of the last 1 in the row = the number of cache columns in use after this step.
``T = max_b last[b]``; key column ``t`` of row ``b`` is visible to query ``s`` (column ``last[b]-S+s``) when
``mask[b,t] = 1`` (or ``t`` is the query's own column, so that a left-pad query never sees an empty row and
turns into NaN) and ``t <= last[b]-S+s`` (causal).

GroupQueryAttention reads ``seqlens_k = last - 1`` (int32 [B]), ``total_sequence_length = T`` (int32 scalar) and
``attention_bias [B,1,S,T]`` (0 or -1e9: the padding part; it applies the causal part itself); it writes the new
keys at columns ``[last-S, last)`` of present. Its fused rotary uses the cache column as position. Left padding
shifts that by the pad count for a padded row; rotary attention depends only on position differences, and pad
keys are masked, so the logits equal Hugging Face's (which uses ``position_ids = cumsum(mask) - 1``).
GQA's own ``position_ids`` input is not used: in a first prompt it reads only its first element, which cannot
describe a left-padded batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import (
    Architecture,
    activation,
    attention_scale,
    attention_softcap,
    decoder_layers,
    embed_multiplier,
    final_softcap,
    layer_types,
    layout_of,
    logits_divisor,
    residual_multiplier,
    rotary_layers,
    sliding_windows,
)
from toolkit.onnx.graph import (
    IR_VERSION,
    MASK_NEG,
    MS,
    Builder,
    Dims,
    GraphOptions,
    Store,
    dims_of,
    embed,
    head_linear,
    linear,
)
from toolkit.onnx.weights import concat_rows, linear_weight, split_rows
from toolkit.quant.modules import reads_head
from toolkit.runtime.artifact import next_token_node
from toolkit.runtime.contract import KINDS, TensorNames

Resident = Callable[[list[str]], AbstractContextManager[object]]  # module paths -> their weights held


@dataclass
class MaskValues:
    seqlens_k: str  # ort: int32 [B]: columns in use after this step, minus one
    total: str  # ort: int32 scalar T
    bias: str  # ort: float [B,1,S,T] additive or "" (right padding only); standard: bool [B,1,S,C] (True = attend)
    q_col: str = ""  # standard: int64 [B,1,S,1] cache column of each query
    k_col: str = ""  # standard: int64 [1,C] key columns (the whole cache capacity C)
    write_at: str = ""  # standard: int64 [B] first cache column this step writes, per row (TensorScatter)
    windowed: dict[int, str] | None = None  # standard: bias of sliding-window layers, by window (built on demand)

    def standard_bias(self, b: Builder, window: int | None) -> str:
        """The boolean mask of a layer: a sliding window also hides keys ``window`` or more columns back."""
        if window is None:
            return self.bias
        self.windowed = self.windowed if self.windowed is not None else {}
        if window not in self.windowed:
            near = b.one("Less", [b.one("Sub", [self.q_col, self.k_col]), b.const(f"window_{window}",
                                                                                 np.array(window, np.int64))])
            self.windowed[window] = b.one("And", [self.bias, near])
        return self.windowed[window]


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention needs beyond its weights: rotary caches, window, scale, soft-cap, q/k norms."""

    cos: str  # "" in a layer without rotary (SmolLM3's NoPE layers)
    sin: str
    rotary_dim: int
    window: int | None  # keys a query sees (its own included), or None
    scale: float
    softcap: float | None
    qk_norms: tuple[np.ndarray, np.ndarray] | None  # per-head RMSNorm weights (offset folded in)


def _activation(b: Builder, x: str, kind: str) -> str:
    if kind == "silu":
        return b.one("Mul", [x, b.one("Sigmoid", [x])])
    if kind in ("gelu_pytorch_tanh", "gelu_tanh"):
        return b.one("Gelu", [x], approximate="tanh")  # opset 20
    raise ToolkitError(f"MLP activation '{kind}' has no ONNX form here; supported: silu, gelu_pytorch_tanh")


def _softcap(b: Builder, x: str, cap: float, name: str) -> str:
    """``cap · tanh(x / cap)`` (Gemma 2's final-logit soft-capping)."""
    c = b.fconst(f"{name}.softcap", cap)
    return b.one("Mul", [b.one("Tanh", [b.one("Div", [x, c])]), c])


def rotary_caches(model: PreTrainedModel, dims: Dims, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin [max_positions, rotary_dim/2]`` from the model's own rotary module (its scaling and
    attention factor included; ``layer_type`` picks Gemma 3's local or global rotary)."""
    rot = model.get_submodule(layout_of(model).rotary)
    pos = torch.arange(dims.max_positions).unsqueeze(0)
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos, **kwargs)  # [1, P, R]; HF duplicates the halves
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def mask_values(b: Builder, opts: GraphOptions, names: TensorNames) -> MaskValues:
    one = b.const("one_i64", np.array(1, np.int64))
    if opts.target == "ort" and not opts.left_padding:  # rows written from column 0: the count of 1s is last
        return _right_padded_mask(b, names, one)
    width = b.one("Squeeze", [b.one("Shape", [names.attention_mask], start=1, end=2)])
    col1 = b.one("Range", [one, b.one("Add", [width, one]), one])  # [M]: 1..M
    last = b.one("ReduceMax", [b.one("Mul", [names.attention_mask, col1]), b.ints([1])], keepdims=0)  # [B]
    if opts.target == "standard":
        return _cache_mask(b, names, last, width)
    total = b.one("ReduceMax", [last], keepdims=0)  # scalar T
    seqlens_k = b.one("Cast", [b.one("Sub", [last, one])], to=TensorProto.INT32)
    zero = b.const("zero_i64", np.array(0, np.int64))
    new = b.one("Squeeze", [b.one("Shape", [names.input_ids], start=1, end=2)])
    visible = b.one("Slice", [names.attention_mask, b.ints([0]), b.one("Unsqueeze", [total, b.ints([0])]), b.ints([1])])
    visible = b.one("Unsqueeze", [b.one("Cast", [visible], to=TensorProto.BOOL), b.ints([1, 2])])  # [B,1,1,T]
    # Each row's queries sit at its own last columns (last[b]-S .. last[b]-1): rows of different lengths
    # share one cache buffer, each written from column 0, so the query column is per row, not T-S.
    offsets = b.one("Range", [zero, new, one])  # [S]
    start = b.one("Unsqueeze", [b.one("Sub", [last, new]), b.ints([1])])  # [B,1]
    q_col = b.one("Unsqueeze", [b.one("Add", [start, offsets]), b.ints([1, 3])])  # [B,1,S,1]
    k_col = b.one("Unsqueeze", [b.one("Range", [zero, total, one]), b.ints([0])])  # [1,T]
    allowed = b.one("Or", [visible, b.one("Equal", [q_col, k_col])])  # [B,1,S,T]; GQA applies the causal part
    neg = max(MASK_NEG, float(np.finfo(b.float_dtype).min))  # float16: -65504, not -inf
    bias = b.one("Where", [allowed, b.fconst("zero_f", 0.0), b.fconst("mask_neg", neg)])
    return MaskValues(seqlens_k, b.one("Cast", [total], to=TensorProto.INT32), bias)


def _right_padded_mask(b: Builder, names: TensorNames, one: str) -> MaskValues:
    """A graph without left padding (GQA masks by seqlens_k: right-padded rows need no bias): each row's 1s run
    from column 0 to its last, so ``last`` is their sum (5 nodes a step; the general form takes 10)."""
    last = b.one("ReduceSum", [names.attention_mask, b.ints([1])], keepdims=0)  # [B]
    total = b.one("Cast", [b.one("ReduceMax", [last], keepdims=0)], to=TensorProto.INT32)  # scalar T
    return MaskValues(b.one("Cast", [b.one("Sub", [last, one])], to=TensorProto.INT32), total, "")


def _cache_mask(b: Builder, names: TensorNames, last: str, width: str) -> MaskValues:
    """The standard target's mask over the whole cache capacity ``C`` (its past inputs' length): shapes follow
    the inputs' shapes, never the mask's values. Key column ``t`` is visible to a query at column ``q`` when
    ``t <= q`` and ``mask[b, t] = 1`` (or ``t = q``); columns at or past ``M`` (unwritten) are later than every
    query, so causality hides them."""
    zero, one = b.const("zero_i64", np.array(0, np.int64)), b.const("one_i64", np.array(1, np.int64))
    capacity = b.one("Shape", [names.past(0, KINDS[0])], start=2, end=3)  # [1]: C
    new = b.one("Squeeze", [b.one("Shape", [names.input_ids], start=1, end=2)])
    write_at = b.one("Sub", [last, new])  # [B]: each row's new columns are [last-S, last)
    pads = b.one("Concat", [b.ints([0, 0, 0]), b.one("Sub", [capacity, b.one("Unsqueeze", [width, b.ints([0])])])],
                 axis=0)
    visible = b.one("Cast", [b.one("Pad", [names.attention_mask, pads])], to=TensorProto.BOOL)  # [B,C]
    visible = b.one("Unsqueeze", [visible, b.ints([1, 2])])  # [B,1,1,C]
    offsets = b.one("Range", [zero, new, one])  # [S]
    q_col = b.one("Unsqueeze", [b.one("Add", [b.one("Unsqueeze", [write_at, b.ints([1])]), offsets]),
                                b.ints([1, 3])])  # [B,1,S,1]
    k_col = b.one("Unsqueeze", [b.one("Range", [zero, b.one("Squeeze", [capacity]), one]), b.ints([0])])  # [1,C]
    allowed = b.one("Or", [visible, b.one("Equal", [q_col, k_col])])
    bias = b.one("And", [allowed, b.one("LessOrEqual", [k_col, q_col])])  # [B,1,S,C]
    return MaskValues("", "", bias, q_col, k_col, write_at=write_at)


def _qk_norm(b: Builder, x: str, weight: np.ndarray, heads: int, name: str, d: Dims) -> str:
    """RMSNorm of ``x [B,S,heads*D]`` before rotary: over each head's D (Qwen3, Gemma 3) or, for a weight
    of the projection's width, over all of it (OLMo 2)."""
    if weight.shape[0] == heads * d.head_dim:
        return b.one("RMSNormalization", [x, b.fconst(f"{name}.weight", weight)], epsilon=d.eps, axis=-1)
    per_head = b.one("Reshape", [x, b.ints([0, 0, heads, d.head_dim])])
    normed = b.one("RMSNormalization", [per_head, b.fconst(f"{name}.weight", weight)], epsilon=d.eps, axis=-1)
    return b.one("Reshape", [normed, b.ints([0, 0, heads * d.head_dim])])


def _qkv(b: Builder, h: str, i: int, layer: torch.nn.Module, arch: Architecture, la: LayerAttention,
         d: Dims, opts: GraphOptions) -> list[str]:
    """[q, k, v], or [packed qkv, "", ""] (ort, no q/k norm): one MatMulNBits for the three when formats agree."""
    if arch.qkv:
        parts = [linear_weight(layer.get_submodule(arch.qkv))]
    else:
        parts = [linear_weight(layer.get_submodule(n)) for n in (arch.q, arch.k, arch.v)]  # type: ignore[arg-type]
    fused = parts[0] if len(parts) == 1 else concat_rows(parts) if opts.target == "ort" else None
    if fused is not None:
        qkv = linear(b, h, fused, f"layers.{i}.qkv_proj", opts)
        if opts.target == "ort" and la.qk_norms is None:
            return [qkv, "", ""]
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        q, k, v = b.op("Split", [qkv, b.ints(sizes)], n_out=3, axis=-1)
    else:
        q, k, v = (linear(b, h, w, f"layers.{i}.{r}_proj", opts) for w, r in zip(parts, "qkv", strict=True))
    if la.qk_norms is not None:
        q = _qk_norm(b, q, la.qk_norms[0], d.heads, f"layers.{i}.q_norm", d)
        k = _qk_norm(b, k, la.qk_norms[1], d.kv_heads, f"layers.{i}.k_norm", d)
    return [q, k, v]


def _attention_ort(b: Builder, h: str, i: int, layer: torch.nn.Module, m: MaskValues, arch: Architecture,
                   la: LayerAttention, d: Dims, opts: GraphOptions, names: TensorNames) -> str:
    qkv = _qkv(b, h, i, layer, arch, la, d, opts)  # GQA takes a packed [B,S,(H+2KVH)*D] input too
    past = [names.past(i, kind) for kind in KINDS]
    present = [names.present(i, kind) for kind in KINDS]
    extra: dict[str, Any] = {"scale": la.scale} if abs(la.scale - d.head_dim ** -0.5) > 1e-12 else {}
    if la.window is not None:
        extra["local_window_size"] = la.window
    if la.softcap:
        extra["softcap"] = la.softcap
    out = b.op("GroupQueryAttention", [*qkv, *past, m.seqlens_k, m.total, la.cos, la.sin, "", m.bias],
               domain=MS, outs=[b.fresh("attn"), *present], num_heads=d.heads, kv_num_heads=d.kv_heads,
               do_rotary=int(bool(la.cos)), rotary_interleaved=0, **extra)
    return out[0]


def _heads(b: Builder, x: str, heads: int, d: Dims) -> str:
    """``[B,S,heads*D] -> [B,heads,S,D]``: TensorRT's parser takes Attention's inputs 4-D only."""
    return b.one("Transpose", [b.one("Reshape", [x, b.ints([0, 0, heads, d.head_dim])])], perm=[0, 2, 1, 3])


def _attention_standard(b: Builder, h: str, i: int, layer: torch.nn.Module, m: MaskValues, arch: Architecture,
                        la: LayerAttention, d: Dims, opts: GraphOptions, names: TensorNames) -> str:
    """The cache is fixed-capacity: past ``[B,KVH,C,D]`` in, the new keys and values scattered at each row's
    ``write_at`` (TensorScatter, axis -2) out as present, and Attention (no past inputs) reads all C columns."""
    q, k, v = _qkv(b, h, i, layer, arch, la, d, opts)
    q, k, v = _heads(b, q, d.heads, d), _heads(b, k, d.kv_heads, d), _heads(b, v, d.kv_heads, d)
    if la.cos:  # 4-D input: heads come from the shape
        partial = {"rotary_embedding_dim": la.rotary_dim} if la.rotary_dim < d.head_dim else {}
        q = b.one("RotaryEmbedding", [q, la.cos, la.sin, names.position_ids], **partial)
        k = b.one("RotaryEmbedding", [k, la.cos, la.sin, names.position_ids], **partial)
    keys, values = (b.one("TensorScatter", [names.past(i, kind), new, m.write_at], outs=[names.present(i, kind)],
                          axis=-2) for kind, new in zip(KINDS, (k, v), strict=True))  # [B,KVH,C,D]
    mask = m.standard_bias(b, la.window)
    if la.softcap:
        out = _softcapped_attention(b, q, keys, values, mask, la, d)
    else:
        extra: dict[str, Any] = {"scale": la.scale} if abs(la.scale - d.head_dim ** -0.5) > 1e-12 else {}
        out = b.one("Attention", [q, keys, values, mask], is_causal=0, **extra)  # [B,H,S,D]
    return b.one("Reshape", [b.one("Transpose", [out], perm=[0, 2, 1, 3]), b.ints([0, 0, d.heads * d.head_dim])])


def _softcapped_attention(b: Builder, q: str, keys: str, values: str, mask: str, la: LayerAttention,
                          d: Dims) -> str:
    """Gemma 2's ``softmax(cap · tanh(q kᵀ scale / cap))`` in plain ops: TensorRT's parser refuses Attention's
    softcap attribute. Each KV head is repeated for its ``H/KVH`` query heads."""
    group = d.heads // d.kv_heads

    def repeat(x: str) -> str:  # [B,KVH,C,D] -> [B,H,C,D]
        wide = b.one("Expand", [b.one("Unsqueeze", [x, b.ints([2])]), b.ints([1, 1, group, 1, 1])])
        return b.one("Reshape", [wide, b.ints([0, d.heads, -1, d.head_dim])])

    scores = b.one("MatMul", [q, b.one("Transpose", [repeat(keys)], perm=[0, 1, 3, 2])])  # [B,H,S,C]
    scores = _softcap(b, b.one("Mul", [scores, b.fconst(f"attn.scale_{la.scale}", la.scale)]), la.softcap,  # type: ignore[arg-type]
                      f"attn_{la.softcap}")
    neg = max(MASK_NEG, float(np.finfo(b.float_dtype).min))
    scores = b.one("Where", [mask, scores, b.fconst("mask_neg", neg)])
    return b.one("MatMul", [b.one("Softmax", [scores], axis=-1), repeat(values)])  # [B,H,S,D]


def _pre_norm(b: Builder, delta: str | None, residual: str, layer: torch.nn.Module, norm: str | None,
              arch: Architecture, name: str, d: Dims, opts: GraphOptions) -> tuple[str, str]:
    """The sublayer's input and the new residual: a (skip-)norm, or for a family without pre-norms (OLMo 2)
    the residual sum itself."""
    if norm is not None:
        return _norm(b, delta, residual, _norm_weight(layer.get_submodule(norm), arch), name, d, opts)
    residual = residual if delta is None else b.one("Add", [residual, delta])
    return residual, residual


def _norm(b: Builder, delta: str | None, residual: str, weight: np.ndarray, name: str,
          d: Dims, opts: GraphOptions) -> tuple[str, str]:
    """RMSNorm of ``residual + delta`` -> (normed, new residual); ort fuses the add into SkipSimplifiedLayerNorm.

    The first norm has no add: standard RMSNormalization (onnx's checker rejects the contrib
    SimplifiedLayerNormalization, which onnxruntime registers in the default domain)."""
    w = b.fconst(f"{name}.weight", weight)
    if opts.target == "ort" and delta is not None:  # outputs: normed, (mean, inv_std: unused), residual + delta
        normed, total = b.fresh("norm"), b.fresh("residual")
        b.op("SkipSimplifiedLayerNormalization", [delta, residual, w], domain=MS, outs=[normed, "", "", total],
             epsilon=d.eps)
        return normed, total
    if delta is not None:
        residual = b.one("Add", [residual, delta])
    return b.one("RMSNormalization", [residual, w], epsilon=d.eps, axis=-1), residual


def _sandwich(b: Builder, x: str, layer: torch.nn.Module, norm: str | None, arch: Architecture, name: str,
              d: Dims) -> str:
    """Gemma 2/3's norm on a sublayer's output, before the residual add (identity for other families)."""
    if norm is None:
        return x
    w = b.fconst(f"{name}.weight", _norm_weight(layer.get_submodule(norm), arch))
    return b.one("RMSNormalization", [x, w], epsilon=d.eps, axis=-1)


def _norm_weight(module: torch.nn.Module, arch: Architecture) -> np.ndarray:
    """The RMSNorm's effective scale: Gemma's ``(1 + w)`` folded into the exported weight."""
    return (module.weight.detach().float() + arch.norm_offset).numpy()


def _gate_up(b: Builder, h: str, layer: torch.nn.Module, arch: Architecture, i: int,
             opts: GraphOptions) -> tuple[str, str]:
    """Gate and up projections. For onnxruntime (``ort``), one linear of both (Phi-3's stored gate_up as it is)
    and a Split when their formats agree, as for q/k/v: one MatMulNBits quantizes the input once and forks the
    intra-op pool once where two did both twice (onnxruntime-genai's graph keeps two). On one thread the two forms
    cost the same; on two the fused one decodes faster (``benchmarks/exports_ab.py``). Otherwise two linears."""
    name = f"layers.{i}.gate_up_proj"
    if arch.gate_up:
        stored = linear_weight(layer.get_submodule(arch.gate_up))
        halves = [stored.n // 2, stored.n // 2]
        if opts.target == "ort":
            return _split_pair(b, linear(b, h, stored, name, opts), halves)
        gate_w, up_w = split_rows(stored, halves)
    else:
        gate_w, up_w = (linear_weight(layer.get_submodule(n)) for n in (arch.gate, arch.up))  # type: ignore[arg-type]
        fused = concat_rows([gate_w, up_w]) if opts.target == "ort" else None
        if fused is not None:
            return _split_pair(b, linear(b, h, fused, name, opts), [gate_w.n, up_w.n])
    return linear(b, h, gate_w, f"layers.{i}.gate_proj", opts), linear(b, h, up_w, f"layers.{i}.up_proj", opts)


def _split_pair(b: Builder, x: str, sizes: list[int]) -> tuple[str, str]:
    first, second = b.op("Split", [x, b.ints(sizes)], n_out=2, axis=-1)
    return first, second


def _layer_attention(model: PreTrainedModel, d: Dims, b: Builder) -> list[LayerAttention]:
    """Per layer: rotary cache names (one pair per layer type when the family has several), window, scale and
    soft-cap (the q/k norm weights are read with the layer's other weights, ``_qk_norms``)."""
    arch, c = layout_of(model), model.config
    types = layer_types(c)
    caches: dict[str | None, tuple[str, str, int]] = {}
    for lt in dict.fromkeys(types) if arch.rotary_by_layer_type else [None]:
        cos_np, sin_np = rotary_caches(model, d, lt)
        suffix = "" if lt is None else f".{lt}"
        caches[lt] = (b.fconst(f"cos_cache{suffix}", cos_np), b.fconst(f"sin_cache{suffix}", sin_np),
                      2 * cos_np.shape[1])
    out = []
    for lt, window, rotary in zip(types, sliding_windows(c), rotary_layers(c), strict=True):
        cos, sin, rotary_dim = caches[lt if arch.rotary_by_layer_type else None] if rotary else ("", "", 0)
        out.append(LayerAttention(cos, sin, rotary_dim, window, attention_scale(c, d.head_dim),
                                  attention_softcap(c), None))
    return out


def _qk_norms(layer: torch.nn.Module, arch: Architecture, la: LayerAttention) -> LayerAttention:
    if not (arch.q_norm and arch.k_norm):
        return la
    norms = (_norm_weight(layer.get_submodule(arch.q_norm), arch), _norm_weight(layer.get_submodule(arch.k_norm), arch))
    return replace(la, qk_norms=norms)


def _io(d: Dims, names: TensorNames, opts: GraphOptions) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    float_type = opts.float_type
    kv_in = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
    kv_out = ["batch_size", d.kv_heads, "present_sequence_length", d.head_dim]
    if opts.target == "standard":  # present is past with the new columns scattered in: one fixed capacity
        kv_in = kv_out = ["batch_size", d.kv_heads, "cache_capacity", d.head_dim]
    inputs = [
        helper.make_tensor_value_info(names.input_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(names.attention_mask, TensorProto.INT64, ["batch_size", "mask_length"]),
        helper.make_tensor_value_info(names.position_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(names.logits, TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kv in KINDS:
            inputs.append(helper.make_tensor_value_info(names.past(i, kv), float_type, kv_in))
            outputs.append(helper.make_tensor_value_info(names.present(i, kv), float_type, kv_out))
    return inputs, outputs


def in_memory(prefixes: list[str]) -> AbstractContextManager[object]:
    """Every module of an in-memory model is always resident."""
    return nullcontext()


def build_model(model: PreTrainedModel, opts: GraphOptions, names: TensorNames,
                store: Store | None = None, resident: Resident = in_memory) -> onnx.ModelProto:
    """The whole decoder as one ONNX model, written part by part: the embedding, each decoder layer, the final
    norm and head. ``resident(prefixes)`` holds those modules' weights while their part is written (a streamed
    source loads and frees them); ``store`` takes each initializer as it is made (``ExternalData``: its
    bytes go to the data file; default: inline)."""
    if not names.position_ids:
        raise ToolkitError("the exporter's graphs take position ids: give TensorNames a position_ids name")
    arch, d = layout_of(model), dims_of(model, opts.max_positions)
    b = Builder(store, np.float16 if opts.dtype == "float16" else np.float32)
    attn_of = _layer_attention(model, d, b)
    act = activation(model.config)
    m = mask_values(b, opts, names)
    attention = _attention_ort if opts.target == "ort" else _attention_standard
    with resident([arch.embed, arch.head] if reads_head(model, arch.head) else [arch.embed]):
        residual = embed(b, names.input_ids, model, arch.head, opts)
    scale = embed_multiplier(model.config)
    if scale is not None:  # Gemma: x sqrt(hidden), Granite: x embedding_multiplier (float32, as the model rounds it)
        residual = b.one("Mul", [residual, b.fconst("embed.scale", np.float32(scale))])
    r = residual_multiplier(model.config)
    rescale = (lambda x: x) if r is None else (  # Granite: residual + r * sublayer(x)
        lambda x: b.one("Mul", [x, b.fconst("residual.multiplier", np.float32(r))]))
    delta: str | None = None
    for i in range(d.layers):
        with resident([f"{arch.layers}.{i}"]):
            layer = decoder_layers(model)[i]
            la = _qk_norms(layer, arch, attn_of[i])
            h, residual = _pre_norm(b, delta, residual, layer, arch.input_norm, arch, f"layers.{i}.input_norm", d, opts)
            delta = linear(b, attention(b, h, i, layer, m, arch, la, d, opts, names),
                           linear_weight(layer.get_submodule(arch.o)), f"layers.{i}.o_proj", opts)
            delta = rescale(_sandwich(b, delta, layer, arch.attn_out_norm, arch, f"layers.{i}.attn_out_norm", d))
            h, residual = _pre_norm(b, delta, residual, layer, arch.mlp_norm, arch,
                                    f"layers.{i}.post_attention_norm", d, opts)
            gate, up = _gate_up(b, h, layer, arch, i, opts)
            hidden = b.one("Mul", [_activation(b, gate, act), up])
            delta = linear(b, hidden, linear_weight(layer.get_submodule(arch.down)), f"layers.{i}.down_proj", opts)
            delta = rescale(_sandwich(b, delta, layer, arch.mlp_out_norm, arch, f"layers.{i}.mlp_out_norm", d))
    with resident([arch.final_norm, arch.head]):
        h, _ = _norm(b, delta, residual, _norm_weight(model.get_submodule(arch.final_norm), arch), "final_norm",
                     d, opts)
        logits = head_linear(b, h, model, arch.head, opts)
    return _finish(b, logits, model, d, opts, names)


def _finish(b: Builder, logits: str, model: PreTrainedModel, d: Dims, opts: GraphOptions,
            names: TensorNames) -> onnx.ModelProto:
    """Granite's divisor and Gemma 2's soft-cap on the logits, then the graph's inputs, outputs and opsets."""
    divisor = logits_divisor(model.config)
    if divisor is not None:
        logits = b.one("Div", [logits, b.fconst("logits.divisor", np.float32(divisor))])
    cap = final_softcap(model.config)
    if cap:
        logits = _softcap(b, logits, cap, "logits")
    if opts.float_type != TensorProto.FLOAT:  # logits in float32: what runtimes sample from and compare
        logits = b.one("Cast", [logits], to=TensorProto.FLOAT)
    # the last node writes the output itself: an Identity to the output's name copies [B, S, V] every step
    producer = next(n for n in reversed(b.nodes) if logits in n.output)
    producer.output[list(producer.output).index(logits)] = names.logits
    inputs, outputs = _io(d, names, opts)
    if names.next_token:  # greedy decoding reads B ids instead of copying and scanning [B, V] floats
        b.nodes.append(next_token_node(names.logits, names.next_token, "next_token_out"))
        outputs.insert(1, helper.make_tensor_value_info(names.next_token, TensorProto.INT64,
                                                        ["batch_size", "sequence_length"]))
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", opts.opset)] + ([helper.make_opsetid(MS, 1)] if opts.target == "ort" else [])
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="llm-toolkit")
    proto.ir_version = IR_VERSION
    return proto
