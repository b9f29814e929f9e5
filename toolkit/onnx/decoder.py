"""The decoder graph: attention-mask arithmetic, rotary caches, decoder layers; tensor names from the contract.

What a runtime feeds (both targets; ``P`` cached columns, ``S`` new tokens, rows left-padded; the names are
``TensorNames`` of ``toolkit.runtime.contract``):
- input ids ``[B,S] int64``; position ids ``[B,S] int64`` = ``cumsum(attention_mask) - 1`` at the new columns
  (read by the standard target's RotaryEmbedding; the ort graph ignores it, see below);
- attention mask ``[B,M] int64``: 1 for real tokens, 0 for left padding, one column per cache column.
  Without buffer sharing ``M = P+S`` and each layer's past key and value are ``[B,KVH,P,D]`` (P=0 for the
  prefill: a zero-length tensor); its present key and value come back as ``[B,KVH,P+S,D]``.
- ort target, shared buffer (onnxruntime-genai's ``past_present_share_buffer``): bind the SAME preallocated
  ``[B,KVH,C,D]`` OrtValue as a layer's past key and its present key (likewise value) through IO
  binding; GroupQueryAttention sees equal pointers and writes the S new rows in place at columns ``[P, P+S)``.
  The mask is then either ``[B, P+S]`` or ``[B, C]`` with zeros after column ``P+S-1``; both work, because the
  graph derives everything from the index of the last 1, per row. Rows may have different lengths (each
  written from column 0, its mask ``1`` up to its own last column): the runtime decodes ragged batches this
  way. Requirements: ``P+S <= C <= max_positions``, and a step with ``S > 1`` after the prefill needs
  ``B = 1`` (GroupQueryAttention's rule for chunked prompts).
The standard target has no buffer sharing: feed ``present`` back as ``past``.

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

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import DecoderLayout, decoder_layers, layout_of
from toolkit.onnx.graph import (
    IR_VERSION,
    MASK_NEG,
    MS,
    Builder,
    Dims,
    GraphOptions,
    arch_graph,
    dims_of,
    embed,
    head_linear,
    linear,
)
from toolkit.onnx.weights import concat_rows, linear_weight
from toolkit.runtime.contract import KINDS, TensorNames


@dataclass
class MaskValues:
    seqlens_k: str  # int32 [B]: columns in use after this step, minus one
    total: str  # int32 scalar T
    bias: str  # ort: float [B,1,S,T] additive or "" (right padding only); standard: bool [B,1,S,T] (True = attend)


def _activation(b: Builder, x: str, kind: str) -> str:
    if kind == "silu":
        return b.one("Mul", [x, b.one("Sigmoid", [x])])
    raise ValueError(f"activation {kind} has no graph form")


def rotary_caches(model: PreTrainedModel, dims: Dims) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin [max_positions, rotary_dim/2]`` from the model's own rotary module (its scaling included)."""
    rot = model.get_submodule(arch_graph(model).rotary)
    pos = torch.arange(dims.max_positions).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)  # [1, P, D]; HF duplicates the two halves
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def mask_values(b: Builder, opts: GraphOptions, names: TensorNames) -> MaskValues:
    mask = names.attention_mask
    one = b.const("one_i64", np.array(1, np.int64))
    width = b.one("Squeeze", [b.one("Shape", [mask], start=1, end=2)])
    col1 = b.one("Range", [one, b.one("Add", [width, one]), one])  # [M]: 1..M
    last = b.one("ReduceMax", [b.one("Mul", [mask, col1]), b.ints([1])], keepdims=0)  # [B]
    total = b.one("ReduceMax", [last], keepdims=0)  # scalar T
    seqlens_k = b.one("Cast", [b.one("Sub", [last, one])], to=TensorProto.INT32)
    if opts.target == "ort" and not opts.left_padding:  # GQA masks by seqlens_k: right-padded rows need nothing more
        return MaskValues(seqlens_k, b.one("Cast", [total], to=TensorProto.INT32), "")
    zero = b.const("zero_i64", np.array(0, np.int64))
    new = b.one("Squeeze", [b.one("Shape", [names.input_ids], start=1, end=2)])
    visible = b.one("Slice", [mask, b.ints([0]), b.one("Unsqueeze", [total, b.ints([0])]), b.ints([1])])
    visible = b.one("Unsqueeze", [b.one("Cast", [visible], to=TensorProto.BOOL), b.ints([1, 2])])  # [B,1,1,T]
    # Each row's queries sit at its own last columns (last[b]-S .. last[b]-1): rows of different lengths
    # share one cache buffer, each written from column 0, so the query column is per row, not T-S.
    offsets = b.one("Range", [zero, new, one])  # [S]
    start = b.one("Unsqueeze", [b.one("Sub", [last, new]), b.ints([1])])  # [B,1]
    q_col = b.one("Unsqueeze", [b.one("Add", [start, offsets]), b.ints([1, 3])])  # [B,1,S,1]
    k_col = b.one("Unsqueeze", [b.one("Range", [zero, total, one]), b.ints([0])])  # [1,T]
    allowed = b.one("Or", [visible, b.one("Equal", [q_col, k_col])])  # [B,1,S,T]
    if opts.target == "ort":  # GroupQueryAttention applies the causal part itself
        bias = b.one("Where", [allowed, b.const("zero_f", np.array(0, np.float32)),
                               b.const("mask_neg", np.array(MASK_NEG, np.float32))])
    else:
        bias = b.one("And", [allowed, b.one("LessOrEqual", [k_col, q_col])])
    return MaskValues(seqlens_k, b.one("Cast", [total], to=TensorProto.INT32), bias)


