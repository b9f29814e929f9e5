"""Next-token choice from one row of logits: greedy, or temperature / top-k / top-p sampling.

Pure functions on numpy vectors ([V]); the generator owns the state (seen tokens, rng).
"""

from __future__ import annotations

import numpy as np


def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL (Keskar et al. 2019, sec. 4.1): divide positive logits of seen tokens by the penalty,
    multiply negative ones, so a seen token always becomes less likely. Returns a new array."""
    out = logits.copy()
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids and their logits after top-k then nucleus (Holtzman et al. 2020) filtering."""
    V = logits.shape[0]
    k = V if top_k <= 0 else min(top_k, V)
    ids = np.argpartition(-logits, k - 1)[:k] if k < V else np.arange(V)
    ids = ids[np.argsort(-logits[ids], kind="stable")]  # descending
    vals = logits[ids]
    if top_p < 1.0:
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        ids, vals = ids[:keep], vals[:keep]
    return ids, vals


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    # the maximum is subtracted before dividing: a tiny temperature then sends the others to -inf (greedy),
    # where dividing first would overflow to inf - inf = NaN
    shifted = logits.astype(np.float64) - logits.max()
    with np.errstate(over="ignore", divide="ignore"):
        scaled = shifted / temperature
    ids, vals = top_k_top_p(scaled, top_k, top_p)
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])


def greedy(logits: np.ndarray) -> int:
    return int(logits.argmax())
