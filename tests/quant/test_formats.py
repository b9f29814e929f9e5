import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ToolkitError
from toolkit.quant import formats
from toolkit.quant.arithmetic import dequantize, rtn_quantize
from toolkit.quant.formats import (
    FORMATS,
    SIZES,
    GPTQInt32,
    PackedFormat,
    ToolkitPacked,
    format_named,
    pack_nibbles,
    unpack_nibbles,
)
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import QuantSpec, valid_group_sizes
from toolkit.quant.surgery import check_group_size


def test_int4_pack_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 34), generator=g, dtype=torch.uint8)
    packed = ToolkitPacked.pack_codes(q, 4)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(ToolkitPacked.unpack_codes(packed, 4), q) and torch.equal(unpack_nibbles(packed), q)
    # low nibble holds the even element (MatMulNBits / ONNX int4 order)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_int4_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="above 15"):
        pack_nibbles(torch.full((1, 2), 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pack_nibbles(torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        ToolkitPacked.pack_codes(torch.zeros(1, 2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="holds 2, 3, 4, 8-bit codes, not 5"):
        ToolkitPacked.pack_codes(torch.zeros(1, 2, dtype=torch.uint8), 5)


def test_int8_round_trip():
    q = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
    assert torch.equal(ToolkitPacked.unpack_codes(ToolkitPacked.pack_codes(q, 8), 8), q)


# ---------------------------------------------------------------- every registered format

SYMMETRIC_ONLY = {"gguf_q4_0", "gguf_q8_0"}  # their blocks have no zero point (8 and 128 implied)


def _weight(spec: QuantSpec, shape: tuple[int, int] = (32, 64), seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random codes, float16-valued positive scales and zero points (never 0: GPTQ v1 stores zero - 1) in groups of 32."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**spec.bits, shape, generator=g, dtype=torch.uint8)
    scales = (torch.rand(shape[0], shape[1] // 32, generator=g) + 0.01).half()
    zeros = torch.randint(1, 2**spec.bits, scales.shape, generator=g, dtype=torch.uint8)
    if spec.symmetric:
        zeros = torch.full(scales.shape, 2 ** (spec.bits - 1), dtype=torch.uint8)
    return codes, scales, zeros


def _check_round_trip(fmt: type[PackedFormat], spec: QuantSpec) -> None:
    codes, scales, zeros = _weight(spec)
    tensors = fmt.pack(codes, scales, zeros, spec)
    # the first tensor holds the codes, in the bytes the size table gives
    first = next(iter(tensors.values()))
    assert first.numel() * first.element_size() == codes.shape[0] * fmt.row_bytes(spec.bits, codes.shape[1])
    assert fmt.row_bytes(spec.bits, codes.shape[1]) * 8 == fmt.stored_bits(spec.bits) * codes.shape[1]
    back = fmt.unpack(tensors, spec, (codes.shape[0], codes.shape[1]))
    assert torch.equal(back[0], codes)
    assert torch.equal(back[1].to(torch.float32), scales.to(torch.float32))
    assert torch.equal(back[2], zeros)


@pytest.mark.parametrize("name,bits,symmetric", [(n, b, s) for n in sorted(FORMATS) for b in SIZES[n] for s in (True, False)])
def test_every_format_round_trips_codes_scales_and_zeros_exactly(name: str, bits: int, symmetric: bool) -> None:
    fmt, spec = format_named(name), QuantSpec(bits, 32, symmetric)
    if name in SYMMETRIC_ONLY and not symmetric:
        with pytest.raises(ValueError, match="symmetric"):
            fmt.pack(*_weight(spec), spec)
        return
    _check_round_trip(fmt, spec)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_refuses_a_width_it_does_not_hold(name: str) -> None:
    bits = next(b for b in (3, 2, 8, 4) if b not in SIZES[name]) if len(SIZES[name]) < 4 else None
    if bits is None:
        assert sorted(SIZES[name]) == [2, 3, 4, 8]
        return
    spec = QuantSpec(bits, 32, True)
    with pytest.raises(ValueError, match=f"the {name} format holds .* not {bits}"):
        format_named(name).pack(*_weight(spec), spec)


def test_the_registry_refuses_a_second_format_of_the_same_name_and_one_without_sizes() -> None:
    with pytest.raises(ValueError, match="'gptq' is already registered .*GPTQInt32"):
        type("AnotherGPTQ", (GPTQInt32,), {"name": "gptq"})
    assert FORMATS["gptq"] is GPTQInt32
    with pytest.raises(ValueError, match="'unsized' has no entry in toolkit.quant.formats.SIZES"):
        type("Unsized", (GPTQInt32,), {"name": "unsized"})
    assert "unsized" not in FORMATS
    with pytest.raises(ValueError, match="no packed format named 'nope'; registered: compressed_tensors, "):
        format_named("nope")


def test_a_new_format_is_one_class_and_its_size_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example: signed bytes (code - 128), float32 scales, zero points as int16. Defining the class registers
    it; its size entry is the only other line it needs."""
    monkeypatch.setattr(formats, "FORMATS", dict(FORMATS))
    monkeypatch.setitem(SIZES, "example_signed", {8: (1, 1)})

    class SignedBytes(PackedFormat):
        name = "example_signed"

        @classmethod
        def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 spec: QuantSpec) -> dict[str, torch.Tensor]:
            cls.check_bits(spec.bits)
            return {"q": (codes.to(torch.int16) - 128).to(torch.int8), "s": scales.float(), "z": zeros.to(torch.int16)}

        @classmethod
        def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec,
                   shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            codes = (tensors["q"].to(torch.int16) + 128).to(torch.uint8)
            return codes, tensors["s"].half(), tensors["z"].to(torch.uint8)

    assert formats.format_named("example_signed") is SignedBytes
    _check_round_trip(SignedBytes, QuantSpec(8, 32, False))
    with pytest.raises(ValueError, match="holds 8-bit codes, not 4"):
        SignedBytes.pack(*_weight(QuantSpec(4, 32)), QuantSpec(4, 32))


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
