"""What TensorRT's ONNX parser (10.15, onnx-tensorrt ``docs/operators.md``) accepts, checked on a graph.

The standard target is meant to be parsed by TensorRT; nothing here runs it (no TensorRT on these machines), so
the exporter checks its graph against the parser's documented support matrix instead: every node's op is one
the matrix lists as supported, in the default domain, at an opset the parser reads, and the restrictions the
matrix states for the ops we use hold. ``PARSER_OPS`` holds the subset of the matrix the target may use, with
the documented restriction of each (the checks below enforce the ones our graphs could break).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

MAX_OPSET = 24  # "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
PARSER_OPS = {
    "Add": "", "And": "", "Cast": "", "Concat": "", "Div": "", "Equal": "", "Expand": "", "Gelu": "",
    "Identity": "", "Less": "", "LessOrEqual": "", "MatMul": "", "Mul": "", "Or": "", "Pad": "", "Range": "",
    "Reshape": "", "RMSNormalization": "", "Shape": "", "Sigmoid": "", "Slice": "", "Softmax": "", "Split": "",
    "Sub": "", "Tanh": "", "Transpose": "", "Where": "",
    "Attention": "Q, K, V, attn_mask 4-D; no past_key, past_value, nonpad_kv_seqlen inputs; no present or "
                 "qk_matmul_output outputs; no softcap or qk_matmul_output_mode attributes",
    "DequantizeLinear": "int8, int4 or fp8 data; x_zero_point zero",
    "Gather": "data of a non-quantized type (FP32, FP16, BF16, INT32, INT64, BOOL)",
    "ReduceMax": "axes an initializer",
    "RotaryEmbedding": "position_ids int64",
    "Squeeze": "axes a constant",
    "TensorScatter": "past_cache and update 4-D; axis -2",
    "Unsqueeze": "axes a constant",
}
QUANTIZED = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)
AXES_INPUT = {"ReduceMax": 1, "Squeeze": 1, "Unsqueeze": 1}  # documented: axes must be an initializer / constant


def parser_problems(proto: onnx.ModelProto) -> list[str]:
    """One line per node or setting TensorRT's parser would refuse (empty: parsable as far as documented)."""
    problems = [f"opset {o.version} of domain {o.domain or 'ai.onnx'} (TensorRT reads ai.onnx up to {MAX_OPSET})"
                for o in proto.opset_import if (o.domain not in ("", "ai.onnx")) or o.version > MAX_OPSET]
    known = onnx.ModelProto()
    known.CopyFrom(proto)  # shape inference stops at a node of a domain onnx does not know: infer without those
    kept = [n for n in known.graph.node if n.domain in ("", "ai.onnx")]
    del known.graph.node[:]
    known.graph.node.extend(kept)
    inferred = onnx.shape_inference.infer_shapes(known, strict_mode=False).graph
    graph = proto.graph
    types = {v.name: v.type.tensor_type for v in (*inferred.value_info, *graph.input, *graph.output)}
    inits = {t.name: t for t in graph.initializer}
    types.update({name: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type
                  for name, t in inits.items()})

    def rank(name: str) -> int | None:
        t = types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def dtype(name: str) -> int | None:
        t = types.get(name)
        return t.elem_type if t is not None else None

    for node in graph.node:
        where = f"{node.op_type} {node.name}"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx") or node.op_type not in PARSER_OPS:
            problems.append(f"{where}: not in TensorRT's supported operators ({node.domain or 'ai.onnx'} domain)")
            continue
        if node.op_type == "Attention":
            if len([i for i in node.input[4:] if i]) or len([o for o in node.output[1:] if o]):
                problems.append(f"{where}: past/present key and value (or nonpad_kv_seqlen, qk_matmul_output)")
            problems += [f"{where}: attribute {a}" for a in ("softcap", "qk_matmul_output_mode") if a in attrs]
            problems += [f"{where}: input {n} is not 4-D" for n in node.input[:4] if n and rank(n) != 4]
        elif node.op_type == "TensorScatter":
            if attrs.get("axis", -2) != -2:
                problems.append(f"{where}: axis {attrs['axis']}, TensorRT takes -2 only")
            problems += [f"{where}: input {n} is not 4-D" for n in node.input[:2] if rank(n) != 4]
        elif node.op_type == "DequantizeLinear":
            if dtype(node.input[0]) not in QUANTIZED:
                problems.append(f"{where}: data of type {dtype(node.input[0])}, TensorRT takes int8, int4 or fp8")
            zero = node.input[2] if len(node.input) > 2 else ""
            if zero and (zero not in inits or inits[zero].data_location == TensorProto.EXTERNAL
                         or onnx.numpy_helper.to_array(inits[zero]).any()):
                problems.append(f"{where}: zero point {zero} is not zero")
        elif node.op_type == "Gather" and dtype(node.input[0]) in (*QUANTIZED, TensorProto.UINT8, TensorProto.UINT4):
            problems.append(f"{where}: gathers quantized data, which TensorRT only dequantizes")
        elif node.op_type == "RotaryEmbedding" and len(node.input) > 3 and dtype(node.input[3]) != TensorProto.INT64:
            problems.append(f"{where}: position_ids are not int64")
        elif node.op_type in AXES_INPUT and len(node.input) > 1 and node.input[1] not in inits:
            problems.append(f"{where}: axes are not an initializer")
    return problems
