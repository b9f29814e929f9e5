"""W8A8 ONNX (ort target): the model's int8 integers exactly, every family validated, onnxruntime's fusion checked,
what the graph cannot compute refused before any work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from toolkit.errors import ToolkitError
from toolkit.models.tiny import FAMILIES, tiny_llama, tiny_model, tiny_tokenizer
from toolkit.onnx import decoder
from toolkit.onnx.graph import Builder, w8a8_linear
from toolkit.onnx.weights import LinearWeight, linear_weight, row_blocks
from toolkit.passes import PASSES, rtn
from toolkit.passes.context import PassContext
from toolkit.passes.onnx import ONNXConfig, check_spec, export
from toolkit.paths import atomic_dir
from toolkit.quant.arithmetic import dequantize
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

DYNAMIC = ActivationSpec("int", 8, "token", dynamic=True)
STATIC = ActivationSpec("int", 8, "tensor", dynamic=False)
W8A8 = rtn.RTNConfig(bits=8, group_size=-1, input_activations=DYNAMIC)


def _export(model: torch.nn.Module, folder: Path, **config: object) -> dict:
    with atomic_dir(folder) as tmp:
        return export(model, tiny_tokenizer(), ONNXConfig(**config), tmp)["export"]


def _session(b: Builder, y: str, k: int, opts: ort.SessionOptions | None = None) -> ort.InferenceSession:
    graph = helper.make_graph(b.nodes, "w8a8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _w8a8_layer(bias: bool, act: ActivationSpec = DYNAMIC) -> QuantLinear:
    """A query projection of a W8A8 tiny model (qwen2's has a bias), its codes under ``act``."""
    model = rtn.apply(tiny_model("qwen2" if bias else "llama"), W8A8)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and (layer.bias is not None) == bias
    return QuantLinear.from_codes(*layer.unpacked(), layer.spec, layer.bias, act=act)


@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_computes_the_models_integers_and_onnxruntime_fuses_it(bias: bool, tmp_path: Path) -> None:
    """Against QuantLinear's own forward, with onnxruntime's fusions on: with a bias, its MatMulIntegerToFloat
    fusion (onnxruntime 1.32) took the Add in as well and was wrong by ~10 % of the output, so the graph adds the
    bias with Sum; a zero row (scale 1) and a row of huge values are in x."""
    layer = _w8a8_layer(bias)
    b = Builder()
    y = w8a8_linear(b, "x", linear_weight(layer), "lin")
    k = layer.in_features
    x = torch.randn(6, k) * torch.logspace(-2, 2, 6)[:, None]
    x[2] = 0
    ref = layer(x).detach().numpy()
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    out = _session(b, y, k, opts).run(None, {"x": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.all(out[2] == (0 if layer.bias is None else layer.bias.detach().numpy()))
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "MatMulIntegerToFloat" in fused and "MatMulInteger" not in fused


def test_static_scale_is_a_constant_and_saturates() -> None:
    layer = _w8a8_layer(True, STATIC)
    layer.input_scale.fill_(0.01)  # x beyond ±1.27 saturates at the int8 ends
    b = Builder()
    y = w8a8_linear(b, "x", linear_weight(layer), "lin")
    assert not any(n.op_type == "ReduceMax" for n in b.nodes)
    x = torch.randn(5, layer.in_features)
    ref = layer(x).detach().numpy()
    out = _session(b, y, layer.in_features).run(None, {"x": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_w8a8_linear_refuses_what_it_cannot_run() -> None:
    layer = _w8a8_layer(False)
    w = linear_weight(layer)
    for bad, what in [(replace(w, act=None), "act"), (replace(w, group=32), "group"),
                      (replace(w, act=ActivationSpec("float", 8, "token")), "fp8")]:
        with pytest.raises(ToolkitError, match="^lin: the W8A8 ONNX linear takes int8 activations"):
            w8a8_linear(Builder(), "x", bad, "lin")
        assert what


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_w8a8_and_matches_pytorch(tmp_path: Path, family: str) -> None:
    """The default rtn head (int8 per channel, weight-only) runs as MatMulNBits in power-of-two blocks
    (``row_blocks``); every other linear is a MatMulInteger. Float32 rounding alone gives ~3e-7."""
    model = rtn.apply(tiny_model(family), W8A8)
    result = _export(model, tmp_path / "out")
    strict = result["validation"]["strict"]
    assert result["validation"]["activation_tolerance"] == ONNXConfig().activation_tolerance
    assert max(m["rel_rms_median"] for m in strict.values()) <= 1e-5
    census = result["op_census"]
    layers = model.config.num_hidden_layers
    assert census["MatMulInteger"] >= 4 * layers and census["MatMulNBits"] == 1 and "MatMul" not in census


def test_static_w8a8_exports(tmp_path: Path) -> None:
    windows = torch.randint(0, 256, (4, 16))
    ctx = PassContext(tokenizer=tiny_tokenizer(), calibration_loader=lambda: windows, original_loader=tiny_llama,
                      workdir=tmp_path / "work")
    model = rtn.apply(tiny_llama(), replace(W8A8, input_activations=STATIC), ctx)
    result = _export(model, tmp_path / "out")
    assert max(m["rel_rms_median"] for m in result["validation"]["strict"].values()) <= 1e-5
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    scales = [t.name for t in proto.graph.initializer if t.name.endswith(".input_scale")]
    assert len(scales) == result["op_census"]["MatMulInteger"]  # each linear's calibrated scale, none computed


def test_a_wrong_weight_scale_fails_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = decoder.linear_weight

    def tampered(module: torch.nn.Module) -> LinearWeight:
        w = real(module)
        return w if w.act is None else replace(w, scales=w.scales * 1.05)  # type: ignore[operator]

    monkeypatch.setattr(decoder, "linear_weight", tampered)
    with pytest.raises(ToolkitError, match="strict .*median relative RMS .* > 0.001"):  # a tiny model's bound
        _export(rtn.apply(tiny_llama(), W8A8), tmp_path / "out", activation_tolerance=1e-3)
    assert not (tmp_path / "out").exists()


def test_row_blocks_hold_the_same_numbers() -> None:
    layer = _w8a8_layer(False)
    w = linear_weight(layer)
    assert w.k == 96
    blocked = row_blocks(w)
    assert blocked.group == 32 and blocked.qweight is w.qweight  # three blocks of 32, the bytes as they are
    codes = w.codes
    assert codes is not None
    same = dequantize(codes, torch.from_numpy(blocked.scales), torch.from_numpy(blocked.zeros), 32)  # type: ignore[arg-type]
    assert torch.equal(same, layer.dequantized_weight().float())
    assert row_blocks(replace(w, k=40, group=40)).group == 40  # 40 = 8 x 5: no block >= 16, left to refuse


@pytest.mark.parametrize("scheme,config,match", [
    (QuantScheme(QuantSpec(4, 32), DYNAMIC), None, "this W4A8 scheme has int 4-bit weights, group_size 32"),
    (QuantScheme(QuantSpec(8, 32), DYNAMIC), None, "group_size 32"),
    (QuantScheme(QuantSpec(8, -1, type="float"), ActivationSpec("float", 8, "token")), None, "float 8-bit weights"),
    (QuantScheme(QuantSpec(8, -1), DYNAMIC), ONNXConfig(target="standard"), "^the standard ONNX target computes"),
    (QuantScheme(QuantSpec(8, -1), DYNAMIC), ONNXConfig(dtype="float16"), "dtype: float32"),
])
def test_the_recipe_check_refuses_what_the_graph_cannot_run(scheme: QuantScheme, config: ONNXConfig | None,
                                                            match: str) -> None:
    with pytest.raises(ToolkitError, match=match) as info:
        check_spec(scheme, config)
    assert "\n" not in str(info.value)


def test_a_w8a8_model_for_the_standard_target_is_refused_before_any_work(tmp_path: Path) -> None:
    model = rtn.apply(tiny_llama(), W8A8)
    with pytest.raises(ToolkitError, match="^the standard ONNX target computes with float activations"):
        PASSES[ONNXConfig].run(model, tiny_tokenizer(), ONNXConfig(target="standard"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_w8a8_recipe_parses_and_a_standard_target_for_it_is_refused_when_read() -> None:
    import yaml

    from toolkit.pipeline import recipes

    path = Path(__file__).parents[2] / "recipes" / "smollm2-w8a8-smoothquant-onnx.yaml"
    data = yaml.safe_load(path.read_text())
    assert [p.name for p in recipes.parse(data, "r.yaml").passes] == ["smoothquant", "rtn", "onnx"]
    data["passes"][2] = {"onnx": {"target": "standard"}}
    with pytest.raises(ToolkitError, match=r"^r.yaml: passes\[1\].rtn then onnx: the standard ONNX target computes"):
        recipes.parse(data, "r.yaml")
