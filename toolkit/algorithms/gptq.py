"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): column-by-column quantization with error feedback.

Pure functions on one weight ``w: [out, in]`` and its Hessian ``h = 2 X Xᵀ / n: [in, in]``. Rows are
independent given ``h``, so linears that read the same input (q, k, v) can be quantized as one
concatenated matrix. Output codes, scales and zeros follow ``toolkit.quant.spec`` exactly; for fp8 e4m3
weights (``spec.type == "float"``) the grid is e4m3 against one scale per output row, the codes those
``toolkit.quant.arithmetic.fp8_quantize`` writes (llm-compressor runs GPTQ for FP8 the same way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError
from toolkit.quant.arithmetic import FP8, compute_qparams, fp8_codes, fp8_searched_scale, fp8_weight_scale
from toolkit.quant.spec import QuantSpec

MAX_DAMP = 1.0  # dampening is raised x10 per failed Cholesky up to this fraction of mean(diag H)


class SingularHessianError(ToolkitError):
    """The Hessian stayed non positive-definite at the largest dampening."""


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in]; float8_e4m3fn for fp8 weights
    scales: torch.Tensor  # float32 (fp16-representable) [out, G]; fp8: absmax / 448 [out, 1]
    zeros: torch.Tensor  # uint8 [out, G]; fp8: [out, 1] zeros (no zero point)
    damp: float  # dampening fraction actually used
    dead_columns: int  # inputs never activated (diag H == 0), quantized as zero weights


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_damp: float = MAX_DAMP,
                           order: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU`` (GPTQ sec. 3, step 3), λ = damp · mean(diag H),
    for ``H = h[order][:, order]`` (``h`` itself by default). A zero diagonal entry (an input never
    activated) counts as 1: any value works, since that input's weights are zeroed.

    With ``P`` the order reversal and ``P H P = L Lᵀ``, ``U = P L⁻¹ P`` (upper triangular): one Cholesky
    and one triangular solve instead of inverting and factorising again (8x faster on CPU).
    Raises the dampening x10 while the factorisation fails; float64 keeps near-singular H usable.
    """
    # Memory (an 8192-wide down_proj: 512 MB per float64 copy): the order and its reversal are applied
    # to the float32 h in one indexing, the dampening goes onto the diagonal in place, the Hessian is
    # freed before the solve and the solve's identity and the factor before the float32 copy: at most
    # three float64 matrices are alive at once. Bit-identical to the plain formula (an in-place solve
    # is not: it rounds differently).
    n = h.shape[0]
    rev = (torch.arange(n, device=h.device) if order is None else order).flip(0)
    h64 = h[rev][:, rev].double()
    diag = torch.diagonal(h64)
    diag[diag == 0] = 1.0
    undamped = diag.clone()
    mean_diag = float(undamped.mean())
    frac = damp
    while True:
        torch.add(undamped, frac * mean_diag, out=diag)
        lower, info = torch.linalg.cholesky_ex(h64)
        if int(info) == 0:
            break
        del lower
        if frac >= max_damp:
            raise SingularHessianError(
                f"the Hessian is not positive definite even with dampening {frac:g} x mean(diag H); "
                "check the calibration data for degenerate activations, or skip this layer"
            )
        frac = min(max(frac * 10, 1e-4), max_damp)
    del h64, diag
    eye = torch.eye(n, dtype=torch.float64, device=h.device)
    lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
    del lower, eye
    return lower_inv.float().flip(0, 1), frac


def float_target(w: torch.Tensor, h: torch.Tensor, delta: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTAQ's target (Li et al. 2025, arXiv:2504.02692, asymmetric calibration): ``W* = W + W D (H + λI)⁻¹`` for
    ``w: [out, in]``, ``h = 2 X̃ᵀX̃ / n`` of the quantized model's inputs ``X̃`` and ``delta = D = 2 (X − X̃)ᵀ X̃ / n``
    against the float model's inputs ``X`` (``toolkit.quant.moments.PairedMoments``), λ = damp · mean(diag H).

    ``W*`` solves the normal equations of ``min ‖W* X̃ − W X‖²`` (the output the float layer computes, from the input
    the quantized model delivers), so ``‖Ŵ X̃ − W X‖² = ‖(Ŵ − W*) X̃‖² + const``: GPTQ on ``W*`` with ``h``
    minimises GPTAQ's objective. (The paper folds the correction into the column sweep, column by column; here it is
    solved once up front, which also corrects the first columns.) ``delta = 0`` gives ``W`` back exactly.
    """
    h64 = h.detach().double().clone()
    diag = torch.diagonal(h64)
    diag[diag == 0] = 1.0  # a dead input, as inverse_hessian_factor treats it (its weights are zeroed later)
    diag.add_(damp * float(diag.mean()))
    rhs = w.detach().double() @ delta.double()  # W D: [out, in]
    correction = torch.linalg.solve(h64, rhs.t()).t()  # (H + λI) symmetric: W D (H + λI)⁻¹
    return (w.detach().double() + correction).to(w.dtype)


