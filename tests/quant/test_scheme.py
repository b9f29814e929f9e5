"""The quantization scheme: checked once, serialized without changing weight-only records, its arithmetic its
own, and refused (one ToolkitError) where it asks for what no code runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.passes.gptq import GPTQConfig
from toolkit.passes.rtn import RTNConfig
from toolkit.quant import arithmetic
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

FP8 = QuantSpec(8, -1, type="float")
SCHEMES = [
    QuantScheme(QuantSpec(4, 32)),
    QuantScheme(QuantSpec(3, -1, False)),
    QuantScheme(QuantSpec(8, -1), ActivationSpec("int", 8, "token", dynamic=True)),
    QuantScheme(QuantSpec(4, 16, False), ActivationSpec("int", 8, "tensor", dynamic=False, symmetric=False)),
    QuantScheme(FP8, ActivationSpec("float", 8, "tensor", dynamic=False)),
    QuantScheme(FP8),
    QuantScheme(QuantSpec(8, -1, type="float", strategy="tensor"), ActivationSpec("float", 8, "tensor", dynamic=False)),
]


@pytest.mark.parametrize("make,match", [
    (lambda: QuantSpec(bits=5), "bits must be one of"),
    (lambda: QuantSpec(type="fp4"), "weight type must be 'int' or 'float'"),  # type: ignore[arg-type]
    (lambda: QuantSpec(4, type="float"), "fp8 e4m3: bits 8 and symmetric"),
    (lambda: QuantSpec(8, -1, symmetric=False, type="float"), "fp8 e4m3: bits 8 and symmetric"),
    (lambda: QuantSpec(8, -1, strategy="tensor"), r"strategy: tensor\) is for fp8 weights: use type: float"),
    (lambda: QuantSpec(8, 32, type="float", strategy="tensor"), "and group_size: -1, or strategy: group"),
    (lambda: QuantSpec(8, -1, type="float", strategy="channel"), "strategy must be 'group' or 'tensor'"),  # type: ignore[arg-type]
    (lambda: ActivationSpec(bits=4), "bits must be 8"),
    (lambda: ActivationSpec(type="uint"), "activation type must be"),  # type: ignore[arg-type]
    (lambda: ActivationSpec(strategy="group"), "strategy must be 'token' or 'tensor'"),  # type: ignore[arg-type]
    (lambda: ActivationSpec(strategy="token", dynamic=False), "use dynamic: true, or strategy: tensor"),
    (lambda: ActivationSpec(type="float", symmetric=False), "fp8 activations are symmetric"),
])
def test_bad_values_are_refused_with_what_to_do(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_schemes_round_trip_through_their_record(scheme: QuantScheme) -> None:
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


def test_weight_only_integer_records_keep_their_three_keys() -> None:
    """The packed record stores these per module: weight-only int schemes must write what they always wrote."""
    assert QuantScheme(QuantSpec(4, 32, True)).to_dict() == {"bits": 4, "group_size": 32, "symmetric": True}
    assert QuantSpec(8, -1, False).to_dict() == {"bits": 8, "group_size": -1, "symmetric": False}
    assert FP8.to_dict()["type"] == "float" and "strategy" not in FP8.to_dict()
    assert QuantSpec(8, -1, type="float", strategy="tensor").to_dict()["strategy"] == "tensor"


@pytest.mark.parametrize("record,match", [
    ({"bits": 4, "group_size": 32}, r"missing \['symmetric'\]"),
    ({"bits": 4, "group_size": 32, "symmetric": True, "zero": 8}, r"unknown \['zero'\]"),
    ({"bits": 4, "group_size": 32, "symmetric": True, "input_activations": "int8"}, "must be a mapping"),
    ({"bits": 4, "group_size": 32, "symmetric": True, "input_activations": {"dtype": "int8"}}, r"unknown \['dtype'\]"),
    ({"bits": 4, "group_size": 32, "symmetric": True, "input_activations": {"strategy": "token", "dynamic": False}},
     "use dynamic: true"),
])
def test_bad_records_are_refused(record: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantScheme.from_dict(record)


def test_names_follow_compressed_tensors_presets() -> None:
    assert [s.name for s in SCHEMES] == ["W4A16", "W3A16", "W8A8", "W4A8", "WFP8AFP8", "WFP8A16", "WFP8AFP8"]


def test_the_arithmetic_is_the_specs_own() -> None:
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, 16, symmetric=False)
    codes, scales, zeros = spec.rtn(w)
    for ours, theirs in zip((codes, scales, zeros), arithmetic.rtn_quantize(w, spec), strict=True):
        assert torch.equal(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(spec.qparams(w), (scales, zeros), strict=True))
    assert torch.equal(spec.quantize(w, scales, zeros), codes)
    back = spec.dequantize(codes, scales, zeros)
    assert torch.equal(back, arithmetic.dequantize(codes, scales, zeros, 16))
    assert float((back - w).abs().max()) <= float(scales.max()) / 2 + 1e-6


def test_fp8_weights_have_no_integer_arithmetic() -> None:
    w = torch.randn(4, 32)
    with pytest.raises(ToolkitError, match="fp8 weights have no integer arithmetic"):
        FP8.rtn(w)
    with pytest.raises(ToolkitError, match="fp8 weights have no integer arithmetic"):
        arithmetic.quantize(w, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.uint8), FP8)


def test_weight_only_returns_the_weights_or_refuses_in_one_line() -> None:
    assert QuantScheme(QuantSpec(3, 16)).weight_only("rtn") == QuantSpec(3, 16)
    with pytest.raises(ToolkitError, match=r"^rtn quantizes weights only; this W8A8 scheme also quantizes input "
                       r"activations \(int8 dynamic per-token\), which it does not run: drop input_activations \(rtn and gptq "
                       r"run them, export_compressed_tensors holds them\)$") as err:
        SCHEMES[2].weight_only("rtn")
    assert "\n" not in str(err.value)
    with pytest.raises(ToolkitError, match="^export_gguf writes integer codes; this scheme holds fp8 weights"):
        QuantScheme(FP8).weight_only("export_gguf")


def test_a_quantized_linear_refuses_fp8_weights() -> None:
    with pytest.raises(ToolkitError, match=r"a quantized linear \(QuantLinear\) writes integer codes"):
        QuantLinear(32, 8, FP8)


def test_pass_configs_ask_for_weight_only_integer_schemes() -> None:
    config = GPTQConfig(bits=3, group_size=16, symmetric=False, lm_head_bits=None)
    assert config.scheme == QuantScheme(QuantSpec(3, 16, False)) and config.scheme.name == "W3A16"
    assert RTNConfig().spec == QuantSpec(4, 32, True)
