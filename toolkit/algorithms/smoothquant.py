"""SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): migrate activation outliers into the weights before W8A8.

Pure functions. For the linears sharing one input ``X`` (concatenated weights ``W: [out, in]``), the per-input-
channel factor ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (paper eq. 4) divides the activations and multiplies the
weights, ``Y = (X diag(s)⁻¹)(diag(s) Wᵀ)``, so the product is unchanged in float while the activations' channel
ranges even out (α = 0.5 splits the difficulty equally; larger α moves more of it into the weights).
"""

from __future__ import annotations

import torch

TINY = 1e-5  # floor of both maxima: a dead channel keeps s = 1 rather than 0 or infinity


def smoothing_scales(act_max: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s: [in]`` from ``act_max: [in]`` (max |x| per input channel over calibration) and ``w: [out, in]``."""
    w_max = w.float().abs().amax(dim=0)
    a = act_max.float()
    s = a.clamp(min=TINY).pow(alpha) / w_max.clamp(min=TINY).pow(1 - alpha)
    dead = (a <= 0) | (w_max <= 0)
    return torch.where(dead, torch.ones_like(s), s)
