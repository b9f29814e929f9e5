"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware per-input-channel scaling and clipping.

Pure functions. The search objective is the output error of the linears that share one input,
``‖X Wᵀ - (X/s) Q(W·diag(s))ᵀ‖²`` (paper eq. 4), evaluated exactly from the second moment
``C = XᵀX / n: [in, in]``: with ``ΔW = W - Q(W·diag(s))·diag(s)⁻¹`` the mean squared output error is
``Σ_rows ΔW C ΔWᵀ / out``. So the search needs only running statistics (``C`` and ``mean |x|``),
never the stored activations, and it sees every calibration token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.quant.arithmetic import fake_quantize_weight
from toolkit.quant.spec import QuantSpec


@dataclass(frozen=True)
class ScaleResult:
    scales: torch.Tensor  # [in] per-input-channel s (multiply W's columns, divide X)
    alpha: float  # the chosen exponent, s = s_x^alpha (normalised)
    error: float  # output MSE with the chosen scales
    baseline: float  # output MSE at alpha = 0 (plain round-to-nearest)


def output_error(dw: torch.Tensor, c: torch.Tensor) -> float:
    """Mean squared output error ``tr(ΔW C ΔWᵀ) / out`` per token for ``dw: [out, in]``, ``c: [in, in]``."""
    return float(((dw @ c) * dw).sum() / dw.shape[0])


def channel_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_x^alpha`` normalised by ``sqrt(max · min)`` so the scales straddle 1 (AWQ sec. 3.2)."""
    s = act_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scales(w: torch.Tensor, act_mean: torch.Tensor, c: torch.Tensor, spec: QuantSpec, grid: int = 20) -> ScaleResult:
    """Grid search of ``alpha`` in ``[0, 1)`` for ``w: [out, in]`` (linears sharing one input, concatenated).

    ``act_mean: [in]`` is mean |x| per channel, ``c: [in, in]`` the second moment of the input.
    ``alpha = 0`` (s = 1) is in the grid, so the result is never worse than round-to-nearest.
    """
    w = w.float()
    best: tuple[float, float, torch.Tensor] | None = None
    baseline = 0.0
    for i in range(grid):
        alpha = i / grid
        s = channel_scales(act_mean.float(), alpha)
        err = output_error(w - fake_quantize_weight(w * s, spec) / s, c)
        if i == 0:
            baseline = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return ScaleResult(best[2], best[1], best[0], baseline)


def search_clip(w: torch.Tensor, c: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clipping ratio in ``(1 - max_shrink, 1]`` minimising each group's output error.

    Returns ``ratio: [out, G]``. The error of one (row, group) is ``δᵀ C_g δ`` with ``C_g`` the
    diagonal block of ``c`` for the group's input channels (AWQ's weight-clipping search).
    """
    w = w.float()
    out_f, in_f = w.shape
    gs, n_groups = spec.group(in_f), spec.groups(in_f)
    cg = torch.stack([c[g * gs : (g + 1) * gs, g * gs : (g + 1) * gs] for g in range(n_groups)])  # [G, gs, gs]
    best_err = torch.full((out_f, n_groups), float("inf"))
    best_ratio = torch.ones(out_f, n_groups)
    for i in range(int(max_shrink * grid)):
        ratio = 1 - i / grid
        dw = (w - fake_quantize_weight(clip_weight(w, torch.full((out_f, n_groups), ratio), spec), spec))
        dwg = dw.reshape(out_f, n_groups, gs)
        err = torch.einsum("ogi,gij,ogj->og", dwg, cg, dwg)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def clip_weight(w: torch.Tensor, ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Clamp each group of ``w: [out, in]`` to ``ratio: [out, G]`` times its range (symmetric: ±absmax)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, spec.groups(in_f), spec.group(in_f))
    r = ratio.unsqueeze(-1)
    if spec.symmetric:
        hi = wg.abs().amax(dim=-1, keepdim=True) * r
        lo = -hi
    else:
        hi = wg.amax(dim=-1, keepdim=True).clamp(min=0) * r
        lo = wg.amin(dim=-1, keepdim=True).clamp(max=0) * r
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(out_f, in_f)
