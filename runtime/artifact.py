"""Opening an export folder: refuse unsafe or truncated external data, read the contract, trust the graph's limits,
and refuse a contract whose sizes the graph contradicts (a description copied from another model).

An export folder holds ``model.onnx`` + ``model.onnx.data`` (external data), tokenizer files and the export
contract (``export.json``, or onnxruntime-genai's ``genai_config.json``; see contract.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx

from toolkit.errors import ToolkitError
from toolkit.runtime.contract import MODEL_FILE, ExportContract, description_file, read_contract

# Ops whose past/present outputs may alias one preallocated buffer (seqlens from the attention mask).
SHARED_BUFFER_OPS = ("GroupQueryAttention", "TensorScatter")
# Ops whose past input is the whole fixed-capacity cache (present has its shape), not the columns in use.
WHOLE_CACHE_OPS = ("TensorScatter",)
# Ops that round activations to int8 in the graph itself (W8A8 linears, ``toolkit.onnx.graph.w8a8_linear``), at any
# MatMulNBits accuracy_level; onnxruntime-style quantized graphs may carry the fused or dynamic forms.
INT8_ACTIVATION_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "DynamicQuantizeMatMul")
# Where each rotary op reads its cos cache ([max_positions, rotary_dim / 2]): the rows bound the context.
COS_CACHE_INPUT = {"GroupQueryAttention": 7, "RotaryEmbedding": 1}
PACKED_4BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
# The attention op's head counts: (query heads, KV heads) attribute names per op type.
HEAD_ATTRIBUTES = {"GroupQueryAttention": ("num_heads", "kv_num_heads"), "Attention": ("q_num_heads", "kv_num_heads")}
# Where each RMS norm reads its scale ([hidden]); the graph's first norm is layer 0's input norm.
NORM_SCALE_INPUT = {"RMSNormalization": 1, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
                    "LayerNormalization": 1}


def resolve_model(folder: Path, model_file: str = MODEL_FILE) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolkitError(f"export folder not found: {folder}")
    path = folder / model_file
    if Path(model_file).name != model_file:
        raise ToolkitError(f"{folder}: the description names model file {model_file!r}, which is not a file name in "
                           "the export folder; re-export the model")
    if not path.is_file():
        raise ToolkitError(f"{folder} has no {model_file}: give an export folder (toolkit run with an export step)")
    return path


def _tensor_bytes(init: onnx.TensorProto) -> int | None:
    """Bytes the initializer's shape and type need in the data file; None for types of no fixed size."""
    count = int(np.prod(init.dims, dtype=np.int64))
    if init.data_type in PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _check_range(model_path: Path, init: onnx.TensorProto, location: str, size: int) -> None:
    entries = {e.key: e.value for e in init.external_data}
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise ToolkitError(f"{model_path}: initializer {init.name} has a non-numeric external-data offset or "
                           "length; re-export the model") from None
    need = _tensor_bytes(init)
    if length is not None and need is not None and length != need:
        raise ToolkitError(f"{model_path}: initializer {init.name} declares {length} bytes of external data but its "
                           f"shape needs {need}; re-export the model")
    end = offset + (length if length is not None else need or 0)
    if offset < 0 or end > size:
        raise ToolkitError(
            f"{model_path}: initializer {init.name} reads bytes {offset}..{end} of {location}, which has {size}: "
            "the data file is truncated or belongs to another model; copy the whole export folder again or re-export"
        )


def check_external_data(folder: Path, model_path: Path) -> onnx.ModelProto:
    """Load the graph without weights and refuse missing, escaping or too short external-data files.

    Every initializer's ``location`` must name an existing file inside ``folder`` (ORT would otherwise read
    whatever path the graph names, ``../../etc/...``), and its offset and length must lie inside that file
    (a truncated copy would otherwise pass here and fail at session creation).
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/OSError variants; report them all the same way
        raise ToolkitError(f"{model_path} is not a readable ONNX model ({exc}); re-export it") from None
    root = folder.resolve()
    sizes: dict[Path, int] = {}
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if not location:
            raise ToolkitError(f"{model_path}: initializer {init.name} has external data with no location; re-export")
        target = (folder / location).resolve()
        if not target.is_relative_to(root):
            raise ToolkitError(
                f"{model_path}: initializer {init.name} points outside the export folder ({location}); "
                "refusing to read it: re-export the model with its weights inside the folder"
            )
        if not target.is_file():
            raise ToolkitError(
                f"{model_path}: external data file {location} is missing; copy the whole export folder "
                "(model.onnx and its .data file) or re-export"
            )
        if target not in sizes:
            sizes[target] = target.stat().st_size
        _check_range(model_path, init, location, sizes[target])
    return proto


def next_token_node(logits: str, output: str, name: str) -> onnx.NodeProto:
    """ArgMax over the vocabulary: int64 [B, S] from logits [B, S, V]. select_last_index=0 takes the first index
    on ties, as numpy's argmax does, so greedy decoding reads the same token from either."""
    return onnx.helper.make_node("ArgMax", [logits], [output], name=name, axis=-1, keepdims=0, select_last_index=0)


