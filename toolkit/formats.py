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
