"""Running second moments of a linear layer's inputs: the one accumulator GPTQ, AWQ and head calibration share."""

from __future__ import annotations

import torch


class InputMoments:
    """Accumulates ``XᵀX`` (and optionally ``Σ|x|``) over batches of inputs ``x: [..., d]``, in float32."""

    def __init__(self, dim: int, track_abs: bool = False, device: torch.device | str | None = None) -> None:
        self.gram = torch.zeros(dim, dim, device=device)  # Σ xᵀx: [d, d]
        self.abs_sum = torch.zeros(dim, device=device) if track_abs else None  # Σ |x| per channel: [d]
        self.count = 0  # tokens seen

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x2.t(), x2)
        if self.abs_sum is not None:
            self.abs_sum.add_(x2.abs().sum(0))
        self.count += x2.shape[0]

    def second_moment(self) -> torch.Tensor:
        """``XᵀX / n``: the output-error metric of AWQ's scale and clip search."""
        return self.gram / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """``H = 2 XᵀX / n`` (GPTQ eq. 1)."""
        return 2 * self.second_moment()

    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (AWQ's activation salience)."""
        if self.abs_sum is None:
            raise ValueError("InputMoments(track_abs=False) does not keep |x|; create it with track_abs=True")
        return self.abs_sum / max(self.count, 1)


class InputMaxima:
    """Running ``max |x|`` per input channel over batches ``x: [..., d]`` (SmoothQuant's activation range, and the
    per-tensor range a static activation scale is calibrated from)."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.abs_max = torch.zeros(dim, device=device)  # [d]

    def add(self, x: torch.Tensor) -> None:
        torch.maximum(self.abs_max, x.reshape(-1, x.shape[-1]).float().abs().amax(0), out=self.abs_max)

    def tensor_max(self) -> float:
        return float(self.abs_max.max())


class PairedMoments:
    """One linear's inputs in the quantized model ``x̃`` (as its kernel reads them) and in the float model ``x``, token
    for token (GPTAQ's asymmetric calibration): ``H = 2 X̃ᵀX̃ / n`` and the cross term ``D = 2 (X − X̃)ᵀ X̃ / n``."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.quantized = InputMoments(dim, device=device)
        self.delta = torch.zeros(dim, dim, device=device)  # Σ (x − x̃)ᵀ x̃: [d, d]

    def add(self, x_quantized: torch.Tensor, x_float: torch.Tensor) -> None:
        xq = x_quantized.reshape(-1, x_quantized.shape[-1]).float()
        dx = x_float.reshape(-1, x_float.shape[-1]).float() - xq
        self.quantized.add(xq)
        self.delta.addmm_(dx.t(), xq)

    def hessian(self) -> torch.Tensor:
        return self.quantized.hessian()

    def cross(self) -> torch.Tensor:
        """``D = 2 (X − X̃)ᵀ X̃ / n``: ``[d, d]``, on the scale of ``hessian()``."""
        return 2 * self.delta / max(self.quantized.count, 1)
