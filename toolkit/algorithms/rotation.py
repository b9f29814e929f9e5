"""An orthogonal rotation of the residual stream fitted to the error fp8 input rounding adds to the linears that
read it (pure math on second moments).

Rounding each input element to e4m3 adds an error of roughly constant relative size ε, so a linear ``y = x Wᵀ``
reading ``x R`` (weights ``W R``) gets ``E‖Δy‖² ≈ ε² Σ_i (RᵀHR)_ii (RᵀCR)_ii`` with ``H = E[x xᵀ]`` its input's
second moment and ``C = WᵀW``, against ``E‖y‖² = tr(HC)``, which no rotation changes. The fit minimizes the sum of
that ratio over the groups of linears sharing an input (Adam on a Cayley parametrization ``R = (I + A)⁻¹(I - A)``,
``A`` skew). Random rotations (QuaRot's Hadamard) raise it on SmolLM2: its large activation channels meet small
weight columns, which a rotation spreads over every column.
"""

from __future__ import annotations

import torch


def rounding_surrogate(h: torch.Tensor, c: torch.Tensor, r: torch.Tensor, relative: bool = True) -> torch.Tensor:
    """``Σ_g Σ_i (RᵀH_gR)_ii (RᵀC_gR)_ii / tr(H_g C_g)`` for ``h, c: [G, n, n]`` and ``r: [n, n]``; with
    ``relative=False`` the numerators' sum over the denominators' sum."""
    dh = (r * (h @ r)).sum(-2)  # diag(RᵀHR): [G, n]
    dc = (r * (c @ r)).sum(-2)
    scale = torch.einsum("gij,gji->g", h, c)
    return ((dh * dc).sum(-1) / scale).sum() if relative else (dh * dc).sum() / scale.sum()


def fit_rotation(h: torch.Tensor, c: torch.Tensor, steps: int, lr: float, relative: bool = True) -> torch.Tensor:
    """The orthogonal ``[n, n]`` matrix (float64) lowering ``rounding_surrogate`` from the identity in ``steps``."""
    h, c = h.float(), c.float()
    n = h.shape[-1]
    eye = torch.eye(n)
    a = torch.zeros(n, n, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)

    def rotation() -> torch.Tensor:
        skew = a - a.T
        return torch.linalg.solve(eye + skew, eye - skew)

    with torch.enable_grad():  # the pass runs under no_grad
        for _ in range(steps):
            opt.zero_grad()
            rounding_surrogate(h, c, rotation(), relative).backward()
            opt.step()
    with torch.no_grad():
        r = rotation().double()
    q, _ = torch.linalg.qr(r)  # re-orthogonalize in float64 (the float32 solve drifts by ~1e-6)
    return q * torch.sign(torch.diagonal(q.T @ r))[None]
