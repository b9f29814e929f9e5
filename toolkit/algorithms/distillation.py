"""Knowledge-distillation math: logit divergences, hidden-state matching, the shallow-student layer map.

Pure functions on tensors; the pass (passes/distill.py) wires them to models and the training loop.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the vocabulary, per position: ``[..., V] -> [...]``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token divergence between ``student`` and ``teacher`` logits ``[B, L, V]``.

    forward_kl: KL(teacher || student), mode-covering (Hinton et al. 2015);
    reverse_kl: KL(student || teacher), mode-seeking (MiniLLM, Gu et al. 2023);
    jsd: Jensen-Shannon with equal weights (GKD, Agarwal et al. 2024).
    Multiplied by T² so gradients keep their size when the temperature changes (Hinton et al. §2).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_token = _kl(t, s)
    elif kind == "reverse_kl":
        per_token = _kl(s, t)
    else:
        # log of the mixture m = (p + q) / 2, computed stably in log space
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)
        per_token = 0.5 * _kl(t, m) + 0.5 * _kl(s, m)
    return per_token.mean() * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [B, L, V]`` predicting ``ids[:, 1:]``."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of MSE(student, teacher) / mean(teacher²): scale-free, so deep layers with large
    residual norms do not dominate. Each tensor ``[B, L, H]``; the lists are already paired."""
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-8) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def kept_layers(num_layers: int, layers: tuple[int, ...], keep_every: int | None) -> tuple[int, ...]:
    """Teacher layer indices the shallow student keeps: ``layers`` as given, else every ``keep_every``-th."""
    if layers:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside the teacher's 0..{num_layers - 1}")
        return tuple(layers)
    return tuple(range(0, num_layers, keep_every or 2))


def hidden_state_map(kept: tuple[int, ...], teacher_layers: int) -> dict[int, int]:
    """Student ``hidden_states`` index -> teacher ``hidden_states`` index.

    HF ``hidden_states[j]`` is the input of layer j (``[0]`` the embeddings, ``[n]`` the final normed
    output). The output of student layer i should match the teacher's input to the next kept layer
    ``kept[i+1]``; the final outputs match each other.
    """
    n = len(kept)
    mapping = {i: kept[i] for i in range(1, n)}
    mapping[n] = teacher_layers
    return mapping
