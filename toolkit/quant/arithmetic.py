"""The packed format's arithmetic: per-group scales and zero points (min/max, round to nearest), codes, and their
dequantization, ``w ≈ (q - zero) * scale``.

Scales are stored as float16; codes are always computed against the float16-rounded scale so the
stored model is exactly what was evaluated. Conventions in ``toolkit.quant.spec``;
integer weights only (``spec.type == "int"``): fp8 weights have no codes and zero points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from toolkit.errors import ToolkitError

if TYPE_CHECKING:  # the spec imports this module: its methods are this arithmetic
    from toolkit.quant.spec import QuantSpec


def _integer(spec: QuantSpec) -> None:
    if spec.type != "int":
        raise ToolkitError(f"integer codes were asked of {spec.type} weights ({spec}); fp8 weights have no "
                           "integer arithmetic yet: use type: int")


def fp16_representable(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (storage dtype), never to zero or infinity."""
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny, max=torch.finfo(torch.float16).max).to(torch.float16).to(torch.float32)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points per group. ``w: [out, in]`` -> scales, zeros ``[out, G]``."""
    _integer(spec)
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, spec.groups(in_f), spec.group(in_f))
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = wg.abs().amax(dim=-1) / (half - 1)
        scale = fp16_representable(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zero
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = fp16_representable(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.round(-lo / scale).clamp(0, spec.qmax).to(torch.uint8)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes for ``w: [out, in]`` given per-group ``scale, zero: [out, G]`` -> ``uint8 [out, in]``."""
    _integer(spec)
    group = spec.group(w.shape[1])
    s = scale.repeat_interleave(group, dim=1)
    z = zero.to(torch.float32).repeat_interleave(group, dim=1)
    return torch.round(w.float() / s + z).clamp(0, spec.qmax).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``(q - zero) * scale`` with per-group parameters broadcast over ``group`` input channels."""
    out_f, in_f = q.shape
    qg = q.reshape(out_f, in_f // group, group).to(torch.float32)
    w = (qg - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scales, zeros)`` for ``w: [out, in]``."""
    scale, zero = compute_qparams(w, spec)
    return quantize(w, scale, zero, spec), scale, zero


