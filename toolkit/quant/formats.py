"""Packed integer layouts, each a small class with ``pack``/``unpack`` that round-trip bit-exactly.

Our storage layout (``Int4``): unsigned 4-bit codes along the input dimension, two to a byte,
element ``2i`` in the low nibble and ``2i+1`` in the high nibble. This is the byte order of
onnxruntime's MatMulNBits and of ONNX's packed int4, so exporters copy bytes rather than repack.
"""

from __future__ import annotations

import torch


class Int4:
    """Two unsigned 4-bit codes per byte, low nibble first: ``[..., n] uint8 -> [..., n/2] uint8``."""

    bits = 4

    @staticmethod
    def pack(q: torch.Tensor) -> torch.Tensor:
        if q.dtype != torch.uint8:
            raise TypeError(f"Int4.pack expects uint8 codes, got {q.dtype}")
        if q.shape[-1] % 2:
            raise ValueError(f"Int4.pack needs an even last dimension, got {q.shape[-1]}")
        if q.numel() and int(q.max()) > 15:
            raise ValueError("Int4.pack got a code above 15")
        pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4)

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        low = packed & 0x0F
        high = packed >> 4
        return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class Int8:
    """One unsigned 8-bit code per byte (identity layout, kept for symmetry with ``Int4``)."""

    bits = 8

    @staticmethod
    def pack(q: torch.Tensor) -> torch.Tensor:
        if q.dtype != torch.uint8:
            raise TypeError(f"Int8.pack expects uint8 codes, got {q.dtype}")
        return q.clone()

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        return packed


# 2- and 3-bit codes are stored in the 4-bit layout (research settings; no size gain over int4).
LAYOUTS: dict[int, type[Int4] | type[Int8]] = {2: Int4, 3: Int4, 4: Int4, 8: Int8}


def layout_for(bits: int) -> type[Int4] | type[Int8]:
    try:
        return LAYOUTS[bits]
    except KeyError:
        raise ValueError(f"no packed storage for {bits}-bit codes; supported: {sorted(LAYOUTS)}") from None


def packed_width(bits: int, in_features: int) -> int:
    """Bytes per row of ``in_features`` codes stored in the layout of ``bits`` (two 4-bit codes to a byte)."""
    return in_features * layout_for(bits).bits // 8


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


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


