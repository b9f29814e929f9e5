"""Speculative decoding: who proposes the draft, how long it is, and the rule that keeps the target's output.

A speculating row's pending token and k drafted tokens are scored by the target in one call (``Backend.score``,
the scheduler's orchestration); the target's processed distribution at each of the k+1 positions then decides:
- greedy: a drafted token is kept while it equals the target's own choice; the first mismatch is replaced by the
  target's choice, and when all k match the target's choice after them is a bonus token;
- sampling: Leviathan et al. 2023 (alg. 1) / Chen et al. 2023: keep draft token x with probability
  min(1, p(x)/q(x)), at the first rejection draw from normalize(max(0, p - q)), bonus draw from p when all are
  kept. p and q are the distributions *after* penalty, temperature, top-k and top-p; for prompt lookup q is one-hot.

Draft sources: ``PromptLookup`` (n-gram match in the prompt and the generated text, no model) and ``DraftModel``
(another export with the same tokenizer, on its own backend and cache rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime import sampling
from toolkit.runtime.backend import Backend
from toolkit.runtime.kv_cache import blocks_for


@dataclass
class SpecStats:
    """Counters per sequence, named as vLLM's spec_decode_* metrics (a server sums them)."""

    num_drafts: int = 0  # verification rounds with at least one drafted token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [k_max]: drafts accepted at position i
    target_calls: int = 0  # target calls that advanced this sequence (score and plain decode)
    emitted_tokens: int = 0  # tokens those calls produced
    deferred: int = 0  # greedy verifies that stopped at a position too close to call (a one-token decode follows)
    # where the decode time went (wall seconds): proposing (the draft model's share), the target's verify calls,
    # its one-token decodes of this sequence (paused drafting, empty drafts, deferred positions); the rest of
    # the decode time is the scheduler's Python
    draft_s: float = 0.0
    score_s: float = 0.0
    plain_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted_tokens / self.target_calls if self.target_calls else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if len(self.num_accepted_tokens_per_pos) < drafted:
            self.num_accepted_tokens_per_pos += [0] * (drafted - len(self.num_accepted_tokens_per_pos))
        for i in range(accepted):
            self.num_accepted_tokens_per_pos[i] += 1


