"""Per-input-channel scales folded into the model so it computes the same function: ``W ← W·diag(s)`` for the
linears reading one input, ``1/s`` into the module producing it (a norm weight or a linear's output rows). AWQ
(which searches ``s`` for the weights) and SmoothQuant (which picks ``s`` to move activation outliers into the
weights) both fold through here: one owner of the fold and of which producers can take it."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.models.architectures import ScaleMapping


def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0,
                rows: slice = slice(None)) -> None:
    """``W ← W·diag(s)`` for each linear and ``1/s`` into ``prev``: a norm weight, or the output ``rows`` of a
    linear. A norm computing ``x̂·(offset + w)`` (Gemma's offset 1) needs ``w ← (offset + w)/s - offset``."""
    w = prev.weight.data  # type: ignore[union-attr]
    if isinstance(prev, nn.Linear):
        w[rows].div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias.data[rows].div_(s)
    else:
        w.copy_((w + norm_offset) / s - norm_offset)  # type: ignore[operator]
    for m in linears:
        m.weight.data.mul_(s)


def prev_rows(layer: nn.Module, mapping: ScaleMapping, linears: list[nn.Linear]) -> slice | None:
    """The output rows of a linear ``prev`` that are the linears' inputs; None when they are not
    (grouped-query attention: v_proj emits fewer channels than o_proj reads)."""
    prev = layer.get_submodule(mapping.prev)
    if not isinstance(prev, nn.Linear):
        return slice(None)
    size, rest = divmod(prev.out_features, mapping.chunks)
    if rest or size != linears[0].in_features:
        return None
    return slice(mapping.chunk * size, (mapping.chunk + 1) * size)
