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

    def __init__(self, bits: int, checkpoint_format: str = "gptq") -> None:
        if bits not in (2, 4, 8):
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
