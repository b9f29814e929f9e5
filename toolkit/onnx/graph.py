"""Building a decoder-only LLM as one ONNX graph with a KV cache, written node by node with ``onnx.helper``.

Interface (the Optimum / onnxruntime-genai convention, names from ``toolkit.runtime.contract.TensorNames``;
``P`` past length, ``S`` new tokens): inputs ids ``[B,S] int64``, attention mask ``[B,P+S] int64``, position ids
``[B,S] int64``, each layer's past key and value ``[B,KVH,P,D] float32``; outputs logits ``[B,S,V]`` and each
layer's present key and value.

Two targets:
- ``ort``: onnxruntime contrib ops (GroupQueryAttention with fused rotary, MatMulNBits carrying our exact codes,
  GatherBlockQuantized for a tied quantized embedding, (Skip)SimplifiedLayerNormalization).
- ``standard``: ONNX opset 24 ops that TensorRT's ONNX parser reads (``toolkit.onnx.tensorrt``): Attention without
  past inputs, TensorScatter for the cache, RotaryEmbedding, RMSNormalization, blocked int4 / int8
  DequantizeLinear of signed codes without zero points (symmetric weights only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import check_rope, layout_of, rope_parameters
from toolkit.onnx.external import ExternalData, InlineData
from toolkit.onnx.weights import LinearWeight, embedding_source, linear_weight, nibble_planes, row_blocks
from toolkit.quant.formats import DequantizeLinear, MatMulNBits
from toolkit.quant.modules import reads_head

Store = ExternalData | InlineData  # where initializers' bytes go
TABLE_BLOCK = 1 << 24  # embedding-table values converted and written at a time (64 MB in float32)
PACKED_BLOCK = 1 << 26  # packed weight bytes written at a time
NARROW = {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16}  # stored as they are
MS = "com.microsoft"
IR_VERSION = 10  # the newest IR onnxruntime 1.31 loads
MASK_NEG = -1e9  # additive bias of masked keys: finite, so a fully masked row cannot turn into NaN


@dataclass(frozen=True)
class GraphOptions:
    target: str  # "ort" | "standard"
    opset: int
    accuracy_level: int  # MatMulNBits: 4 quantizes activations to int8 per block; 0-3 keep them float

    @property
    def split_int8(self) -> bool:
        """Float activations: 8-bit weights run as two exact 4-bit planes (see ``nibble_planes``)."""
        return self.target == "ort" and self.accuracy_level < 4
    max_positions: int = 0  # rotary cache rows (longest context); 0: the model's max_position_embeddings
    left_padding: bool = True  # ort: an attention bias masks left-pad columns (GQA alone handles right padding)
    dtype: str = "float32"  # float weights, activations and KV cache: "float32" or "float16" (logits stay float32)

    @property
    def float_type(self) -> int:
        return TensorProto.FLOAT16 if self.dtype == "float16" else TensorProto.FLOAT


@dataclass(frozen=True)
class Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int
    eps: float


def dims_of(model: PreTrainedModel, max_positions: int = 0) -> Dims:
    c = model.config
    layout_of(model)  # raises the supported-architecture error first
    check_rope(c)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    longest = c.max_position_embeddings
    if rope_parameters(c).get("rope_type") == "longrope":
        # longrope switches every position to its long factors once a sequence passes the original context;
        # one static cache holds the short factors, so the export serves up to that length
        longest = int(rope_parameters(c).get("original_max_position_embeddings") or c.original_max_position_embeddings)
    positions = min(max_positions, longest) if max_positions else longest
    return Dims(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", heads), head_dim, c.hidden_size,
                c.vocab_size, positions, float(c.rms_norm_eps))


class Builder:
    """Collects nodes and initializers; every value gets a unique name. Each initializer passes through
    ``store`` as it is made (``ExternalData`` writes its bytes out; default: ``InlineData``, kept in the proto)."""

    def __init__(self, store: Store | None = None, float_dtype: type[np.floating] = np.float32) -> None:
        self.store = store or InlineData()
        self.float_dtype = float_dtype  # of every float initializer (weights, norms, caches, scalars)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0
        self.names: set[str] = set()
        self.memo: dict[str, str] = {}  # values computed once and shared (cast scales of a tied head)

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer; a name already present is shared (tied weights are stored once)."""
        if name not in self.names:
            self.names.add(name)
            self.inits.append(self.store.move(numpy_helper.from_array(np.ascontiguousarray(value), name)))
        return name

    def fconst(self, name: str, value: np.ndarray | np.floating | float) -> str:
        """A float initializer in the graph's float dtype."""
        return self.const(name, np.asarray(value, self.float_dtype))

    def raw(self, name: str, dtype: int, dims: tuple[int, ...], data: bytes) -> str:
        if name not in self.names:
            self.names.add(name)
            self.inits.append(self.store.move(helper.make_tensor(name, dtype, dims, data, raw=True)))
        return name

    def rows(self, name: str, dtype: int, dims: list[int], blocks: Iterable[np.ndarray]) -> str:
        """An initializer written from consecutive row blocks (never whole in memory with ``ExternalData``)."""
        if name not in self.names:
            self.names.add(name)
            self.inits.append(self.store.rows(name, dtype, dims, blocks))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "",
           outs: list[str] | None = None, **attrs: object) -> list[str]:
        stem = name or op_type.lower()
        outs = outs or [self.fresh(stem) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(stem), domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **kw: object) -> str:
        return self.op(op_type, inputs, **kw)[0]  # type: ignore[arg-type]

    def ints(self, values: list[int]) -> str:
        return self.const(self.fresh("i64"), np.array(values, dtype=np.int64))