# ---------------------------------------------------------------- fp8 weights and quantized input activations

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_TOP_STEP = 32.0  # e4m3's step between 256 and 448
INT8_MAX = 127.0


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 weights: ``w: [out, in]`` -> ``(w8 [out, in], scale)``, ``w ≈ w8 · scale``. By default one float32
    scale per output row (``[out, 1]``, ``absmax / 448``: compressed-tensors' channel strategy); a given ``scale``
    (``[1, 1]``: one per tensor, as ModelOpt FP8 and compressed-tensors' tensor strategy hold it, possibly shared by
    fused linears) is used as it is."""
    if scale is None:
        scale = fp8_weight_scale(w)
    return fp8_codes(w, scale), scale


def fp8_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """One float32 scale per output row of ``w: [out, in]``: ``absmax / 448`` (1 for an all-zero row) ``[out, 1]``
    (of ``absmax.reshape(1, 1)``: the one scale of a tensor whose largest magnitude is ``absmax``)."""
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


# per-row multipliers of absmax / 448 that fp8_searched_scale tries (1 among them: never worse than absmax)
FP8_SCALE_MULTIPLIERS = tuple(round(0.8 + i / 100, 2) for i in range(46))  # 0.80 ... 1.25


def fp8_searched_scale(w: torch.Tensor, importance: torch.Tensor,
                       multipliers: tuple[float, ...] = FP8_SCALE_MULTIPLIERS) -> torch.Tensor:
    """One float32 scale per output row of ``w: [out, in]`` (``[out, 1]``): ``m · absmax / 448`` with the multiplier
    ``m`` that minimises the row's weighted rounding error ``Σ_j importance_j (w_j − ŵ_j)²`` (``importance: [in]``,
    GPTQ's ``diag H``). e4m3 steps are relative, so a different scale moves every weight to another place between
    its grid points; below 1 the largest weights saturate at 448 (llm-compressor's mse observer searches such
    shrunk ranges, unweighted). The first of equal errors is kept (1 before the larger multipliers)."""
    base = fp8_weight_scale(w)
    wf, imp = w.float(), importance.float()
    best, best_err = base, ((wf - fp8_codes(wf, base).float() * base) ** 2 * imp).sum(1, keepdim=True)
    for m in multipliers:
        scale = base * m
        err = ((wf - fp8_codes(wf, scale).float() * scale) ** 2 * imp).sum(1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def fp8_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``w / scale`` (``scale`` broadcast over ``w``'s columns): the cast rounds to nearest even,
    saturating at ±448, as compressed-tensors' fp8 quantizer and vLLM's cast do."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_dequantize(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.to(torch.float32) * scale.to(torch.float32)


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest and back, integer or fp8: the weight ``w: [out, in]`` a model quantized by ``spec``
    computes with (float32)."""
    if spec.type == "float":
        scale = fp8_weight_scale(w.abs().amax().reshape(1, 1)) if spec.per_tensor else None
        return fp8_dequantize(*fp8_quantize(w, scale))
    codes, scale, zero = rtn_quantize(w, spec)
    return dequantize(codes, scale, zero, spec.group(w.shape[1]))


def fake_quantize_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """``w: [out, in]`` rounded to its codes against ``scale`` (and ``zero``: integer weights) and back, as
    quantization-aware training computes it: the forward values are exactly the stored codes' dequantization
    (``fp8_codes`` · scale, ``dequantize(quantize(...))``); the rounding's gradient passes straight through to ``w``
    where ``w / scale`` rounds to a code of the grid (1; 0 beyond half a step past its ends, where it clamps) and to
    ``scale`` as LSQ's (Esser et al. 2020: ``round(w/s) - w/s`` inside, the end code outside).
    ``scale`` is ``[out, 1]`` or ``[1, 1]`` for fp8 weights, ``[out, G]`` per group for integer ones."""
    if spec.type == "float":
        v = w / scale
        q = fp8_codes(w.detach(), scale.detach()).to(torch.float32)
        inside = v.detach().abs() < FP8_MAX + FP8_TOP_STEP / 2
        return (q + (v - v.detach()) * inside) * scale
    if zero is None:
        raise ToolkitError("integer weights need their zero points to round to")
    group = spec.group(w.shape[1])
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.to(torch.float32).repeat_interleave(group, dim=1)
    v = w / s + z
    q = quantize(w.detach(), scale.detach(), zero, spec).to(torch.float32)
    inside = (v.detach() > -0.5) & (v.detach() < spec.qmax + 0.5)
    return (q + (v - v.detach()) * inside - z) * s


def activation_range(kind: str) -> float:
    """The largest code of an activation type: int8 symmetric 127, fp8 e4m3 448."""
    return INT8_MAX if kind == "int" else FP8_MAX


def activation_scale(absmax: torch.Tensor, kind: str) -> torch.Tensor:
    """Symmetric scale(s) ``absmax / range`` (never zero: an all-zero input keeps scale 1)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / activation_range(kind), torch.ones_like(absmax))


def fake_quantize_activations(x: torch.Tensor, kind: str, strategy: str, scale: torch.Tensor | None) -> torch.Tensor:
    """Input activations ``x: [..., in]`` quantized and dequantized, as the deployed kernel sees them: int8
    (round, clamp to [-128, 127]) or fp8 e4m3 (cast, saturating at ±448), symmetric; ``scale`` is the static
    per-tensor scale, None computes it per call (per token: one scale per row of ``x``, or per tensor)."""
    xf = x.float()
    if scale is None:
        absmax = xf.abs().amax(dim=-1, keepdim=True) if strategy == "token" else xf.abs().amax()
        scale = activation_scale(absmax, kind)
    if kind == "int":
        q = torch.round(xf / scale).clamp(-INT8_MAX - 1, INT8_MAX)
    else:
        q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float32)
    return (q * scale).to(x.dtype)
