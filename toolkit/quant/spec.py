"""What quantization a linear gets: its weights (``QuantSpec``) and, optionally, its input activations
(``ActivationSpec``), together one ``QuantScheme``, each checked once. Modelled on compressed-tensors'
``QuantizationScheme`` / ``QuantizationArgs`` (``toolkit.interop.compressed_tensors`` maps one to the other).

Weight convention everywhere (RTN, GPTQ, AWQ, exporters): unsigned codes ``q`` in ``[0, 2^bits - 1]``,
one scale and one integer zero point per group of ``group_size`` consecutive input channels,
``w ≈ (q - zero) * scale``. Symmetric quantization fixes ``zero = 2^(bits-1)`` and
``scale = absmax / (2^(bits-1) - 1)`` (int4: absmax/7, codes 1..15 used), the format
onnxruntime's MatMulNBits uses with its default zero point 8. The arithmetic is ``toolkit.quant.arithmetic``,
reachable from a spec as ``spec.qparams``, ``spec.quantize``, ``spec.rtn`` and ``spec.dequantize``.

Float weights (fp8 e4m3, one scale per output channel, or per tensor with ``strategy: tensor``) and quantized
input activations (int8 or fp8 e4m3, dynamic per token or static per tensor, symmetric) are run by ``rtn`` and ``gptq`` (``QuantScheme.runnable`` says which) and computed
by ``toolkit.quant.modules``; ``QuantScheme.weight_only`` is the one place a consumer that computes with float
activations and integer codes (GGUF, ONNX, the GPTQ export) refuses the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from toolkit.errors import ToolkitError
from toolkit.quant import arithmetic

if TYPE_CHECKING:
    import torch

QuantType = Literal["int", "float"]
# group: one scale per group_size input channels of a row (group_size -1: per output channel);
# tensor: one scale for the whole matrix (fp8 only: ModelOpt FP8, compressed-tensors' FP8 preset)
WeightStrategy = Literal["group", "tensor"]
ActivationStrategy = Literal["token", "tensor"]

SUPPORTED_BITS = (2, 3, 4, 8)  # integer weights
FLOAT_BITS = (8,)  # float weights and activations: fp8 e4m3
ACTIVATION_BITS = (8,)  # int8 or fp8 e4m3


def _check_type(value: object, where: str) -> None:
    if value not in get_args(QuantType):
        raise ValueError(f"{where} type must be 'int' or 'float' (fp8 e4m3), got {value!r}")


@dataclass(frozen=True)
class QuantSpec:
    """The weights' part of a scheme (compressed-tensors' ``weights`` args): group strategy, channel
    (``group_size: -1``, one group per whole row), or tensor (``strategy: tensor``, fp8 weights only)."""

    bits: int = 4
    group_size: int = 32  # -1: one group per whole row
    symmetric: bool = True
    type: QuantType = "int"
    strategy: WeightStrategy = "group"

    def __post_init__(self) -> None:
        _check_type(self.type, "weight")
        if self.strategy not in get_args(WeightStrategy):
            raise ValueError(f"weight strategy must be 'group' or 'tensor', got {self.strategy!r}")
        if self.strategy == "tensor" and (self.type != "float" or self.group_size != -1):
            raise ValueError("one weight scale per tensor (strategy: tensor) is for fp8 weights: use type: float and "
                             f"group_size: -1, or strategy: group; got type {self.type}, group_size {self.group_size}")
        if self.type == "int" and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.type == "float" and (self.bits not in FLOAT_BITS or not self.symmetric):
            raise ValueError(f"float weights are fp8 e4m3: bits 8 and symmetric, got bits {self.bits}, "
                             f"symmetric {self.symmetric}")
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, or -1 for whole rows; got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max scales and zero points per group of ``w: [out, in]``."""
        return arithmetic.compute_qparams(w, self)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes of ``w: [out, in]`` against per-group ``scale, zero: [out, G]``."""
        return arithmetic.quantize(w, scale, zero, self)

    def rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round-to-nearest ``(codes, scales, zeros)`` of ``w: [out, in]``."""
        return arithmetic.rtn_quantize(w, self)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``(q - zero) * scale`` for codes ``q: [out, in]``."""
        return arithmetic.dequantize(q, scale, zero, self.group(q.shape[1]))

    @property
    def per_tensor(self) -> bool:
        return self.strategy == "tensor"

    def to_dict(self) -> dict[str, Any]:
        """The record a packed checkpoint stores per module; integer weights keep today's three keys, per-channel
        fp8 adds ``type``, per-tensor fp8 ``strategy`` too."""
        d: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.type != "int":
            d["type"] = self.type
        return {**d, "strategy": self.strategy} if self.per_tensor else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(**_known(cls, d, required=("bits", "group_size", "symmetric")))


@dataclass(frozen=True)
class ActivationSpec:
    """The input activations' part of a scheme (compressed-tensors' ``input_activations`` args): int8 or
    fp8 e4m3, scales computed per call (``dynamic``) or calibrated once (static), per token or per tensor."""

    type: QuantType = "int"
    bits: int = 8
    strategy: ActivationStrategy = "token"
    dynamic: bool = True
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_type(self.type, "activation")
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"activations are int8 or fp8 e4m3: bits must be 8, got {self.bits}")
        if self.strategy not in get_args(ActivationStrategy):
            raise ValueError(f"activation strategy must be 'token' or 'tensor', got {self.strategy!r}")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("per-token activation scales are computed per call: use dynamic: true, "
                             "or strategy: tensor for a static (calibrated) scale")
        if self.type == "float" and not self.symmetric:
            raise ValueError("fp8 activations are symmetric (no zero point): use symmetric: true")

    @property
    def name(self) -> str:
        kind = "int8" if self.type == "int" else "fp8 e4m3"
        return f"{kind} {'dynamic' if self.dynamic else 'static'} per-{self.strategy}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActivationSpec:
        return cls(**_known(cls, d, required=()))


@dataclass(frozen=True)
class QuantScheme:
    """Weights and, optionally, input activations (None: weight-only, computed in float)."""

    weights: QuantSpec = QuantSpec()
    input_activations: ActivationSpec | None = None

    @property
    def name(self) -> str:
        """compressed-tensors' preset naming: W4A16, W8A8, W4AFP8, WFP8AFP8 ..."""
        w, a = self.weights, self.input_activations
        weights = "FP8" if w.type == "float" else str(w.bits)
        acts = "16" if a is None else "FP8" if a.type == "float" else str(a.bits)
        return f"W{weights}A{acts}"

    def runnable(self, consumer: str) -> QuantSpec:
        """The weight spec, for ``consumer`` (a pass) whose model computes with quantized input activations
        (``toolkit.quant.modules``); refuses what those modules do not compute: asymmetric activations, or grouped
        fp8 weights (fp8 has one scale per output channel or per tensor)."""
        w, a = self.weights, self.input_activations
        if a is not None and not a.symmetric:
            raise ToolkitError(f"{consumer} quantizes input activations symmetrically (no zero point), as vLLM's "
                               "int8 and fp8 kernels read them: use symmetric: true in input_activations")
        if w.type == "float" and w.group_size != -1:
            raise ToolkitError(f"fp8 weights have one scale per output channel: use group_size: -1, not {w.group_size} "
                               "(with strategy: tensor for one scale per tensor)")
        return w

    def weight_only(self, consumer: str) -> QuantSpec:
        """The integer weight spec, for ``consumer`` (a pass or an export) that computes with float activations
        and integer codes; refuses a scheme it cannot run rather than run part of it."""
        if self.input_activations is not None:
            raise ToolkitError(f"{consumer} quantizes weights only; this {self.name} scheme also quantizes input "
                               f"activations ({self.input_activations.name}), which it does not run: "
                               "drop input_activations (rtn and gptq run them, export_compressed_tensors holds them)")
        if self.weights.type != "int":
            raise ToolkitError(f"{consumer} writes integer codes; this scheme holds fp8 weights: use integer "
                               "weights (type: int) (rtn and gptq round fp8 weights, export_compressed_tensors holds them)")
        return self.weights

    def to_dict(self) -> dict[str, Any]:
        """The weights' keys, and ``input_activations`` only when there are some (weight-only records are
        unchanged)."""
        d = self.weights.to_dict()
        return d if self.input_activations is None else {**d, "input_activations": self.input_activations.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        acts = d.get("input_activations")
        if acts is not None and not isinstance(acts, dict):
            raise ValueError(f"input_activations must be a mapping or null, got {acts!r}")
        weights = {k: v for k, v in d.items() if k != "input_activations"}
        return cls(QuantSpec.from_dict(weights), None if acts is None else ActivationSpec.from_dict(acts))


@dataclass(frozen=True)
class KVCacheSpec:
    """A quantized KV cache (compressed-tensors' ``kv_cache_scheme``): keys (after RoPE) and values stored as fp8 e4m3
    with one static scale per tensor and attention layer, ``k_scale`` / ``v_scale`` (vLLM's ``kv_cache_dtype="fp8"``
    reads them). The one scheme vLLM's fp8 cache and ModelOpt's ``kv_cache_quant_algo: FP8`` both hold."""

    type: Literal["float"] = "float"
    bits: int = 8
    strategy: Literal["tensor"] = "tensor"

    def __post_init__(self) -> None:
        if self.type != "float" or self.bits != 8 or self.strategy != "tensor":
            raise ValueError(f"the KV cache is fp8 e4m3 with one scale per tensor: use type: float, bits: 8 "
                             f"(strategy: tensor); got type {self.type!r}, bits {self.bits!r}, strategy {self.strategy!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVCacheSpec:
        return cls(**_known(cls, d, required=("type", "bits")))


def _known(cls: type, d: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """``d`` checked against ``cls``'s fields: no unknown keys, none of ``required`` missing."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    missing = [k for k in required if k not in d]
    if unknown or missing:
        raise ValueError(f"a {cls.__name__} record has keys {', '.join(names)}; "
                         f"unknown {unknown}, missing {missing}")
    return dict(d)


def valid_group_sizes(in_dims: list[int]) -> list[int]:
    """Group sizes (>= 8, even) that divide every input dimension, largest last."""
    g = 0
    for d in in_dims:
        g = math.gcd(g, d)
    return [s for s in range(8, g + 1) if g % s == 0 and s % 2 == 0]