# ---------------------------------------------------------------- linears

def _require_block(group: int, what: str) -> None:
    if group < 16 or group & (group - 1):
        raise ToolkitError(
            f"{what}: group size {group} cannot be a MatMulNBits/GatherBlockQuantized block (needs a power of two "
            ">= 16); quantize with group_size 16, 32, 64 or 128, or export with target: standard"
        )


def linear(b: Builder, x: str, w: LinearWeight, name: str, opts: GraphOptions) -> str:
    """``x [.., K] -> [.., N]``: MatMul on float weights, MatMulNBits (ort) or DequantizeLinear+MatMul (standard);
    a linear that quantizes its inputs runs as ``w8a8_linear``."""
    if w.act is not None:
        return w8a8_linear(b, x, w, name)
    if not w.quantized:
        y = b.one("MatMul", [x, b.fconst(f"{name}.weight_t", w.weight.T)])  # type: ignore[union-attr]
    elif opts.target == "ort":
        return _matmul_nbits(b, x, w, name, opts)
    else:
        y = b.one("MatMul", [x, _dequantize_t(b, w, name)])
    return y if w.bias is None else b.one("Add", [y, b.fconst(f"{name}.bias", w.bias)])


def _matmul_nbits(b: Builder, x: str, w: LinearWeight, name: str, opts: GraphOptions) -> str:
    w = row_blocks(w)
    _require_block(w.group, name)
    if w.bits == 8 and opts.split_int8:
        hi, lo = nibble_planes(w)
        return b.one("Add", [_matmul_nbits(b, x, hi, f"{name}.hi", opts), _matmul_nbits(b, x, lo, f"{name}.lo", opts)])
    bits = MatMulNBits.storage_bits(w.bits)
    inputs = [x, _nbits_weight(b, w, name), _nbits_scales(b, w, name)]
    zeros = torch.from_numpy(w.zeros)  # type: ignore[arg-type]
    if bool((zeros != 2 ** (bits - 1)).any()):  # MatMulNBits' default zero point is 2^(bits-1)
        inputs.append(b.const(f"{name}.zero_points", MatMulNBits.zero_points(zeros, bits).numpy()))
    if w.bias is not None:
        inputs += [""] * (5 - len(inputs)) + [b.fconst(f"{name}.bias", w.bias)]
    return b.one("MatMulNBits", inputs, domain=MS, K=w.k, N=w.n, bits=bits, block_size=w.group,
                 accuracy_level=opts.accuracy_level)


