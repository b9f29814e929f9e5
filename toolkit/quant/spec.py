"""What a quantized weight is: bits, group size and symmetry, checked once.

Convention everywhere (RTN, GPTQ, AWQ, exporters): unsigned codes ``q`` in ``[0, 2^bits - 1]``,
one scale and one integer zero point per group of ``group_size`` consecutive input channels,
``w ≈ (q - zero) * scale``. Symmetric quantization fixes ``zero = 2^(bits-1)`` and
``scale = absmax / (2^(bits-1) - 1)`` (int4: absmax/7, codes 1..15 used), the format
onnxruntime's MatMulNBits uses with its default zero point 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 32  # -1: one group per whole row
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, or -1 for whole rows; got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def valid_group_sizes(in_dims: list[int]) -> list[int]:
    """Group sizes (>= 8, even) that divide every input dimension, largest last."""
    g = 0
    for d in in_dims:
        g = math.gcd(g, d)
    return [s for s in range(8, g + 1) if g % s == 0 and s % 2 == 0]