def _attention_ort(b: Builder, h: str, i: int, layer: torch.nn.Module, m: MaskValues,
                   d: Dims, modules: dict[str, str], names: TensorNames, opts: GraphOptions) -> str:
    parts = [linear_weight(layer.get_submodule(modules[r])) for r in ("q", "k", "v")]
    fused = concat_rows(parts)
    if fused is not None:  # one MatMulNBits for q,k,v; GQA takes the packed [B,S,(H+2KVH)*D] input
        qkv = [linear(b, h, fused, f"layers.{i}.qkv_proj", opts), "", ""]
    else:
        qkv = [linear(b, h, w, f"layers.{i}.{r}_proj", opts) for w, r in zip(parts, "qkv", strict=True)]
    past = [names.past(i, kind) for kind in KINDS]
    present = [names.present(i, kind) for kind in KINDS]
    out = b.op("GroupQueryAttention", [*qkv, *past, m.seqlens_k, m.total, "cos_cache", "sin_cache", "", m.bias],
               domain=MS, outs=[b.fresh("attn"), *present], num_heads=d.heads, kv_num_heads=d.kv_heads,
               do_rotary=1, rotary_interleaved=0)
    return out[0]


def _attention_standard(b: Builder, h: str, i: int, layer: torch.nn.Module, m: MaskValues,
                        d: Dims, modules: dict[str, str], names: TensorNames, opts: GraphOptions) -> str:
    q, k, v = (linear(b, h, linear_weight(layer.get_submodule(modules[r])), f"layers.{i}.{r}_proj", opts)
               for r in ("q", "k", "v"))
    q = b.one("RotaryEmbedding", [q, "cos_cache", "sin_cache", names.position_ids], num_heads=d.heads)
    k = b.one("RotaryEmbedding", [k, "cos_cache", "sin_cache", names.position_ids], num_heads=d.kv_heads)
    past = [names.past(i, kind) for kind in KINDS]
    present = [names.present(i, kind) for kind in KINDS]
    out = b.op("Attention", [q, k, v, m.bias, *past], outs=[b.fresh("attn"), *present],
               q_num_heads=d.heads, kv_num_heads=d.kv_heads, is_causal=0)
    return out[0]


def _norm(b: Builder, delta: str | None, residual: str, weight: np.ndarray, name: str,
          d: Dims, opts: GraphOptions) -> tuple[str, str]:
    """RMSNorm of ``residual + delta`` -> (normed, new residual); ort fuses the add into SkipSimplifiedLayerNorm.

    The first norm has no add: standard RMSNormalization (onnx's checker rejects the contrib
    SimplifiedLayerNormalization, which onnxruntime registers in the default domain)."""
    w = b.const(f"{name}.weight", weight)
    if opts.target == "ort" and delta is not None:  # outputs: normed, (mean, inv_std: unused), residual + delta
        normed, total = b.fresh("norm"), b.fresh("residual")
        b.op("SkipSimplifiedLayerNormalization", [delta, residual, w], domain=MS, outs=[normed, "", "", total],
             epsilon=d.eps)
        return normed, total
    if delta is not None:
        residual = b.one("Add", [residual, delta])
    return b.one("RMSNormalization", [residual, w], epsilon=d.eps, axis=-1), residual