def w8a8_linear(b: Builder, x: str, w: LinearWeight, name: str) -> str:
    """``x [.., K] -> [.., N]`` with int8 inputs and int8 per-channel symmetric weights, as the PyTorch model
    computes it (``fake_quantize_activations``): ``s_x`` = max|x| / 127 per token (or the calibrated per-tensor
    scale), ``q_x`` = clip(round_half_even(x / s_x), -128, 127); MatMulInteger (int8 x int8, exact int32 sums),
    then one float multiply by ``s_x`` and the weight scales ``s_w [N]`` (onnxruntime fuses the chain into
    MatMulIntegerToFloat; ``benchmarks/w8a8_matmul_ab.py``). Against PyTorch's float product of the dequantized
    values only float32 rounding differs, plus an activation code where x lands on a rounding midpoint."""
    if w.act is None or w.act.type != "int" or w.bits != 8 or w.group != w.k:
        raise ToolkitError(f"{name}: the W8A8 ONNX linear takes int8 activations and int8 per-channel weights "
                           "(group_size: -1); quantize with that scheme, or drop input_activations")
    if w.act.dynamic:
        absmax = b.one("ReduceMax", [b.one("Abs", [x]), b.ints([-1])], keepdims=1)  # [.., 1]
        positive = b.one("Greater", [absmax, _scalar(b, "w8a8.zero", 0)])
        # an all-zero row keeps scale 1 (activation_scale): its codes are 0 either way, and nothing divides by 0
        scale = b.one("Where", [positive, b.one("Div", [absmax, _scalar(b, "w8a8.int8_max", 127)]),
                                _scalar(b, "w8a8.one", 1)])
    else:
        scale = b.const(f"{name}.input_scale", np.array(w.input_scale, np.float32))
    # q_x + 128 as uint8 with zero point 128: the same integers, in the u8 x s8 form MLAS has fast kernels for
    # (int8 x int8 MatMulInteger ran ~5x slower than a float MatMul in one A/B run on the 2-core machine)
    shifted = b.one("Add", [b.one("Round", [b.one("Div", [x, scale])]), _scalar(b, "w8a8.offset", 128)])
    codes = b.one("Clip", [shifted, _scalar(b, "w8a8.u8_min", 0), _scalar(b, "w8a8.u8_max", 255)])
    acc = b.one("MatMulInteger", [b.one("Cast", [codes], to=TensorProto.UINT8),
                                  _signed_codes(b, f"{name}.qweight_t", _symmetric_codes(w, name).t(), 8),
                                  _scalar(b, "w8a8.zero_point", 128, np.uint8)])  # int32 [.., N]
    weight_scales = b.const(f"{name}.weight_scales", w.scales[:, 0].astype(np.float32))  # type: ignore[index]
    # onnxruntime fuses MatMulInteger -> Cast -> Mul(s_x * s_w) into MatMulIntegerToFloat (one factor: as
    # (acc * s_w) * s_x it fuses nothing). It fuses a following bias Add too, and with a per-token s_x the fused
    # node then computes wrong values (onnxruntime 1.32; tests/onnx/test_export_w8a8.py): the bias goes in with Sum,
    # which that fusion does not match
    y = b.one("Mul", [b.one("Cast", [acc], to=TensorProto.FLOAT), b.one("Mul", [scale, weight_scales])])
    return y if w.bias is None else b.one("Sum", [y, b.const(f"{name}.bias", w.bias.astype(np.float32))])


def _scalar(b: Builder, name: str, value: float, dtype: type[np.generic] = np.float32) -> str:
    return b.const(name, np.array(value, dtype))