@dataclass
class DraftLength:
    """The draft length each step, from acceptance and from measured cost.

    Before costs are measured: +1 after a fully accepted draft, down to accepted+1 after a rejection. Once the
    scheduler has timed a draft and a verify (``update``'s seconds), the length is the one that maximises expected
    tokens per second (Leviathan et al. 2023, sec. 3.4): E[tokens | j] / (j * draft_step + verify(j)), with
    E[tokens | j] = (1 - a^(j+1)) / (1 - a) for a per-token acceptance a. When even the best length is slower than
    a plain one-token decode (measured, or a verify call as its upper bound), drafting pauses: a draft that does not
    pay is turned off rather than slowing decode; when the pause ends, drafts of the acceptance length measure the
    costs again before the next decision (a noisy measurement cannot keep drafting off). After ``patience`` zero-accept rounds in a row drafting also
    pauses. A pause lasts ``pause`` tokens and doubles each time, so a source that never helps costs almost nothing.

    ``free``: drafted tokens a verify carries at the cost of the decode it replaces. A target that decodes one row as
    a pair [token, pad] (``OrtBackend.pairs``) runs a one-token verify in the same call, and pads every odd token
    count to an even one; a draft that needs no model call (prompt lookup) can fill those pads with guesses. Then
    a lone row never drops below ``free`` drafted tokens (a guess instead of the pad: a kept guess is a token for
    nothing), does not pause, and a length whose verify would be padded gets one more drafted token.
    """

    k: int
    max_k: int
    by_cost: bool = True  # False: acceptance alone sets the length
    patience: int = 3
    pause: int = 16
    zero_rounds: int = 0
    paused_for: int = 0
    probing: bool = False  # a pause ended: draft by acceptance until a steady round has measured the costs again
    free: int = 0  # 0, or 1 for a paired target and a draft without a model call (see above)
    # measured online, decayed so the estimates follow the text: drafted tokens kept / first rejections, seconds per
    # drafted token (catch-up included), a verify call's seconds by draft length, a plain decode step's seconds
    kept: float = 0.0
    rejected: float = 0.0
    draft_step_s: float | None = None
    verify_s: dict[int, float] = field(default_factory=dict)
    decode_s: float | None = None

    def allowed(self, busy_rows: int) -> int:
        """The draft length this step. One score call per speculating row replaces a share of one batched decode,
        so the length shrinks as 1/busy_rows and speculation stops when the batch exceeds max_k."""
        floor = self.free if busy_rows <= 1 else 0  # batched rows decode in one call: there a guess is a call
        if self.paused_for > 0:
            self.paused_for -= 1
            self.probing = self.paused_for == 0
            return floor
        limit = self.max_k // max(busy_rows, 1)
        if limit < 1 or not self.by_cost or self.probing or self.draft_step_s is None or not self.verify_s:
            return self._filled(max(min(self.k, limit), floor))
        rate, j = max((self.expected_tokens(j) / self.round_s(j), j) for j in range(1, limit + 1))
        plain = self.decode_s if self.decode_s is not None else min(self.verify_s.values())
        if rate * plain < 1.0 and not floor:  # a plain decode makes tokens faster
            self._pause()
            return 0
        return self._filled(j)

    def _filled(self, j: int) -> int:
        """j, or j+1 where a verify of j drafts (j+1 tokens) would be padded and free guesses can fill the pad."""
        return j + 1 if self.free and j and j % 2 == 0 else j

    def acceptance(self) -> float:
        """Per-token acceptance: kept / (kept + first rejections), the maximum-likelihood estimate of a
        geometric acceptance from drafts that stop at their first rejection."""
        seen = self.kept + self.rejected
        return self.kept / seen if seen else 0.0

    def expected_tokens(self, j: int) -> float:
        """Tokens one round with a j-token draft emits: accepted drafts and the target's own choice."""
        a = min(self.acceptance(), 1.0 - 1e-9)
        return (1.0 - a ** (j + 1)) / (1.0 - a)

    def round_s(self, j: int) -> float:
        """j draft steps and a verify of j+1 tokens; an unmeasured length takes the nearest measured one's cost."""
        assert self.draft_step_s is not None
        verify = self.verify_s.get(j)
        if verify is None:
            verify = self.verify_s[min(self.verify_s, key=lambda m: (abs(m - j), m))]
        return j * self.draft_step_s + verify

    def update(self, drafted: int, accepted: int, draft_s: float | None = None, verify_s: float | None = None) -> None:
        self.kept, self.rejected = DECAY * self.kept + accepted, DECAY * self.rejected + (accepted < drafted)
        if draft_s is not None and drafted:  # None: the draft first caught up on what it missed (not a steady round)
            self.draft_step_s, self.probing = _ema(self.draft_step_s, draft_s / drafted), False
        if verify_s is not None:
            self.verify_s[drafted] = _ema(self.verify_s.get(drafted), verify_s)
        if accepted == drafted:
            self.k, self.zero_rounds = min(self.max_k, self.k + 1), 0
            return
        self.k = max(1, accepted + 1)
        self.zero_rounds = self.zero_rounds + 1 if accepted == 0 else 0
        if self.zero_rounds >= self.patience and not self.free:  # with free guesses k=1 is the pause
            self._pause()

    def record_decode(self, seconds: float) -> None:
        """A plain one-token decode step of this sequence took ``seconds``."""
        self.decode_s = _ema(self.decode_s, seconds)

    def _pause(self) -> None:
        self.paused_for, self.pause, self.zero_rounds = self.pause, 2 * self.pause, 0


DECAY = 0.9  # weight of the past in the acceptance counts (about the last ten rounds)
EMA = 0.3  # weight of a new timing in the cost estimates


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k]
    # per token, the draft's processed distribution it was drawn from (ids, probs); None: one-hot (prompt lookup)
    q: list[tuple[np.ndarray, np.ndarray]] | None = None
    fed: int = 0  # tokens a draft model read before its first drafted token (the pending one, accepted drafts it lacks)


class Context(Protocol):
    """What a proposer reads of a sequence (``SequenceState`` has these)."""

    slot: int
    prompt_ids: list[int]
    generated: list[int]
    rng: np.random.Generator
    draft_length: DraftLength

    @property
    def budget(self) -> int: ...
    def processed(self, logits: np.ndarray, drafted: list[int]) -> tuple[np.ndarray, np.ndarray]: ...
    def argmax_decides(self, argmax: int, drafted: int) -> bool: ...