def _gate_up(b: Builder, h: str, layer: torch.nn.Module, layout: DecoderLayout, i: int,
             opts: GraphOptions) -> tuple[str, str]:
    """Gate and up projections read the same input: one MatMulNBits of both (ort), then a Split."""
    gate_w, up_w = (linear_weight(layer.get_submodule(n)) for n in (layout.gate, layout.up))
    fused = concat_rows([gate_w, up_w]) if opts.target == "ort" else None
    if fused is None:
        return (linear(b, h, gate_w, f"layers.{i}.gate_proj", opts), linear(b, h, up_w, f"layers.{i}.up_proj", opts))
    both = linear(b, h, fused, f"layers.{i}.gate_up_proj", opts)
    gate, up = b.op("Split", [both, b.ints([gate_w.n, up_w.n])], n_out=2, axis=-1)
    return gate, up


def _io(d: Dims, names: TensorNames) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    kv_in = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
    kv_out = ["batch_size", d.kv_heads, "present_sequence_length", d.head_dim]
    inputs = [
        helper.make_tensor_value_info(names.input_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(names.attention_mask, TensorProto.INT64, ["batch_size", "mask_length"]),
        helper.make_tensor_value_info(names.position_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(names.logits, TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kind in KINDS:
            inputs.append(helper.make_tensor_value_info(names.past(i, kind), TensorProto.FLOAT, kv_in))
            outputs.append(helper.make_tensor_value_info(names.present(i, kind), TensorProto.FLOAT, kv_out))
    return inputs, outputs


def build_model(model: PreTrainedModel, opts: GraphOptions, names: TensorNames) -> onnx.ModelProto:
    """The whole decoder as one ONNX model (initializers inline; the caller saves them as external data)."""
    if not names.position_ids:
        raise ToolkitError("the exporter's graphs take position ids: give TensorNames a position_ids name")
    layout, arch, d = layout_of(model), arch_graph(model), dims_of(model, opts.max_positions)
    modules = {"q": layout.q, "k": layout.k, "v": layout.v}
    b = Builder()
    cos, sin = rotary_caches(model, d)
    b.const("cos_cache", cos)
    b.const("sin_cache", sin)
    m = mask_values(b, opts, names)
    attention = _attention_ort if opts.target == "ort" else _attention_standard
    residual = embed(b, names.input_ids, model, layout.head, opts)
    delta: str | None = None
    for i, layer in enumerate(decoder_layers(model)):
        norm_in = layer.get_submodule(layout.input_norm).weight.detach().float().numpy()
        h, residual = _norm(b, delta, residual, norm_in, f"layers.{i}.input_norm", d, opts)
        delta = linear(b, attention(b, h, i, layer, m, d, modules, names, opts),
                       linear_weight(layer.get_submodule(layout.o)), f"layers.{i}.o_proj", opts)
        norm_post = layer.get_submodule(layout.post_attention_norm).weight.detach().float().numpy()
        h, residual = _norm(b, delta, residual, norm_post, f"layers.{i}.post_attention_norm", d, opts)
        gate, up = _gate_up(b, h, layer, layout, i, opts)
        act = b.one("Mul", [_activation(b, gate, arch.activation), up])
        delta = linear(b, act, linear_weight(layer.get_submodule(layout.down)), f"layers.{i}.down_proj", opts)
    final = model.get_submodule(layout.final_norm).weight.detach().float().numpy()
    h, _ = _norm(b, delta, residual, final, "final_norm", d, opts)
    logits = head_linear(b, h, model, layout.head, opts)
    b.nodes.append(helper.make_node("Identity", [logits], [names.logits], name="logits_out"))
    inputs, outputs = _io(d, names)
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", opts.opset), helper.make_opsetid(MS, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="llm-toolkit")
    proto.ir_version = IR_VERSION
    return proto
