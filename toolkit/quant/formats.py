"""Packed formats: one interface, one size table, one registry (the model is gguf-py's ``quants.py``).

Every format turns our quantized weight (``codes`` uint8 ``[out, in]``, ``scales`` ``[out, G]``, ``zeros`` uint8
``[out, G]``, ``w ≈ (q - zero) * scale``) into the tensors a consumer stores, and back, bit-exactly:

    tensors = FORMATS["gptq"].pack(codes, scales, zeros, spec)        # {"qweight": ..., "qzeros": ..., ...}
    codes, scales, zeros = FORMATS["gptq"].unpack(tensors, spec, (out, in))

A format is a subclass of ``PackedFormat`` with a ``name``; defining it registers it (a second class with the
same name is refused), and ``SIZES`` says which code widths it holds and how many bytes a block of codes takes.
Which file or graph a format's tensors go into, and under which names, is the consumer's (``toolkit.interop``,
``toolkit.onnx``).

Our own storage (``ToolkitPacked``): unsigned 4-bit codes along the input dimension, two to a byte, element
``2i`` in the low nibble and ``2i+1`` in the high nibble. This is the byte order of onnxruntime's MatMulNBits
and of ONNX's packed int4, so exporters copy bytes rather than repack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from toolkit.quant.spec import QuantSpec

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8 [out, in], scales [out, G], zeros uint8 [out, G]

_NIBBLES = {2: (2, 1), 3: (2, 1), 4: (2, 1), 8: (1, 1)}  # 2- and 3-bit codes sit in the 4-bit layout
# format name -> {code bits it holds: (codes per block along a packed row, bytes per block)}, as gguf-py's
# GGML_QUANT_SIZES; a GGUF block carries its float16 scale (and Q4_1 its offset) beside the codes
SIZES: dict[str, dict[int, tuple[int, int]]] = {
    "toolkit": _NIBBLES,
    "matmulnbits": _NIBBLES,
    "dequantize_linear": _NIBBLES,
    "gptq": {2: (16, 4), 4: (8, 4), 8: (4, 4)},
    "gptq_v2": {2: (16, 4), 4: (8, 4), 8: (4, 4)},
    "gguf_q4_0": {4: (32, 18)},
    "gguf_q4_1": {4: (32, 20)},
    "gguf_q8_0": {8: (32, 34)},
    "compressed_tensors": {b: (32, 4 * b) for b in (2, 3, 4, 8)},
}
FORMATS: dict[str, type[PackedFormat]] = {}


class PackedFormat(ABC):
    """One packed layout: ``pack`` our codes/scales/zeros into named tensors, ``unpack`` them back exactly."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return
        if cls.name in FORMATS:
            raise ValueError(f"a packed format named {cls.name!r} is already registered ({FORMATS[cls.name].__name__}); "
                             "give the new format another name")
        if cls.name not in SIZES:
            raise ValueError(f"packed format {cls.name!r} has no entry in toolkit.quant.formats.SIZES; add its "
                             "code widths and block sizes there")
        FORMATS[cls.name] = cls

    @classmethod
    def widths(cls) -> tuple[int, ...]:
        """The code widths (bits) this format holds."""
        return tuple(sorted(SIZES[cls.name]))

    @classmethod
    def row_bytes(cls, bits: int, count: int) -> int:
        """Bytes that ``count`` codes of ``bits`` take along a packed row (a partial block takes a whole one)."""
        cls.check_bits(bits)
        block, size = SIZES[cls.name][bits]
        return -(-count // block) * size

    @classmethod
    def stored_bits(cls, bits: int) -> float:
        """Bits a code of ``bits`` takes in this format, block overhead included (GGUF Q4_0: 4.5)."""
        cls.check_bits(bits)
        block, size = SIZES[cls.name][bits]
        return 8 * size / block

    @classmethod
    def check_bits(cls, bits: int) -> None:
        if bits not in SIZES[cls.name]:
            raise ValueError(f"the {cls.name} format holds {', '.join(map(str, cls.widths()))}-bit codes, not {bits}")

    @classmethod
    @abstractmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """Our ``codes [out, in]``, ``scales, zeros [out, G]`` -> the format's named tensors."""

    @classmethod
    @abstractmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        """The format's tensors for a ``shape = (out, in)`` weight -> ``codes, scales, zeros`` exactly as packed."""


def format_named(name: str) -> type[PackedFormat]:
    if name not in FORMATS:
        raise ValueError(f"no packed format named {name!r}; registered: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


# ---------------------------------------------------------------- bit packing shared by the layouts

def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[..., n] uint8`` codes below 16 -> ``[..., n/2] uint8``, element ``2i`` in the low nibble."""
    if q.dtype != torch.uint8:
        raise TypeError(f"4-bit packing expects uint8 codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError("4-bit packing got a code above 15")
    pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _pack_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes along the last dimension in the byte layout of their width: two a byte up to 4 bits, one at 8."""
    if bits <= 4:
        return pack_nibbles(q)
    if q.dtype != torch.uint8:
        raise TypeError(f"8-bit packing expects uint8 codes, got {q.dtype}")
    return q.clone()


def _unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_nibbles(packed) if bits <= 4 else packed


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


# ---------------------------------------------------------------- our storage

class ToolkitPacked(PackedFormat):
    """``QuantLinear``'s buffers and our packed checkpoint: ``qweight`` (codes along the input dimension in the
    byte layout of their width, ``[out, in/2]`` up to 4 bits, ``[out, in]`` at 8), ``scales`` float16 and
    ``qzeros`` uint8 ``[out, G]``."""

    name = "toolkit"

    @classmethod
    def pack_codes(cls, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """``qweight`` alone (row blocks of a large head are packed as they arrive)."""
        cls.check_bits(bits)
        return _pack_bytes(codes, bits)

    @staticmethod
    def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
        return _unpack_bytes(qweight, bits)

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        return {"qweight": cls.pack_codes(codes, spec.bits), "scales": scales.to(torch.float16),
                "qzeros": zeros.to(torch.uint8)}

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        return cls.unpack_codes(tensors["qweight"], spec.bits), tensors["scales"], tensors["qzeros"]


def packed_width(bits: int, in_features: int) -> int:
    """Bytes per row of ``in_features`` codes in our storage (``ToolkitPacked``: two codes to a byte up to 4 bits)."""
    return ToolkitPacked.row_bytes(bits, in_features)


# ---------------------------------------------------------------- ONNX

class MatMulNBits(PackedFormat):
    """onnxruntime MatMulNBits: weight ``B [N, K/block, block*bits/8]`` uint8, ``scales [N, K/block]``, and
    ``zero_points [N, ceil(blocks*bits/8)]`` packed the same way along the block axis (an odd block count
    gets a zero high nibble). Within each block the codes are packed along K exactly like ``ToolkitPacked``
    (2- and 3-bit codes as 4-bit), so our ``QuantLinear.qweight [N, K/2]`` is the same bytes, only reshaped."""

    name = "matmulnbits"

    @classmethod
    def storage_bits(cls, bits: int) -> int:
        """The width MatMulNBits reads the codes as (its ``bits`` attribute): 2/3-bit codes live in the 4-bit layout."""
        return int(cls.stored_bits(bits))

    @classmethod
    def zero_points(cls, zeros: torch.Tensor, bits: int) -> torch.Tensor:
        """``[N, blocks] uint8 -> [N, ceil(blocks*bits/8)]``."""
        if cls.storage_bits(bits) == 8:
            return zeros.clone()
        n, blocks = zeros.shape
        padded = torch.zeros(n, blocks + blocks % 2, dtype=torch.uint8)
        padded[:, :blocks] = zeros
        return pack_nibbles(padded)

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        n, k = codes.shape
        block = spec.group(k)
        if k % block:
            raise ValueError(f"MatMulNBits needs K ({k}) to be a multiple of the block size ({block})")
        b = _pack_bytes(codes, spec.bits).reshape(n, k // block, block * cls.storage_bits(spec.bits) // 8)
        return {"B": b, "scales": scales, "zero_points": cls.zero_points(zeros, spec.bits)}

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        scales, packed_zeros = tensors["scales"], tensors["zero_points"]
        codes = _unpack_bytes(tensors["B"].reshape(shape[0], -1), spec.bits)
        zeros = packed_zeros.clone() if cls.storage_bits(spec.bits) == 8 else unpack_nibbles(packed_zeros)
        return codes, scales, zeros[:, : scales.shape[1]]


class DequantizeLinear(PackedFormat):
    """ONNX blocked ``DequantizeLinear`` of ``Wᵀ [K, N]`` along axis 0: ``qweight_t`` and ``zero_points_t``
    ``[G, N]`` are the raw data of ``uint4`` tensors up to 4 bits (the flattened row-major codes two a byte,
    low nibble first, a final odd element padded with a zero high nibble: ONNX IR spec, "4-bit integer
    types") and plain ``uint8`` tensors at 8 bits; ``scales_t [G, N]``."""

    name = "dequantize_linear"

    @staticmethod
    def _raw(q: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == 8:
            return q.contiguous()
        flat = q.reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat((flat, torch.zeros(1, dtype=torch.uint8)))
        return pack_nibbles(flat)

    @staticmethod
    def _from_raw(raw: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
        if bits == 8:
            return raw.reshape(shape)
        return unpack_nibbles(raw.reshape(-1))[: shape[0] * shape[1]].reshape(shape)

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        return {"qweight_t": cls._raw(codes.t(), spec.bits), "scales_t": scales.t().contiguous(),
                "zero_points_t": cls._raw(zeros.t(), spec.bits)}

    @classmethod
    def signed_raw(cls, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """Symmetric codes ``[R, C]`` (zero point ``2^(bits-1)``) as ``v = q - 2^(bits-1)``: the raw data of an
        ``int4`` tensor up to 4 bits (two's complement nibbles in the uint4 layout above), an ``int8`` tensor at 8.
        A DequantizeLinear of these takes no zero point, the only kind TensorRT's ONNX parser accepts."""
        cls.check_bits(bits)
        v = codes.to(torch.int16) - 2 ** (bits - 1)
        return v.to(torch.int8).contiguous() if bits == 8 else cls._raw((v & 0xF).to(torch.uint8), 4)

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        out_f, in_f = shape
        scales_t = tensors["scales_t"]
        codes_t = cls._from_raw(tensors["qweight_t"], spec.bits, (in_f, out_f))
        zeros_t = cls._from_raw(tensors["zero_points_t"], spec.bits, (scales_t.shape[0], out_f))
        return codes_t.t().contiguous(), scales_t.t().contiguous(), zeros_t.t().contiguous()


# ---------------------------------------------------------------- Hugging Face GPTQ (int32 words)

def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, m]`` codes < 2^bits -> ``[n * bits / 32, m]`` int32, value ``j`` of each run at bit ``j * bits``."""
    per = 32 // bits
    runs = codes.to(torch.int64).reshape(codes.shape[0] // per, per, codes.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((runs << shifts).sum(dim=1))


def _unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0] * per, packed.shape[1]).to(torch.uint8)


class GPTQInt32(PackedFormat):
    """The AutoGPTQ / GPTQModel checkpoint layout (``quant_method: gptq``, ``checkpoint_format: gptq``).

    ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension, input ``i``
    of word row ``i // (32/bits)`` at bit ``(i % (32/bits)) * bits``. ``qzeros`` int32
    ``[G, out * bits / 32]``: zero points packed the same way along the output dimension.
    ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]`` = group of each input (``i // group``).
    This v1 format (read by transformers/optimum, vLLM, TGI) stores ``zero - 1`` and kernels add the 1 back,
    so a zero point of 0 cannot be stored; ``GPTQv2Int32`` stores ``zero``.
    Dequantization: ``w[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``.
    """

    name = "gptq"
    offset: ClassVar[int] = 1  # stored zero point = zero - offset

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        out_f, in_f = codes.shape
        per = 32 // spec.bits
        if in_f % per or out_f % per:
            raise ValueError(f"GPTQ int32 packing needs in and out features divisible by {per}, got [{out_f}, {in_f}]")
        if cls.offset and bool((zeros == 0).any()):
            raise ValueError("a zero point of 0 cannot be stored in the v1 'gptq' format; use checkpoint_format gptq_v2")
        group = in_f // scales.shape[1]
        return {
            "qweight": _pack_int32(codes.t(), spec.bits),
            "qzeros": _pack_int32(zeros.to(torch.int64) - cls.offset, spec.bits).t().contiguous(),
            "scales": scales.t().to(torch.float16).contiguous(),
            "g_idx": torch.arange(in_f, dtype=torch.int32) // group,
        }

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        codes = _unpack_int32(tensors["qweight"], spec.bits).t().contiguous()
        zeros = _unpack_int32(tensors["qzeros"].t().contiguous(), spec.bits).to(torch.int64) + cls.offset
        return codes, tensors["scales"].t().contiguous(), zeros.to(torch.uint8).contiguous()

    @classmethod
    def dequantize(cls, tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """``[out, in]`` float32 weight, computed from the checkpoint tensors alone (via ``g_idx``)."""
        q = _unpack_int32(tensors["qweight"], bits).to(torch.float32)  # [in, out]
        zeros = _unpack_int32(tensors["qzeros"].t().contiguous(), bits).t().to(torch.float32) + cls.offset
        g = tensors["g_idx"].long()
        return ((q - zeros[g]) * tensors["scales"].to(torch.float32)[g]).t().contiguous()


class GPTQv2Int32(GPTQInt32):
    """``checkpoint_format: gptq_v2``: the same words, zero points stored as they are."""

    name = "gptq_v2"
    offset = 0


# ---------------------------------------------------------------- GGUF blocks (ggml-common.h)

def _split_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``codes [out, in]``, ``scales, zeros [out, in/block]`` -> ``[out, G, block]``, ``[out, G]``, ``[out, G]``."""
    out_f, in_f = codes.shape
    if in_f % block or scales.shape != (out_f, in_f // block) or zeros.shape != scales.shape:
        raise ValueError(f"GGUF blocks hold {block} weights each: codes {list(codes.shape)} need scales and "
                         f"zeros of shape [{out_f}, {in_f // block}], got {list(scales.shape)}, {list(zeros.shape)}")
    return codes.reshape(out_f, in_f // block, block), scales.to(torch.float16), zeros


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[out, G]`` float16 -> ``[out, G, 2]`` uint8, little endian (GGUF is little endian)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _fp16_from(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).reshape(raw.shape[:-1])


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[..., 32]`` codes -> ``[..., 16]`` bytes: element j in the low nibble, j + 16 in the high one."""
    return q[..., :16] | (q[..., 16:] << 4)


def _from_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


class _GGUFBlocks(PackedFormat):
    """A GGUF block type: rows of ``[out, in/32 * block bytes]`` uint8 (``blocks``), blocks along the input."""

    @classmethod
    def block_bytes(cls) -> int:
        ((_, size),) = SIZES[cls.name].values()
        return size

    @classmethod
    def _blocks(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raw = tensors["blocks"]
        return raw.reshape(raw.shape[0], -1, cls.block_bytes())


class GGUFQ4_0(_GGUFBlocks):
    """ggml ``block_q4_0``: fp16 ``d``, then 16 bytes of codes; value ``d * (q - 8)``.

    Exactly our symmetric int4 group 32 (zero point 8): ``d`` is our float16 scale, ``q`` our code.
    """

    name = "gguf_q4_0"

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        q, d, z = _split_blocks(codes, scales, zeros, 32)
        if bool((z != 8).any()):
            raise ValueError("Q4_0 stores symmetric int4 (zero point 8 in every block); use Q4_1 for asymmetric codes")
        return {"blocks": torch.cat((_fp16_bytes(d), _nibbles(q)), dim=-1).reshape(q.shape[0], -1)}

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        blocks = cls._blocks(tensors)
        d = _fp16_from(blocks[..., :2])
        codes = _from_nibbles(blocks[..., 2:]).reshape(blocks.shape[0], -1)
        return codes, d, torch.full(d.shape, 8, dtype=torch.uint8)


class GGUFQ4_1(_GGUFBlocks):
    """ggml ``block_q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of codes; value ``d * q + m``.

    Our asymmetric int4 group 32 is ``scale * (q - zero)``, so ``d = scale`` and ``m = -scale * zero``
    rounded to float16. ``scale * zero`` needs up to 15 significant bits and float16 has 11, so ``m``
    is exact only for some blocks: ``offset_error`` says how far off the rest are.
    """

    name = "gguf_q4_1"

    @staticmethod
    def offset(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return (-scales.to(torch.float32) * zeros.to(torch.float32)).to(torch.float16)

    @classmethod
    def offset_error(cls, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """``|m - (-scale * zero)|`` per block (0 where the offset is exact in float16)."""
        exact = -scales.to(torch.float64) * zeros.to(torch.float64)
        return (cls.offset(scales, zeros).to(torch.float64) - exact).abs()

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        q, d, z = _split_blocks(codes, scales, zeros, 32)
        if q.numel() and int(q.max()) > 15:
            raise ValueError("Q4_1 holds 4-bit codes; got a code above 15")
        raw = torch.cat((_fp16_bytes(d), _fp16_bytes(cls.offset(d, z)), _nibbles(q)), dim=-1)
        return {"blocks": raw.reshape(q.shape[0], -1)}

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        """-> codes, ``d``, and the zero point recovered as ``round(-m / d)``."""
        blocks = cls._blocks(tensors)
        d, m = _fp16_from(blocks[..., :2]), _fp16_from(blocks[..., 2:4])
        codes = _from_nibbles(blocks[..., 4:]).reshape(blocks.shape[0], -1)
        zeros = torch.round(-m.to(torch.float32) / d.to(torch.float32)).clamp(0, 15).to(torch.uint8)
        return codes, d, zeros


class GGUFQ8_0(_GGUFBlocks):
    """ggml ``block_q8_0``: fp16 ``d``, then 32 int8; value ``d * q``.

    Exactly our symmetric int8 group 32 (zero point 128): the int8 is ``code - 128``.
    """

    name = "gguf_q8_0"

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        q, d, z = _split_blocks(codes, scales, zeros, 32)
        if bool((z != 128).any()):
            raise ValueError("Q8_0 stores symmetric int8 (zero point 128 in every block)")
        signed = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        return {"blocks": torch.cat((_fp16_bytes(d), signed), dim=-1).reshape(q.shape[0], -1)}

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        blocks = cls._blocks(tensors)
        d = _fp16_from(blocks[..., :2])
        signed = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16)
        codes = (signed + 128).to(torch.uint8).reshape(blocks.shape[0], -1)
        return codes, d, torch.full(d.shape, 128, dtype=torch.uint8)


# ---------------------------------------------------------------- compressed-tensors pack-quantized

def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` unsigned codes -> ``[rows, ceil(cols * bits / 32)]`` int32, value ``i`` at bit ``i * bits``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"expected uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    rows, cols = codes.shape
    stream = ((codes.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(rows, cols * bits)  # LSB first
    words = -(-cols * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - stream.shape[1]))
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
    return _to_int32((stream.reshape(rows, words, 32).to(torch.int64) * weights).sum(-1))


def _unpack_stream(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """``[rows, words]`` int32 -> ``[rows, cols]`` unsigned codes."""
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    rows = packed.shape[0]
    if packed.shape[1] != -(-cols * bits // 32):
        raise ValueError(f"{packed.shape[1]} int32 words cannot hold {cols} values of {bits} bits")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    values = stream.reshape(rows, -1)[:, : cols * bits].reshape(rows, cols, bits)
    return (values << torch.arange(bits, dtype=torch.int64)).sum(-1).to(torch.uint8)


class CompressedTensorsPacked(PackedFormat):
    """compressed-tensors ``pack-quantized`` (``pack_to_int32``): ``bits``-bit values packed densely into
    int32, value ``i`` of a row at global bit ``i * bits`` (little endian, so 4-bit rows are the same
    bytes as ``ToolkitPacked``). compressed-tensors holds signed values ``v`` in ``[-2^(b-1), 2^(b-1) - 1]``
    and packs ``v + 2^(b-1)``; with ``v = q - 2^(b-1)`` and ``zero_point = zero - 2^(b-1)`` its
    ``(v - zero_point) * scale`` is our ``(q - zero) * scale``, and the packed words are our unsigned codes.
    ``weight_packed`` packs along the input dimension (``[out, ceil(in*b/32)]``), ``weight_zero_point``
    (asymmetric only: a symmetric zero point is ``2^(b-1)``) along the output one (``[ceil(out*b/32), G]``);
    ``weight_scale`` is stored in the dtype given, ``weight_shape`` is ``[out, in]``.
    """

    name = "compressed_tensors"

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        cls.check_bits(spec.bits)
        out = {"weight_packed": _pack_stream(codes, spec.bits), "weight_scale": scales.contiguous(),
               "weight_shape": torch.tensor(list(codes.shape))}
        if not spec.symmetric:
            out["weight_zero_point"] = _pack_stream(zeros.t().contiguous(), spec.bits).t().contiguous()
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Codes:
        out_f, in_f = shape
        codes = _unpack_stream(tensors["weight_packed"], spec.bits, in_f)
        if codes.shape[0] != out_f:
            raise ValueError(f"{codes.shape[0]} packed rows for {out_f} outputs")
        scales = tensors["weight_scale"]
        if spec.symmetric:
            zeros = torch.full(scales.shape, 2 ** (spec.bits - 1), dtype=torch.uint8)
        else:
            zeros = _unpack_stream(tensors["weight_zero_point"].t().contiguous(), spec.bits, out_f).t().contiguous()
        return codes, scales, zeros