def _nbits_weight(b: Builder, w: LinearWeight, name: str) -> str:
    """MatMulNBits' ``B [N, K/block, block*bits/8]``: the bytes of ``qweight`` as they are (``MatMulNBits``
    packs along K the same way), written in row blocks of ``PACKED_BLOCK`` bytes."""
    qweight: torch.Tensor = w.qweight  # type: ignore[assignment]
    step = max(1, PACKED_BLOCK // qweight.shape[1])
    blocks = (qweight[r : r + step].contiguous().numpy() for r in range(0, w.n, step))
    dims = [w.n, w.k // w.group, MatMulNBits.row_bytes(w.bits, w.group)]
    return b.rows(f"{name}.qweight", TensorProto.UINT8, dims, blocks)


def _nbits_scales(b: Builder, w: LinearWeight, name: str) -> str:
    """Scales stored as the float16 our QuantLinear holds (exact); a float32 graph casts them once (folded at load)."""
    key = f"{name}.scales"
    if key not in b.memo:
        stored = b.const(key, w.scales.astype(np.float16))  # type: ignore[union-attr]
        b.memo[key] = stored if b.float_dtype == np.float16 else b.one("Cast", [stored], to=TensorProto.FLOAT)
    return b.memo[key]


def _symmetric_codes(w: LinearWeight, name: str) -> torch.Tensor:
    """The codes ``[N, K]`` of a symmetric weight (every zero point ``2^(bits-1)``): the standard target stores
    ``q - 2^(bits-1)`` and no zero point, the only DequantizeLinear TensorRT's ONNX parser accepts."""
    if bool((w.zeros != 2 ** (w.bits - 1)).any()):  # type: ignore[operator]
        raise ToolkitError(f"{name}: the standard ONNX target holds symmetric codes only (TensorRT's parser takes "
                           "DequantizeLinear without zero points) and this weight has its own zero points: quantize "
                           "with symmetric: true, or export with target: ort")
    return w.codes  # type: ignore[return-value]


def _signed_codes(b: Builder, name: str, codes: torch.Tensor, bits: int) -> str:
    """Symmetric codes ``[R, C]`` as an ``int4`` (<= 4 bits) or ``int8`` initializer of ``q - 2^(bits-1)``."""
    raw = DequantizeLinear.signed_raw(codes, bits)
    if bits == 8:
        return b.const(name, raw.numpy())
    return b.raw(name, TensorProto.INT4, tuple(codes.shape), raw.numpy().tobytes())


def _dequantize_t(b: Builder, w: LinearWeight, name: str) -> str:
    """Blocked DequantizeLinear of ``Wᵀ [K, N]`` along axis 0 (the DQ->MatMul pattern onnxruntime fuses)."""
    q = _signed_codes(b, f"{name}.qweight_t", _symmetric_codes(w, name).t(), w.bits)
    s = b.fconst(f"{name}.scales_t", w.scales.T)  # type: ignore[union-attr]
    return b.one("DequantizeLinear", [q, s], axis=0, block_size=w.group)


# ---------------------------------------------------------------- embedding / head

def embed(b: Builder, ids: str, model: PreTrainedModel, head: str, opts: GraphOptions) -> str:
    """``input_ids [B,S] -> [B,S,H]``; a tied quantized embedding reads the head's bytes (stored once)."""
    src = embedding_source(model, head)
    if isinstance(src, torch.Tensor):
        return _gather_table(b, ids, src)
    w = src
    if not w.quantized:
        return b.one("Gather", [_float_rows(b, w, head), ids])
    if opts.target != "ort":
        return b.one("Gather", [_dequantized_table(b, w, head), ids])
    if w.bits == 8 and opts.split_int8:  # the head is stored as two 4-bit planes: gather both and add (exact)
        hi, lo = nibble_planes(w)
        return b.one("Add", [_gather_block_quantized(b, ids, hi, f"{head}.hi"),
                             _gather_block_quantized(b, ids, lo, f"{head}.lo", zero_points=True)])
    return _gather_block_quantized(b, ids, w, head)


def _gather_table(b: Builder, ids: str, table: torch.Tensor) -> str:
    """Rows of an untied embedding table ``[V, H]``, written to the data file in blocks of ``TABLE_BLOCK`` values:
    the exporter holds one block, never the table in float32. A bf16 or float16 table under a float32 graph is
    stored as it is and the gathered rows are cast to float32 (exact, the values a float32 copy holds, in half
    the bytes); any other table is stored in the graph's float dtype."""
    narrow = NARROW.get(table.dtype) if b.float_dtype == np.float32 else None
    step = max(1, TABLE_BLOCK // table.shape[1])
    starts = range(0, table.shape[0], step)
    if narrow is not None:
        blocks = (table[r : r + step].contiguous().view(torch.uint8).numpy() for r in starts)
        rows = b.one("Gather", [b.rows("embed.weight", narrow, list(table.shape), blocks), ids])
        return b.one("Cast", [rows], to=TensorProto.FLOAT)
    float_type = TensorProto.FLOAT16 if b.float_dtype == np.float16 else TensorProto.FLOAT
    blocks = (table[r : r + step].float().numpy().astype(b.float_dtype) for r in starts)
    return b.one("Gather", [b.rows("embed.weight", float_type, list(table.shape), blocks), ids])


def _float_rows(b: Builder, w: LinearWeight, head: str) -> str:
    """``W [V, H]`` as the Transpose of the head's ``Wᵀ`` initializer (folded by onnxruntime at load)."""
    return b.one("Transpose", [b.fconst(f"{head}.weight_t", w.weight.T)], perm=[1, 0])  # type: ignore[union-attr]


def _gather_block_quantized(b: Builder, ids: str, w: LinearWeight, head: str, zero_points: bool = False) -> str:
    """Rows of the head's MatMulNBits bytes, with its zero points when they are not the default 2^(bits-1)
    (always for ``zero_points``: a nibble plane's)."""
    w = row_blocks(w)
    _require_block(w.group, "tied embedding")
    bits = MatMulNBits.storage_bits(w.bits)
    zero_points = zero_points or bool((torch.from_numpy(w.zeros) != 2 ** (bits - 1)).any())  # type: ignore[arg-type]
    data = _nbits_weight(b, w, head)  # [V, G, g*bits/8]: the head's MatMulNBits B, shared
    # GatherBlockQuantized wants scales and zero points (one a byte, even at 4 bits: checked against
    # onnxruntime 1.31, packed ones fail its shape inference) of data's rank: [V, G, 1]
    shape = [w.n, w.k // w.group, 1]
    inputs = [data, ids, b.one("Reshape", [_nbits_scales(b, w, head), b.ints(shape)])]
    if zero_points:
        inputs.append(b.const(f"{head}.zero_points_rows", w.zeros.reshape(shape)))  # type: ignore[union-attr]
    rows = b.one("GatherBlockQuantized", inputs, domain=MS, bits=bits, block_size=w.group,
                 quantize_axis=2, gather_axis=0)  # [B, S, G, g]
    return b.one("Reshape", [rows, b.ints([0, 0, w.k])])


def _dequantized_table(b: Builder, w: LinearWeight, head: str) -> str:
    """A tied quantized table ``W [V, H]`` dequantized once from row-major codes (standard): the embedding
    gathers its rows and the head multiplies by its transpose (TensorRT's Gather takes no int8 or int4 data)."""
    key = f"{head}.dequantized"
    if key not in b.memo:
        q = _signed_codes(b, f"{head}.codes_rows", _symmetric_codes(w, head), w.bits)
        s = b.fconst(f"{head}.scales_rows", w.scales)  # type: ignore[arg-type]
        b.memo[key] = b.one("DequantizeLinear", [q, s], axis=1, block_size=w.group)
    return b.memo[key]


def head_linear(b: Builder, x: str, model: PreTrainedModel, head: str, opts: GraphOptions) -> str:
    w = linear_weight(model.get_submodule(head))
    if opts.target == "standard" and w.quantized and reads_head(model, head):
        # the table the embedding gathers from serves the head too: multiply by its ᵀ
        return b.one("MatMul", [x, b.one("Transpose", [_dequantized_table(b, w, head)], perm=[1, 0])])
    return linear(b, x, w, head, opts)
