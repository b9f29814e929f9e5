import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ToolkitError
from toolkit.quant.arithmetic import dequantize, rtn_quantize
from toolkit.quant.formats import Int4, Int8
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import QuantSpec, valid_group_sizes
from toolkit.quant.surgery import check_group_size


def test_int4_pack_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 34), generator=g, dtype=torch.uint8)
    packed = Int4.pack(q)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(Int4.unpack(packed), q)
    # low nibble holds the even element (MatMulNBits / ONNX int4 order)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_int4_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        Int4.pack(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="above 15"):
        Int4.pack(torch.full((1, 2), 16, dtype=torch.uint8))


def test_int8_round_trip():
    q = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
    assert torch.equal(Int8.unpack(Int8.pack(q)), q)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(5, 64)
    spec = QuantSpec(bits, 16, symmetric)
    q, scale, zero = rtn_quantize(w, spec)
    assert int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zero, 16) - w).abs().reshape(5, 4, 16)
    assert torch.all(err <= scale.unsqueeze(-1) / 2 + 1e-6)


def test_int8_beats_int4():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    e4 = (dequantize(*rtn_quantize(w, QuantSpec(4, 32)), 32) - w).pow(2).mean()
    e8 = (dequantize(*rtn_quantize(w, QuantSpec(8, 32)), 32) - w).pow(2).mean()
    assert e8 < e4 / 100


def test_symmetric_int4_uses_onnxruntime_convention():
    w = torch.tensor([[-7.0, 3.5, 7.0, 0.0]])
    q, scale, zero = rtn_quantize(w, QuantSpec(4, 4, True))
    assert float(scale) == pytest.approx(1.0) and int(zero) == 8
    assert q.tolist() == [[1, 12, 15, 8]]


def test_quant_linear_computes_from_packed_weights():
    torch.manual_seed(2)
    linear = torch.nn.Linear(32, 6, bias=True)
    spec = QuantSpec(4, 16, False)
    q, scale, zero = rtn_quantize(linear.weight.data, spec)
    layer = QuantLinear.from_codes(q, scale, zero, spec, linear.bias)
    x = torch.randn(3, 32)
    expected = F.linear(x, dequantize(q, scale.half().float(), zero, 16), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.qweight.shape == (6, 16) and layer.scales.dtype == torch.float16
    assert torch.equal(layer.codes(), q)


def test_group_size_error_lists_valid_choices():
    linears = {"a": torch.nn.Linear(576, 8), "b": torch.nn.Linear(1536, 8)}
    with pytest.raises(ToolkitError, match=r"group_size 128 .*valid choices: .*16, .*32, .*64, .*96, .*192"):
        check_group_size(linears, 128)
    check_group_size(linears, 64)
    assert 192 in valid_group_sizes([576, 1536]) and 128 not in valid_group_sizes([576, 1536])


def test_quant_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=7)
