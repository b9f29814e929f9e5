"""The standard target's graph against TensorRT 10.15's documented ONNX operator support (no TensorRT here):
every op in the list, the restrictions it states held, and a forbidden op or attribute caught."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import load_tiny
from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_model, tiny_tokenizer
from toolkit.onnx.tensorrt import MAX_OPSET, PARSER_OPS, parser_problems
from toolkit.passes import onnx as onnx_pass
from toolkit.passes.onnx import MODEL_FILE, ONNXConfig, export
from toolkit.passes.rtn import RTNConfig
from toolkit.passes.rtn import apply as rtn_apply
from toolkit.paths import atomic_dir
from toolkit.quant.formats import DequantizeLinear


def _export(model: torch.nn.Module, folder: Path) -> onnx.ModelProto:
    with atomic_dir(folder) as tmp:
        export(model, tiny_tokenizer(), ONNXConfig(target="standard", accuracy_level=0, threads=1), tmp)
    return onnx.load(str(folder / MODEL_FILE), load_external_data=False)


@pytest.fixture(scope="module")
def int4_graph(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """Tiny Llama, RTN int4 g32 symmetric with an int8 head (tied, so the embedding dequantizes too)."""
    model = rtn_apply(load_tiny().model, RTNConfig(bits=4, group_size=32, lm_head_bits=8))
    return _export(model, tmp_path_factory.mktemp("trt") / "int4")


def test_int4_graph_uses_only_documented_ops_and_restrictions(int4_graph: onnx.ModelProto) -> None:
    ops = {n.op_type for n in int4_graph.graph.node}
    print("standard int4 op set:", sorted(ops))
    assert parser_problems(int4_graph) == []
    assert ops <= set(PARSER_OPS)
    assert {"Attention", "TensorScatter", "RotaryEmbedding", "RMSNormalization", "DequantizeLinear"} <= ops
    assert [(o.domain, o.version) for o in int4_graph.opset_import] == [("", 24)]
    assert all(len(n.input) == 2 for n in int4_graph.graph.node if n.op_type == "DequantizeLinear")  # no zero point
    assert all(len(n.input) == 4 and len(n.output) == 1 for n in int4_graph.graph.node if n.op_type == "Attention")


def test_softcapped_family_stays_parsable(tmp_path: Path) -> None:
    """Gemma 2 (attention soft-capping, sliding windows): the capped layers are plain ops, not Attention's
    softcap attribute, which TensorRT refuses."""
    proto = _export(tiny_model("gemma2"), tmp_path / "gemma2")
    assert parser_problems(proto) == []
    assert not any(a.name == "softcap" for n in proto.graph.node for a in n.attribute)


def _node(proto: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.op_type == op)


def _with_zero_point(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(proto: onnx.ModelProto) -> None:
        dq = _node(proto, "DequantizeLinear")
        scales = next(t for t in proto.graph.initializer if t.name == dq.input[1])
        zero = numpy_helper.from_array(np.full(list(scales.dims), value, np.int8), "zp")
        proto.graph.initializer.append(zero)
        dq.input.append("zp")
        data = next(t for t in proto.graph.initializer if t.name == dq.input[0])
        data.data_type = TensorProto.INT8  # the zero point and the data share a type (the first DQ is the int8 head)
    return change


def _past_inputs(proto: onnx.ModelProto) -> None:
    attention = _node(proto, "Attention")
    attention.input.extend([attention.input[1], attention.input[2]])


def _attribute(op: str, **attrs: object) -> Callable[[onnx.ModelProto], None]:
    def change(proto: onnx.ModelProto) -> None:
        node = _node(proto, op)
        for name in attrs:
            for a in [a for a in node.attribute if a.name == name]:
                node.attribute.remove(a)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return change


def _contrib_op(proto: onnx.ModelProto) -> None:
    proto.graph.node.append(helper.make_node("FastGelu", ["logits"], ["fast"], domain="com.microsoft"))


def _undocumented_op(proto: onnx.ModelProto) -> None:
    proto.graph.node.append(helper.make_node("Unique", ["input_ids"], ["unique"]))


def _opset(proto: onnx.ModelProto) -> None:
    proto.opset_import[0].version = MAX_OPSET + 1


def _gather_int8(proto: onnx.ModelProto) -> None:
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 3), np.int8), "codes"))
    proto.graph.node.append(helper.make_node("Gather", ["codes", "input_ids"], ["rows"]))


FORBIDDEN = {
    "zero point": (_with_zero_point(1), "zero point zp is not zero"),
    "past inputs": (_past_inputs, "past/present key and value"),
    "softcap": (_attribute("Attention", softcap=30.0), "attribute softcap"),
    "scatter axis": (_attribute("TensorScatter", axis=2), "axis 2, TensorRT takes -2 only"),
    "contrib op": (_contrib_op, "FastGelu"),
    "undocumented op": (_undocumented_op, "Unique"),
    "opset": (_opset, f"opset {MAX_OPSET + 1}"),
    "gather int8": (_gather_int8, "gathers quantized data"),
}


@pytest.mark.parametrize("case", FORBIDDEN)
def test_a_forbidden_op_or_attribute_is_caught(int4_graph: onnx.ModelProto, case: str) -> None:
    change, message = FORBIDDEN[case]
    proto = onnx.ModelProto()
    proto.CopyFrom(int4_graph)
    change(proto)
    problems = parser_problems(proto)
    assert any(message in p for p in problems), problems


def test_a_zero_valued_zero_point_is_allowed(int4_graph: onnx.ModelProto) -> None:
    proto = onnx.ModelProto()
    proto.CopyFrom(int4_graph)
    _with_zero_point(0)(proto)
    assert parser_problems(proto) == []


def test_the_exporter_fails_on_a_graph_tensorrt_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = onnx_pass.build_model

    def with_contrib_op(*args: object, **kwargs: object) -> onnx.ModelProto:
        proto = build(*args, **kwargs)  # type: ignore[arg-type]
        _contrib_op(proto)
        return proto

    monkeypatch.setattr(onnx_pass, "build_model", with_contrib_op)
    with pytest.raises(ToolkitError, match="TensorRT's parser refuses: FastGelu .* bug in the exporter"):
        _export(load_tiny().model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_codes_read_back_by_onnx(bits: int) -> None:
    """``DequantizeLinear.signed_raw``: onnx reads our int4 / int8 bytes as ``q - 2^(bits-1)`` (odd count padded)."""
    q = torch.randint(0, 2**bits, (5, 3), dtype=torch.uint8)
    raw = DequantizeLinear.signed_raw(q, bits).numpy()
    dtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    tensor = helper.make_tensor("t", dtype, [5, 3], raw.tobytes(), raw=True)
    expected = q.numpy().astype(np.int16) - 2 ** (bits - 1)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int16), expected)
