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