def uses_shared_buffer(proto: onnx.ModelProto) -> bool:
    return any(node.op_type in SHARED_BUFFER_OPS for node in proto.graph.node)


def quantizes_activations(proto: onnx.ModelProto) -> bool:
    return any(node.op_type in INT8_ACTIVATION_OPS for node in proto.graph.node)


def takes_whole_cache(proto: onnx.ModelProto) -> bool:
    return any(node.op_type in WHOLE_CACHE_OPS for node in proto.graph.node)


def graph_context_length(proto: onnx.ModelProto) -> int | None:
    """Rows of the rotary cos cache the graph reads: no position past them has a rotation. None: no rotary op."""
    dims = {init.name: list(init.dims) for init in proto.graph.initializer}
    rows = [dims[node.input[i]][0] for node in proto.graph.node
            if (i := COS_CACHE_INPUT.get(node.op_type)) is not None and len(node.input) > i
            and node.input[i] in dims and dims[node.input[i]]]
    return min(rows) if rows else None


def _static_shape(value: onnx.ValueInfoProto) -> list[int | None]:
    """A graph input's or output's dims: an int where fixed, None where symbolic (batch, sequence)."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _graph_dimensions(contract: ExportContract, proto: onnx.ModelProto) -> dict[str, list[tuple[int, str]]]:
    """What the weightless graph itself says of each contract dimension: (value, where it says it) pairs."""
    names = contract.names
    inputs = {v.name: _static_shape(v) for v in proto.graph.input}
    outputs = {v.name: _static_shape(v) for v in proto.graph.output}
    found: dict[str, list[tuple[int, str]]] = {k: [] for k in contract.dimensions()}
    layers = next(i for i in range(len(inputs) + 1) if names.past(i, "key") not in inputs)
    found["num_layers"].append((layers, f"cache inputs {names.past_key}"))
    cache = [(n, inputs.get(n) or outputs.get(n)) for i in range(min(layers, contract.num_layers)) for kind in
             ("key", "value") for n in (names.past(i, kind), names.present(i, kind))]
    for name, shape in cache:  # [B, KVH, S, D]
        if shape and len(shape) == 4:
            found["num_kv_heads"] += [(shape[1], name)] if shape[1] else []
            found["head_dim"] += [(shape[3], name)] if shape[3] else []
    logits = outputs.get(names.logits)
    if logits and len(logits) == 3 and logits[2]:  # [B, S, V]
        found["vocab_size"].append((logits[2], names.logits))
    dims = {init.name: list(init.dims) for init in proto.graph.initializer}
    for node in proto.graph.node:
        attributes = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        for key, attr in zip(("num_heads", "num_kv_heads"), HEAD_ATTRIBUTES.get(node.op_type, ()), strict=False):
            if attributes.get(attr):
                found[key].append((attributes[attr], f"{node.op_type} {node.name}"))
    norm = next((n for n in proto.graph.node if n.op_type in NORM_SCALE_INPUT), None)
    if norm is not None and len(norm.input) > NORM_SCALE_INPUT[norm.op_type]:
        scale = dims.get(norm.input[NORM_SCALE_INPUT[norm.op_type]])
        if scale and len(scale) == 1:
            found["hidden_size"].append((scale[0], f"{norm.op_type} {norm.name}'s scale"))
    return found


def check_graph(contract: ExportContract, proto: onnx.ModelProto, source: Path, model_path: Path) -> None:
    """Refuse a description whose sizes the graph contradicts, naming both: onnxruntime would otherwise fail
    mid-generation (GroupQueryAttention on a cache of the wrong shape) or return logits of the wrong width."""
    names = contract.names
    graph_names = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
    declared_dims = contract.dimensions()
    for key, observed in _graph_dimensions(contract, proto).items():
        declared = declared_dims[key]
        for value, where in observed:
            if value != declared:
                raise ToolkitError(f"{source} says {key} {declared} but {model_path.name} has {value} ({where}): the "
                                   "description does not belong to this graph; re-export the model")
    wanted = [names.input_ids, names.attention_mask, names.logits, *(n for pair in
              names.cache_pairs(contract.num_layers) for n in pair)]
    missing = [n for n in [*wanted, names.position_ids, names.next_token] if n is not None and n not in graph_names]
    if missing:
        raise ToolkitError(f"{source} names tensors {model_path.name} does not have ({', '.join(missing[:3])}): the "
                           "description does not belong to this graph; re-export the model")


def open_export(folder: Path) -> tuple[ExportContract, onnx.ModelProto, Path]:
    """(contract, weightless graph, model path), the contract's context length capped by the graph's own."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolkitError(f"export folder not found: {folder}")
    contract = read_contract(folder)
    model_path = resolve_model(folder, contract.model_file)
    proto = check_external_data(folder, model_path)
    check_graph(contract, proto, description_file(folder), model_path)
    rows = graph_context_length(proto)
    if rows is not None and rows < contract.context_length:
        warnings.warn(f"{folder}: the description claims a context of {contract.context_length} tokens but the "
                      f"graph's rotary cache has {rows} rows; serving {rows}", stacklevel=3)
        contract = dataclasses.replace(contract, context_length=rows)
    return contract, proto, model_path
