"""Perplexity of a float checkpoint larger than memory: the windows' hidden states carried layer by layer.

The same protocol as ``perplexity.evaluate`` (token-level mean NLL over the windows), with one decoder
layer resident at a time (``SkeletonModel``) and the activations in an ``ActivationBuffer``; the head is
read once in its stored dtype and applied to one batch at a time in float32 output-row blocks. No KL: that
needs the other model's logits for the same tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.models.architectures import final_softcap, logits_divisor
from toolkit.models.streaming import SkeletonModel
from toolkit.quant.calibration import advance, capture_layer_inputs
from toolkit.quant.modules import reads_head
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


@torch.no_grad()
def stream_logits(src: SkeletonModel, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """Float32 logits ``[1, S, V]`` of each token-id sequence ``[1, S]`` (any lengths), one decoder layer resident
    at a time: the reference of a streamed export's validation. Each layer runs on every sequence while it is
    loaded; the head (a float one in row blocks, as ``stream_perplexity``; a packed one by ``QuantLinear``) and
    the family's logit scaling and soft-cap follow the final norm."""
    embedding = [src.layout.embed, src.layout.head] if reads_head(src.model, src.layout.head) else [src.layout.embed]
    with src.resident(embedding):
        inputs = [capture_layer_inputs(src.model, torch.from_numpy(ids).to(src.device), 1) for ids in sequences]
    for i in range(src.num_layers):
        prefix = src.layer_prefix(i)
        with src.resident([prefix]):
            layer = src.model.get_submodule(prefix)
            for carried in inputs:
                carried.layer = i
                advance(layer, carried, prefix)
    out = []
    with src.resident([src.layout.final_norm, src.layout.head]):
        norm, head = src.model.get_submodule(src.layout.final_norm), src.model.get_submodule(src.layout.head)
        for carried in inputs:
            x = norm(carried.hidden.get(0))  # [1, S, H]
            out.append(_scaled(src, _head(head, x)).float().cpu().numpy())
    return out


def _head(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(head, torch.nn.Linear):
        return head(x)  # QuantLinear: dequantizes in row blocks itself
    step = max(1, HEAD_BLOCK // head.in_features)
    return torch.cat([F.linear(x, head.weight[r : r + step].float()) for r in range(0, head.out_features, step)], dim=-1)


def _scaled(src: SkeletonModel, logits: torch.Tensor) -> torch.Tensor:
    """What the model's ``ForCausalLM.forward`` does after the head: Granite's divisor, Gemma 2's soft-cap."""
    divisor, cap = logits_divisor(src.config), final_softcap(src.config)
    logits = logits if divisor is None else logits / divisor
    return logits if not cap else torch.tanh(logits / cap) * cap