@contextmanager
def _single_thread() -> Iterator[None]:
    """The column sweep is thousands of tiny ops: extra threads only add synchronisation (and stall
    badly on a loaded machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quant_dequant(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``col: [out]`` (same arithmetic as ``toolkit.quant.arithmetic.quantize``,
    or ``fp8_codes`` for fp8 weights)."""
    if spec.type == "float":
        q8 = fp8_codes(col, scale)
        return q8, q8.float() * scale
    z = zero.float()
    q = torch.round(col / scale + z).clamp(0, spec.qmax)
    return q.to(torch.uint8), (q - z) * scale


def _qparams(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros of ``w: [out, in]`` before the sweep: min/max per group, or fp8's absmax / 448 per row (or
    the searched multiple of it, weighted by ``importance``)."""
    if spec.type == "float":
        scale = fp8_weight_scale(w) if importance is None else fp8_searched_scale(w, importance)
        return scale, torch.zeros_like(scale, dtype=torch.uint8)
    return compute_qparams(w, spec)


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
    act_order: bool = True, *, scale_search: bool = False,
) -> GPTQResult:
    """Quantize ``w: [out, in]`` minimising ``‖(W - Ŵ) X‖²`` for the inputs summarised by ``h``.

    Lazy batch updates (sec. 3, step 2) in blocks of ``block_size`` columns (rounded to a multiple of
    the group so that groups never straddle blocks). Without act-order each group's scale and zero
    come from the current, already-updated weights at the group's first column; with act-order
    (columns by descending diag H) the groups are static: computed from the original weights in the
    original column order, so the stored layout stays the ordinary contiguous one (trivial g_idx).
    ``scale_search`` (fp8 weights only) picks each row's scale as ``fp8_searched_scale`` weighted by ``diag H``.
    """
    if not torch.isfinite(w).all():
        raise ToolkitError("the weight holds NaN or Inf values; fix the model before quantizing")
    if not torch.isfinite(h).all():
        raise ToolkitError("the Hessian holds NaN or Inf values: the calibration activations overflowed")
    if scale_search and spec.type != "float":
        raise ToolkitError("scale_search picks fp8 per-channel scales; integer weights have none: use type: float")
    if spec.type == "float" and spec.group_size != -1:
        raise ToolkitError(f"fp8 weights have one scale per output channel: use group_size -1, not {spec.group_size}")
    out_f, in_f = w.shape
    group = spec.group(in_f)
    W = w.detach().float().clone()
    diag = torch.diagonal(h.detach()).float().clone()
    dead = diag == 0
    diag[dead] = 1.0  # an unused input: ordered as inverse_hessian_factor treats it; its weight is zeroed
    W[:, dead] = 0.0
    scales, zeros = _qparams(W, spec, diag if scale_search else None)  # static groups (and per-row params)
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(in_f, device=W.device)
    W = W[:, perm]
    U, used = inverse_hessian_factor(h.detach().float(), damp, order=perm)  # no permuted float32 copy of h
    with _single_thread():
        static = act_order or spec.group_size == -1
        codes = _sweep(W, U, perm, (scales, zeros, static), spec, max(1, block_size // group) * group)
    inv = torch.argsort(perm)
    return GPTQResult(codes[:, inv], scales, zeros, used, int(dead.sum()))


def _sweep(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor, bool],
           spec: QuantSpec, block: int) -> torch.Tensor:
    """GPTQ's column loop on permuted ``W`` with upper factor ``U``.

    ``qparams = (scales, zeros, static)``: with ``static`` false each group's entries are overwritten
    in place at the group's first column.
    """
    scales, zeros, static = qparams
    out_f, in_f = W.shape
    group = spec.group(in_f)
    codes = torch.zeros(out_f, in_f, dtype=FP8 if spec.type == "float" else torch.uint8, device=W.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, err1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=W.device)
        u1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group
            if not static and col % group == 0:
                s, z = compute_qparams(W1[:, i : i + group], QuantSpec(spec.bits, -1, spec.symmetric))
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q, deq = _quant_dequant(W1[:, i], scales[:, g], zeros[:, g], spec)
            codes[:, col] = q
            err = (W1[:, i] - deq) / u1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)  # OBS update of the remaining columns
            err1[:, i] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # lazy update of the later blocks
    return codes