class GPTQInt32:
    """The AutoGPTQ / GPTQModel checkpoint layout (``quant_method: gptq``), for ``bits`` in 2, 4, 8.

    ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension, input ``i``
    of word row ``i // (32/bits)`` at bit ``(i % (32/bits)) * bits``. ``qzeros`` int32
    ``[G, out * bits / 32]``: zero points packed the same way along the output dimension.
    ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]`` = group of each input (``i // group``).
    ``checkpoint_format`` ``"gptq"`` (v1, read by transformers/optimum, vLLM, TGI) stores ``zero - 1``
    and kernels add the 1 back, so a zero point of 0 cannot be stored; ``"gptq_v2"`` stores ``zero``.
    Dequantization: ``w[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``.
    """

    FORMATS = ("gptq", "gptq_v2")
    BITS = (2, 4, 8)  # widths that fill an int32 word exactly

    def __init__(self, bits: int, checkpoint_format: str = "gptq") -> None:
        if bits not in self.BITS:
            raise ValueError(f"the GPTQ int32 layout here supports 2, 4 or 8 bits, got {bits}")
        if checkpoint_format not in self.FORMATS:
            raise ValueError(f"checkpoint_format must be one of {self.FORMATS}, got {checkpoint_format!r}")
        self.bits, self.offset = bits, 1 if checkpoint_format == "gptq" else 0

    def pack(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
        """Our ``codes [out, in]``, ``scales, zeros [out, G]`` -> the four checkpoint tensors."""
        out_f, in_f = codes.shape
        per = 32 // self.bits
        if in_f % per or out_f % per:
            raise ValueError(f"GPTQ int32 packing needs in and out features divisible by {per}, got [{out_f}, {in_f}]")
        if self.offset and bool((zeros == 0).any()):
            raise ValueError("a zero point of 0 cannot be stored in the v1 'gptq' format; use checkpoint_format gptq_v2")
        group = in_f // scales.shape[1]
        return {
            "qweight": _pack_int32(codes.t(), self.bits),
            "qzeros": _pack_int32(zeros.to(torch.int64) - self.offset, self.bits).t().contiguous(),
            "scales": scales.t().to(torch.float16).contiguous(),
            "g_idx": torch.arange(in_f, dtype=torch.int32) // group,
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four checkpoint tensors -> our ``codes [out, in]``, ``scales [out, G]``, ``zeros [out, G]``."""
        codes = _unpack_int32(tensors["qweight"], self.bits).t().contiguous()
        zeros = _unpack_int32(tensors["qzeros"].t().contiguous(), self.bits).to(torch.int64) + self.offset
        return codes, tensors["scales"].t().contiguous(), zeros.to(torch.uint8).contiguous()

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[out, in]`` float32 weight, computed from the checkpoint tensors alone (via ``g_idx``)."""
        q = _unpack_int32(tensors["qweight"], self.bits).to(torch.float32)  # [in, out]
        zeros = _unpack_int32(tensors["qzeros"].t().contiguous(), self.bits).t().to(torch.float32) + self.offset
        g = tensors["g_idx"].long()
        return ((q - zeros[g]) * tensors["scales"].to(torch.float32)[g]).t().contiguous()


class MatMulNBitsLayout:
    """onnxruntime MatMulNBits weight ``B``: ``[N, K] codes -> [N, K/block, block*bits/8] uint8``.

    Within each block the codes are bit-packed along K exactly like ``Int4``/``Int8`` (low nibble first),
    so our ``QuantLinear.qweight [N, K/2]`` is the same bytes, only reshaped.
    Zero points (input 3) are packed the same way along the block axis: ``[N, ceil(blocks*bits/8)]``.
    """

    @staticmethod
    def pack(q: torch.Tensor, bits: int, block: int) -> torch.Tensor:
        n, k = q.shape
        if k % block:
            raise ValueError(f"MatMulNBits needs K ({k}) to be a multiple of the block size ({block})")
        packed = layout_for(bits).pack(q)
        return packed.reshape(n, k // block, block * bits // 8)

    @staticmethod
    def unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
        n = b.shape[0]
        return layout_for(bits).unpack(b.reshape(n, -1))

    @staticmethod
    def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
        """``[N, blocks] uint8 -> [N, ceil(blocks*bits/8)]``; an odd block count gets a zero high nibble."""
        if bits == 8:
            return zero.clone()
        n, blocks = zero.shape
        padded = torch.zeros(n, blocks + blocks % 2, dtype=torch.uint8)
        padded[:, :blocks] = zero
        return Int4.pack(padded)

    @staticmethod
    def unpack_zero_points(packed: torch.Tensor, bits: int, blocks: int) -> torch.Tensor:
        return packed.clone() if bits == 8 else Int4.unpack(packed)[:, :blocks]


class OnnxPacked4:
    """ONNX ``uint4`` tensor raw data: the flattened (row-major) codes two per byte, low nibble first,
    a final odd element padded with a zero high nibble (ONNX IR spec, "4-bit integer types")."""

    @staticmethod
    def pack(q: torch.Tensor) -> bytes:
        flat = q.reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat((flat, torch.zeros(1, dtype=torch.uint8)))
        return Int4.pack(flat).numpy().tobytes()

    @staticmethod
    def unpack(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for d in shape:
            count *= d
        packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return Int4.unpack(packed)[:count].reshape(shape)


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


class GGUFQ4_0:
    """ggml ``block_q4_0`` (ggml-common.h): fp16 ``d``, then 16 bytes of codes; value ``d * (q - 8)``.

    Exactly our symmetric int4 group 32 (zero point 8): ``d`` is our float16 scale, ``q`` our code.
    Rows are ``[out, in/32 * 18]`` bytes, blocks along the input dimension.
    """

    block, block_bytes = 32, 18

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        q, d, z = _split_blocks(codes, scales, zeros, cls.block)
        if bool((z != 8).any()):
            raise ValueError("Q4_0 stores symmetric int4 (zero point 8 in every block); use Q4_1 for asymmetric codes")
        raw = torch.cat((_fp16_bytes(d), _nibbles(q)), dim=-1)
        return raw.reshape(q.shape[0], -1)

    @classmethod
    def unpack(cls, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks = raw.reshape(raw.shape[0], -1, cls.block_bytes)
        d = _fp16_from(blocks[..., :2])
        codes = _from_nibbles(blocks[..., 2:]).reshape(raw.shape[0], -1)
        return codes, d, torch.full(d.shape, 8, dtype=torch.uint8)


class GGUFQ4_1:
    """ggml ``block_q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of codes; value ``d * q + m``.

    Our asymmetric int4 group 32 is ``scale * (q - zero)``, so ``d = scale`` and ``m = -scale * zero``
    rounded to float16. ``scale * zero`` needs up to 15 significant bits and float16 has 11, so ``m``
    is exact only for some blocks: ``offset_error`` says how far off the rest are.
    """

    block, block_bytes = 32, 20

    @staticmethod
    def offset(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return (-scales.to(torch.float32) * zeros.to(torch.float32)).to(torch.float16)

    @classmethod
    def offset_error(cls, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """``|m - (-scale * zero)|`` per block (0 where the offset is exact in float16)."""
        exact = -scales.to(torch.float64) * zeros.to(torch.float64)
        return (cls.offset(scales, zeros).to(torch.float64) - exact).abs()

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        q, d, z = _split_blocks(codes, scales, zeros, cls.block)
        if q.numel() and int(q.max()) > 15:
            raise ValueError("Q4_1 holds 4-bit codes; got a code above 15")
        raw = torch.cat((_fp16_bytes(d), _fp16_bytes(cls.offset(d, z)), _nibbles(q)), dim=-1)
        return raw.reshape(q.shape[0], -1)

    @classmethod
    def unpack(cls, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> codes, ``d``, and the zero point recovered as ``round(-m / d)``."""
        blocks = raw.reshape(raw.shape[0], -1, cls.block_bytes)
        d, m = _fp16_from(blocks[..., :2]), _fp16_from(blocks[..., 2:4])
        codes = _from_nibbles(blocks[..., 4:]).reshape(raw.shape[0], -1)
        zeros = torch.round(-m.to(torch.float32) / d.to(torch.float32)).clamp(0, 15).to(torch.uint8)
        return codes, d, zeros


class GGUFQ8_0:
    """ggml ``block_q8_0``: fp16 ``d``, then 32 int8; value ``d * q``.

    Exactly our symmetric int8 group 32 (zero point 128): the int8 is ``code - 128``.
    """

    block, block_bytes = 32, 34

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        q, d, z = _split_blocks(codes, scales, zeros, cls.block)
        if bool((z != 128).any()):
            raise ValueError("Q8_0 stores symmetric int8 (zero point 128 in every block)")
        signed = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        raw = torch.cat((_fp16_bytes(d), signed), dim=-1)
        return raw.reshape(q.shape[0], -1)

    @classmethod
    def unpack(cls, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks = raw.reshape(raw.shape[0], -1, cls.block_bytes)
        d = _fp16_from(blocks[..., :2])
        signed = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16)
        codes = (signed + 128).to(torch.uint8).reshape(raw.shape[0], -1)
        return codes, d, torch.full(d.shape, 128, dtype=torch.uint8)


class CompressedTensorsPacked:
    """compressed-tensors ``pack-quantized`` (``pack_to_int32``): ``bits``-bit values packed densely into
    int32, value ``i`` of a row at global bit ``i * bits`` (little endian, so 4-bit rows are the same
    bytes as ``Int4``). compressed-tensors holds signed values ``v`` in ``[-2^(b-1), 2^(b-1) - 1]`` and
    packs ``v + 2^(b-1)``; with ``v = q - 2^(b-1)`` and ``zero_point = zero - 2^(b-1)`` its
    ``(v - zero_point) * scale`` is our ``(q - zero) * scale``, and the packed words are our unsigned codes.
    Weights pack along the input dimension (``[out, ceil(in*b/32)]``), zero points along the output one
    (``[ceil(out*b/32), G]``).
    """

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"pack-quantized holds 1 to 8 bits, got {bits}")
        self.bits = bits

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``[rows, cols]`` unsigned codes -> ``[rows, ceil(cols * bits / 32)]`` int32."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"expected uint8 codes, got {codes.dtype}")
        if codes.numel() and int(codes.max()) >= 2**self.bits:
            raise ValueError(f"a code does not fit in {self.bits} bits")
        rows, cols = codes.shape
        bits = (codes.unsqueeze(-1) >> torch.arange(self.bits, dtype=torch.uint8)) & 1  # [rows, cols, b], LSB first
        stream = bits.reshape(rows, cols * self.bits)
        words = -(-cols * self.bits // 32)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - stream.shape[1]))
        weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
        return _to_int32((stream.reshape(rows, words, 32).to(torch.int64) * weights).sum(-1))

    def unpack(self, packed: torch.Tensor, cols: int) -> torch.Tensor:
        """``[rows, words]`` int32 -> ``[rows, cols]`` unsigned codes."""
        if packed.dtype != torch.int32:
            raise TypeError(f"expected int32 words, got {packed.dtype}")
        rows = packed.shape[0]
        if packed.shape[1] != -(-cols * self.bits // 32):
            raise ValueError(f"{packed.shape[1]} int32 words cannot hold {cols} values of {self.bits} bits")
        words = packed.to(torch.int64) & 0xFFFFFFFF
        stream = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
        bits = stream.reshape(rows, -1)[:, : cols * self.bits].reshape(rows, cols, self.bits)
        return (bits << torch.arange(self.bits, dtype=torch.int64)).sum(-1).to(torch.uint8)

    def pack_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        """``[out, G]`` zero points -> ``[ceil(out * bits / 32), G]`` int32 (packed along the output dimension)."""
        return self.pack(zeros.t().contiguous()).t().contiguous()

    def unpack_zeros(self, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        return self.unpack(packed.t().contiguous(), out_features).t().contiguous()