class Proposer(Protocol):
    calls_a_model: bool  # whether a drafted token costs a model call (a draft model) or a look-up (prompt lookup)

    def prefill(self, seq: Context) -> None: ...
    def propose(self, seq: Context, k: int) -> Draft: ...
    def advance(self, seq: Context, drafted: int, accepted: int) -> None: ...
    def release(self, seq: Context) -> None: ...


class PromptLookup:
    """The continuation of the latest earlier occurrence of the context's last n tokens (n = max_ngram down to
    min_ngram), as in vLLM's n-gram proposer and llama.cpp's lookup decoding; where that continuation reaches the
    end of the context before k tokens, the lookup goes on from the draft's own last n tokens (chained, as in
    onnxruntime-genai's n-gram speculation). Each row keeps an ``NgramIndex`` that reads only the tokens added since
    the last proposal, so a step costs the same however long the context is. Needs no model call: a draft token
    costs a dictionary look-up.

    Where the sequence has no match at all (its last token is new to it) and a guess is free (``DraftLength.free``),
    the guess is the token that last followed that token in an earlier sequence of this proposer (llama.cpp's
    lookup keeps such a dynamic cache across generations): a kept guess is a free token, a wrong one costs nothing.
    """

    calls_a_model = False

    # A match of one token continues poorly: on SmolLM2 int4 at least two tokens kept more drafted tokens and made
    # prompts with nothing to copy faster, copy-heavy ones no slower (README, "Speculative decoding":
    # benchmarks/bench_speculative.py --lookup-ngrams)
    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ToolkitError(f"prompt lookup needs 1 <= min_ngram <= max_ngram (got {min_ngram}, {max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.index: dict[int, NgramIndex] = {}  # row -> the index of its sequence's prompt and generated tokens
        self.followers: dict[int, int] = {}  # token -> the token after it, latest in released sequences

    def prefill(self, seq: Context) -> None:
        """Index the prompt at prefill time (a row's new sequence replaces whatever the row held)."""
        index = self.index[seq.slot] = NgramIndex(self.max_ngram, self.min_ngram)
        index.extend(seq.prompt_ids)

    def propose(self, seq: Context, k: int) -> Draft:
        index = self.index.get(seq.slot)
        if index is None:
            self.prefill(seq)
            index = self.index[seq.slot]
        index.extend(seq.generated, len(seq.prompt_ids))
        draft = index.propose(k)
        if not draft and seq.draft_length.free and index.tokens[-1] in self.followers:
            draft = [self.followers[index.tokens[-1]]]
        return Draft(draft)

    def advance(self, seq: Context, drafted: int, accepted: int) -> None:
        pass

    def release(self, seq: Context) -> None:
        self.index.pop(seq.slot, None)
        tokens = seq.prompt_ids + seq.generated
        self.followers.update(zip(tokens[:-1], tokens[1:], strict=True))


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of a growing token sequence last ended with a token after it.

    ``ends[n][gram]`` is the end e (exclusive) of the latest occurrence of ``gram`` with e < len(tokens), so its
    continuation ``tokens[e:]`` holds at least one token; the sequence's own last n-gram is indexed once a token
    follows it. Adding a token costs max_n - min_n + 1 dictionary writes."""

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, tokens: list[int], offset: int = 0) -> None:
        """Add ``tokens[len(self.tokens) - offset:]``: the part of a sequence (starting at ``offset``) not yet read."""
        new = tokens[len(self.tokens) - offset :]
        if not new:
            return
        seq = self.tokens
        first = len(seq)  # the n-grams ending at first..len-1 get a continuation now
        seq.extend(new)
        for e in range(max(first, 1), len(seq)):
            for n, ends in self.ends.items():
                if e >= n:
                    ends[tuple(seq[e - n : e])] = e

    def propose(self, k: int) -> list[int]:
        """Up to k tokens: the continuation of the longest indexed match of the last n tokens, chained on the
        draft's own tail where a continuation ends early."""
        seq, draft = self.tokens, list[int]()
        while len(draft) < k:
            tail = (seq[-self.max_n :] + draft)[-self.max_n :]
            for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
                e = self.ends[n].get(tuple(tail[-n:]))
                if e is not None:
                    draft += seq[e : e + k - len(draft)]  # e < len(seq): at least one token
                    break
            else:
                break
        return draft


class DraftModel:
    """Another export with the target's tokenizer. Its cache row for a sequence is the target's row number;
    ``written`` counts the positions of that row that hold the sequence's accepted tokens."""

    calls_a_model = True

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.written: dict[int, int] = {}  # row -> positions holding the sequence's accepted tokens
        self.proposed_at: dict[int, int] = {}  # row -> context length when the last draft was proposed

    def _fit(self, slot: int, budget: int) -> None:
        cache = self.backend.cache
        capacity = blocks_for(budget, 16) * 16
        if cache is None or cache.slots <= slot or cache.capacity < capacity:
            slots = max(slot + 1, cache.slots if cache else 1)
            self.backend.allocate(slots, max(capacity, cache.capacity if cache else 0))

    def prefill(self, seq: Context) -> None:
        """Write the prompt to the draft's row while the target's is written (prefill time, not decode time)."""
        self._fit(seq.slot, seq.budget)
        self.backend.prefill(seq.slot, np.asarray(seq.prompt_ids, np.int64), 0)
        self.written[seq.slot] = len(seq.prompt_ids)

    def propose(self, seq: Context, k: int) -> Draft:
        """k tokens: one call feeds what the draft's row lacks (accepted drafts it never saw, then the pending
        token), then one call per drafted token. A greedy draft reads the graph's argmax, not the logits."""
        self._fit(seq.slot, seq.budget)
        context = seq.prompt_ids + seq.generated
        start = min(self.written.get(seq.slot, 0), len(context) - 1)  # at least the last token: its logits
        ids, logits = self.backend.extend(seq.slot, np.asarray(context[start:], np.int64), start)  # [S], [S, V]
        tokens: list[int] = []
        q: list[tuple[np.ndarray, np.ndarray]] = []
        while True:
            token = int(ids[-1])
            if not seq.argmax_decides(token, len(tokens)):  # sampling, a penalty or a masked stop id
                choice_ids, probs = seq.processed(logits[-1], tokens)
                token = int(choice_ids[seq.rng.choice(len(choice_ids), p=probs)]) if len(choice_ids) > 1 else int(choice_ids[0])
                q.append((choice_ids, probs))
            tokens.append(token)
            if len(tokens) == k:
                break
            ids, logits = self.backend.extend(seq.slot, np.array([token], np.int64), len(context) + len(tokens) - 1)
        self.written[seq.slot], self.proposed_at[seq.slot] = len(context) + k - 1, len(context)
        # q is read only by sampling's acceptance rule, and there every token came from its distribution
        return Draft(tokens, q if len(q) == k else None, fed=len(context) - start)

    def advance(self, seq: Context, drafted: int, accepted: int) -> None:
        """Keep the context and the accepted drafts that were fed; the rest is overwritten next time."""
        self.written[seq.slot] = self.proposed_at[seq.slot] + min(accepted, drafted - 1)

    def release(self, seq: Context) -> None:
        self.written.pop(seq.slot, None)
        self.proposed_at.pop(seq.slot, None)


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """normalize(max(0, p - q)); p itself when that is all zero (p == q: a rejection had probability 0)."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return p if total <= 0 else r / total


def accept_or_resample(p: np.ndarray, q: np.ndarray | None, token: int, rng: np.random.Generator) -> tuple[bool, int]:
    """p, q: dense [V] target and draft distributions (q None: one-hot on ``token``). Keep ``token`` with
    probability min(1, p/q); otherwise a token drawn from the residual."""
    q_token = 1.0 if q is None else float(q[token])
    if rng.random() * q_token < p[token]:
        return True, token
    if q is None:
        q = np.zeros_like(p)
        q[token] = 1.0
    r = residual(p, q)
    return False, int(rng.choice(len(r), p=r))


def dense(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    return sampling.Choice(int(ids[0]), ids, probs).dense(vocab)


def top2_margin(logits: np.ndarray, top: int) -> float:
    """Gap between the largest logit (at ``top``) and the next: a verify call whose logits differ from a one-token
    decode's by less than half of it picks the same argmax. Two reads of the row, no copy."""
    rest = max(logits[:top].max(initial=-np.inf), logits[top + 1 :].max(initial=-np.inf))
    return float(logits[top] - rest)
