"""Perplexity of a float checkpoint larger than memory: the windows' hidden states carried layer by layer.

The same protocol as ``perplexity.evaluate`` (token-level mean NLL over the windows), with one decoder
layer resident at a time (``SkeletonModel``) and the activations in an ``ActivationBuffer``; the head is
read once in its stored dtype and applied to one batch at a time in float32 output-row blocks. No KL: that
needs the other model's logits for the same tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolkit.models.streaming import SkeletonModel
from toolkit.quant.calibration import advance
from toolkit.quant.streaming import StreamOptions, capture

HEAD_BLOCK = 1 << 25  # head weights converted to float32 at a time


@torch.no_grad()
def stream_perplexity(src: SkeletonModel, windows: torch.Tensor, batch_size: int,
                      options: StreamOptions) -> dict[str, float]:
    inputs = capture(src, windows, batch_size, options)
    try:
        for i in range(src.num_layers):
            prefix = src.layer_prefix(i)
            inputs.layer = i
            advance(src.load(prefix), inputs, prefix)
            src.release(prefix)
        norm = src.load(src.layout.final_norm)
        head_w = f"{src.layout.head}.weight"
        weight = src.read(head_w, src.source_dtype(head_w))  # [V, H] in its stored dtype
        step = max(1, HEAD_BLOCK // weight.shape[1])
        nll_sum, count = 0.0, 0
        for b, (hidden, _) in enumerate(inputs.batches()):
            x = norm(hidden)  # [B, L, H]
            logits = torch.cat([F.linear(x, weight[r : r + step].float()) for r in range(0, weight.shape[0], step)],
                               dim=-1)[:, :-1]  # [B, L-1, V]
            targets = windows[b * batch_size : (b + 1) * batch_size, 1:].to(logits.device)
            nll_sum += float(-F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).sum())
            count += targets.numel()
        src.release(src.layout.final_norm)
    finally:
        inputs.hidden.close()
    nll = nll_sum / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": float(count), "streamed": 1.0}
