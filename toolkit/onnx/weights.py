"""Reading weights out of a (possibly quantized) PyTorch decoder as numpy arrays for the ONNX graph.

A linear is either float (``weight [N, K]``) or quantized (our ``QuantLinear``: codes, scales, zero points).
Nothing is re-quantized: codes are copied, scales widened from float16 to float32 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from toolkit.errors import ToolkitError
from toolkit.quant.formats import ToolkitPacked
from toolkit.quant.modules import QuantEmbedding, QuantLinear, reads_head
from toolkit.quant.spec import ActivationSpec, QuantSpec


@dataclass
class LinearWeight:
    """One linear ``y = x Wᵀ + b`` with ``W [N, K]``, float or quantized per group of ``group`` inputs.

    A quantized one holds its codes packed as ``QuantLinear`` stores them (``qweight``: two 4-bit codes a byte
    along K for <= 4 bits, one byte each at 8), which are MatMulNBits' ``B`` bytes row for row: the exporter
    writes them in row blocks without unpacking (a 128k-row head is never held twice)."""

    n: int
    k: int
    weight: np.ndarray | None = None  # float32 [N, K]
    qweight: torch.Tensor | None = None  # uint8 [N, K/2] (<= 4 bits) or [N, K] (8 bits)
    scales: np.ndarray | None = None  # float32 [N, G]
    zeros: np.ndarray | None = None  # uint8 [N, G]
    bits: int = 0
    group: int = 0
    bias: np.ndarray | None = None  # float32 [N]
    act: ActivationSpec | None = None  # input activations quantized (W8A8, ``graph.w8a8_linear``), None: float
    input_scale: float | None = None  # the calibrated per-tensor scale of a static ``act``

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: np.ndarray, zeros: np.ndarray, bits: int, group: int,
                   bias: np.ndarray | None = None) -> LinearWeight:
        n, k = codes.shape
        return cls(n=n, k=k, qweight=ToolkitPacked.pack_codes(codes, bits), scales=scales, zeros=zeros, bits=bits,
                   group=group, bias=bias)

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    @property
    def spec(self) -> QuantSpec:
        """The quantization of a quantized weight (a group spanning K is a whole-row group)."""
        return QuantSpec(self.bits, -1 if self.group == self.k else self.group)

    @property
    def codes(self) -> torch.Tensor | None:
        """Unpacked codes ``[N, K]`` in ``[0, 2^bits - 1]`` (a new tensor each call)."""
        return None if self.qweight is None else ToolkitPacked.unpack_codes(self.qweight, self.bits)


def linear_weight(module: nn.Module) -> LinearWeight:
    bias = getattr(module, "bias", None)
    b = None if bias is None else bias.detach().float().numpy()
    if isinstance(module, QuantLinear):
        return LinearWeight(
            n=module.out_features, k=module.in_features, qweight=module.qweight,
            scales=module.scales.float().numpy(), zeros=module.qzeros.numpy().copy(),
            bits=module.spec.bits, group=module.spec.group(module.in_features), bias=b, act=module.act,
            input_scale=float(module.input_scale) if module.act is not None and not module.act.dynamic else None,
        )
    if isinstance(module, nn.Linear):
        w = module.weight.detach().float().numpy()
        return LinearWeight(n=w.shape[0], k=w.shape[1], weight=w, bias=b)
    raise ToolkitError(f"cannot export a {type(module).__name__} as a linear layer; only nn.Linear and QuantLinear")


def concat_rows(parts: list[LinearWeight]) -> LinearWeight | None:
    """Stack linears that read the same input (q, k, v) into one ``[sum N, K]`` linear, or None if formats differ."""
    first = parts[0]
    same = all(p.quantized == first.quantized and p.bits == first.bits and p.group == first.group
               and p.act == first.act and p.input_scale == first.input_scale for p in parts)
    if not same or any((p.bias is None) != (first.bias is None) for p in parts):
        return None
    bias = None if first.bias is None else np.concatenate([p.bias for p in parts])  # type: ignore[misc]
    n = sum(p.n for p in parts)
    if not first.quantized:
        return LinearWeight(n=n, k=first.k, weight=np.concatenate([p.weight for p in parts]), bias=bias)  # type: ignore[misc]
    return LinearWeight(
        n=n, k=first.k, qweight=torch.cat([p.qweight for p in parts]),  # type: ignore[misc]
        scales=np.concatenate([p.scales for p in parts]), zeros=np.concatenate([p.zeros for p in parts]),  # type: ignore[misc]
        bits=first.bits, group=first.group, bias=bias, act=first.act, input_scale=first.input_scale,
    )


def split_rows(w: LinearWeight, sizes: list[int]) -> list[LinearWeight]:
    """A linear's consecutive row ranges (``sizes`` summing to N) as linears of their own: Phi-3's stored
    gate_up as gate and up (the inverse of ``concat_rows``)."""
    if sum(sizes) != w.n:
        raise ToolkitError(f"cannot split a linear of {w.n} rows into {sizes}")
    edges = np.cumsum([0, *sizes])
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        rows = slice(int(lo), int(hi))
        parts.append(replace(
            w, n=int(hi - lo), weight=None if w.weight is None else w.weight[rows],
            qweight=None if w.qweight is None else w.qweight[rows],
            scales=None if w.scales is None else w.scales[rows], zeros=None if w.zeros is None else w.zeros[rows],
            bias=None if w.bias is None else w.bias[rows]))
    return parts


def embedding_source(model: nn.Module, head_name: str) -> LinearWeight | torch.Tensor:
    """The head's weight when the embedding reads its rows (tied), else the embedding table ``[V, H]`` as the
    model holds it (its own dtype, not copied: the exporter converts it in row blocks)."""
    embed = model.get_input_embeddings()
    head = model.get_submodule(head_name)
    if isinstance(embed, QuantEmbedding):
        return linear_weight(embed.weight_source)
    if isinstance(embed, nn.Embedding):
        if reads_head(model, head_name):
            return linear_weight(head)
        return embed.weight.detach()
    raise ToolkitError(f"cannot export input embedding of type {type(embed).__name__}")


def row_blocks(w: LinearWeight) -> LinearWeight:
    """A whole-row (per-channel) quantized weight as blocks of the largest power of two >= 16 dividing K, its scale
    and zero point repeated in each block: the same numbers in a shape MatMulNBits / GatherBlockQuantized take
    (their block is a power of two; SmolLM2's K = 576 runs as 9 blocks of 64). The packed bytes are unchanged:
    codes run along K either way. Any other weight is returned as it is."""
    if not w.quantized or w.group != w.k or w.k & (w.k - 1) == 0:
        return w
    block = w.k & -w.k  # the largest power of two dividing K
    if block < 16:
        return w
    repeat = w.k // block
    return replace(w, group=block, scales=np.repeat(w.scales, repeat, axis=1),  # type: ignore[arg-type]
                   zeros=np.repeat(w.zeros, repeat, axis=1))  # type: ignore[arg-type]


def nibble_planes(w: LinearWeight) -> tuple[LinearWeight, LinearWeight]:
    """An 8-bit linear as two exact 4-bit ones: ``s(q - z) = 16s(q_hi - z_hi) + s(q_lo - z_lo)``.

    With ``q = 16 q_hi + q_lo`` and ``z = 16 z_hi + z_lo`` the identity holds term by term, and ``16 s`` is exact in
    float16. onnxruntime's CPU MatMulNBits has a float-activation kernel for 4 bits but not for 8 (it dequantizes the
    whole matrix on every call), so an exact export of an int8 head runs as these two planes: the same bytes, and
    logits equal to the int8 product up to float summation order.
    """
    if w.bits != 8 or w.qweight is None or w.zeros is None or w.scales is None:
        raise ToolkitError("nibble_planes splits an 8-bit quantized linear")
    q, z = w.qweight, w.zeros  # 8-bit storage: one code a byte
    hi = LinearWeight.from_codes(q >> 4, w.scales * 16, z >> 4, bits=4, group=w.group, bias=w.bias)
    lo = LinearWeight.from_codes(q & 15, w.scales.copy(), z & 15, bits=4, group=w.group)
    return hi, lo
