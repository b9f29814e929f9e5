"""Next-token choice from one row of logits: the processed distribution, and the token chosen from it.

Pure functions on numpy vectors ([V]); the generator owns the state (seen tokens, rng). ``distribution`` is what
a speculative decoder compares (target vs draft); ``choose`` draws from it, so both see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class SamplingSettings(Protocol):
    """The fields of ``GenerationConfig`` that shape the distribution."""

    @property
    def do_sample(self) -> bool: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...


@dataclass(frozen=True)
class Choice:
    token: int
    ids: np.ndarray  # [C] candidate ids, most likely first
    probs: np.ndarray  # [C] float64, sums to 1 (greedy: one candidate with probability 1)

    def dense(self, vocab: int) -> np.ndarray:
        """The distribution over the whole vocabulary [V]."""
        out = np.zeros(vocab, np.float64)
        out[self.ids] = self.probs
        return out


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


def distribution(logits: np.ndarray, settings: SamplingSettings,
                 seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids (most likely first) and their probabilities after repetition penalty (over the ``seen``
    ids), temperature, top-k and top-p. Greedy decoding is the one-hot distribution on the argmax."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, settings.repetition_penalty)
    if not settings.do_sample:
        return np.array([int(logits.argmax())]), np.ones(1)
    # the maximum is subtracted before dividing: a tiny temperature then sends the others to -inf (greedy),
    # where dividing first would overflow to inf - inf = NaN
    shifted = logits.astype(np.float64) - logits.max()
    with np.errstate(over="ignore", divide="ignore"):
        scaled = shifted / settings.temperature
    ids, vals = top_k_top_p(scaled, settings.top_k, settings.top_p)
    probs = np.exp(vals - vals[0])
    return ids, probs / probs.sum()


def choose(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> Choice:
    """The processed distribution and the token drawn from it (greedy: its only candidate, no draw)."""
    ids, probs = distribution(logits, settings, seen)
    token = int(ids[rng.choice(len(ids), p=probs)]) if settings.do_sample else int(ids[0])
    return Choice(token, ids, probs)


@dataclass(frozen=True)
class _Sampled:
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One draw from the distribution after temperature, top-k and top-p."""
    return choose(logits, _Sampled(True, temperature, top_k, top_p, 1.0), rng).token
