"""The scheduler: one per engine, for its lifetime. ``submit`` a sequence, ``cancel`` it, ``step`` everything.

Each ``step`` (continuous batching with chunked prefill, as in Sarathi-Serve and vLLM):
1. admit waiting sequences into free cache rows (first come, first served);
2. advance every running row: rows that speculate score their draft (one call per row, speculative.py decides what
   is kept), the others, and any whose draft came back empty, decode one token in one batched call (decodes
   first: running rows never wait for a prompt);
3. prefill one chunk of at most ``step_tokens`` prompt tokens of the oldest admitted sequence. Its chunks start
   at multiples of ``step_tokens``, so a prompt is cut the same way whatever else runs.

A sequence's budget (prompt + max_new_tokens) is checked against the context at ``submit``, before any compute.
The cache is allocated at the first admission and only grows (geometrically, keeping the rows' content) when a
sequence needs more rows or columns than it has, up to ``max_batch`` rows of the model's context: never per call.

Not thread-safe by itself: the engine holds one lock around ``submit``, ``cancel`` and ``step``.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.backend import Backend
from toolkit.runtime.generation import SequenceState, StreamChunk, Timings
from toolkit.runtime.kv_cache import BlockPool, blocks_for
from toolkit.runtime.speculative import Draft, accept_or_resample, dense, top2_margin

# Greedy verification keeps a target choice only where its top-2 logit gap exceeds this; a closer call is left to
# the one-token decode. A k-token score and a one-token decode of SmolLM2 float32 differ by at most 7.2e-5 in any
# logit (180 positions measured; SmolLM2 int4 at accuracy_level 0: 9.7e-5): a gap over twice the difference cannot
# flip the argmax. int8-activation graphs (MatMulNBits accuracy_level 4) amplify such last-bit differences to 0.4-1.8
# (3 flipped argmaxes in 180 positions), and the cache columns a verify writes differ too, so later decodes drift
# whatever the margin (SmolLM2 int4 GPTQ, prompt lookup, 128 tokens: 2 of 3 prompts changed at margin 4.0). A
# speculating int8 target therefore computes one row as a pair (``OrtBackend.pairs``): decode and verify then give
# identical logits and cache columns and need no margin. VERIFY_MARGIN_INT8 (over twice the largest difference
# measured) is for an int8 target without pairing: it leaves most positions to the decode and is not exact.
VERIFY_MARGIN = 1e-3
VERIFY_MARGIN_INT8 = 4.0
CATCH_UP = 2  # tokens a draft model reads before drafting in a steady round: the pending one, an accepted draft


class Handle:
    """A submitted sequence: the chunks chosen for it and not yet read, and whether it is done."""

    def __init__(self, seq: SequenceState) -> None:
        self.seq = seq
        self.chunks: deque[StreamChunk] = deque()

    @property
    def done(self) -> bool:
        return bool(self.seq.finish_reason)

    @property
    def timings(self) -> Timings:
        return self.seq.timings


class Scheduler:
    def __init__(self, backend: Backend, max_batch: int, block_size: int, step_tokens: int,
                 batch_exact: bool = True) -> None:
        """batch_exact: a paired target (see below) decodes a batch row by row, so that every speculating row's
        greedy output equals its output alone, at one call per row; False: it speculates only while one sequence
        runs, and several decode in one batched call without speculation (a server's throughput)."""
        if max_batch < 1 or step_tokens < 1:
            raise ToolkitError(f"max_batch and step_tokens must be >= 1 (got {max_batch}, {step_tokens})")
        self.backend, self.step_tokens = backend, step_tokens
        context = backend.contract.context_length
        self.pool = BlockPool(max_batch, blocks_for(context, block_size) * block_size, block_size)
        self.waiting: deque[Handle] = deque()
        self.prefilling: list[Handle] = []  # admitted, prompt not fully written; oldest first
        self.running: list[Handle] = []  # prompt written, decoding
        self.rows: dict[int, Handle] = {}  # cache row -> the sequence holding it
        int8 = getattr(backend, "int8_activations", backend.contract.accuracy_level == 4)
        self.pairs = bool(getattr(backend, "pairs", False))  # one row decodes as [token, pad] (exact verify)
        self.batch_exact = batch_exact
        self.verify_margin = 0.0 if self.pairs else VERIFY_MARGIN_INT8 if int8 else VERIFY_MARGIN

    # --- requests --------------------------------------------------------------------------------
    def check(self, seq: SequenceState) -> None:
        """Refuse, before any compute, a sequence that could never fit the model's context."""
        context = self.backend.contract.context_length
        if seq.budget > context:
            raise ToolkitError(
                f"request needs {seq.budget} positions (prompt + max_new_tokens) but the model's context is "
                f"{context}: shorten the prompt or lower max_new_tokens"
            )

    def submit(self, seq: SequenceState) -> Handle:
        self.check(seq)
        handle = Handle(seq)
        self.waiting.append(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a sequence wherever it is and give its row back; a finished one is left as it is."""
        if handle.done:
            return
        handle.seq.finish_reason = "cancelled"
        if handle in self.waiting:
            self.waiting.remove(handle)
        else:
            self._release(handle)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    # --- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        self._admit()
        if self.running:
            self.decode()
        if self.prefilling:
            self.prefill(self.prefilling[0])

    def _admit(self) -> None:
        admitted = []
        while self.waiting and self.pool.has_free_slot():
            handle = self.waiting.popleft()
            handle.seq.slot = self.pool.admit(handle.seq.budget)
            handle.seq.timings.admitted_at = time.perf_counter()
            admitted.append(handle)
        if admitted:  # one growth for everything admitted in this step
            self._fit_cache(max(h.seq.slot for h in admitted), max(h.seq.budget for h in admitted))
        for handle in admitted:
            self.rows[handle.seq.slot] = handle
            self.prefilling.append(handle)

    def _fit_cache(self, slot: int, budget: int) -> None:
        """Make row ``slot`` hold ``budget`` positions. A dimension that is too small doubles (at least to what is
        needed, at most to ``max_batch`` rows of the context); the backend keeps the rows' content, so running
        sequences are not disturbed."""
        cache, bs = self.backend.cache, self.pool.block_size
        rows, capacity = slot + 1, blocks_for(budget, bs) * bs
        if cache is not None:
            if cache.slots >= rows and cache.capacity >= capacity:
                return
            if rows > cache.slots:
                rows = max(rows, min(self.pool.slots, 2 * cache.slots))
            if capacity > cache.capacity:
                capacity = max(capacity, min(self.pool.capacity, blocks_for(2 * cache.capacity, bs) * bs))
            rows, capacity = max(rows, cache.slots), max(capacity, cache.capacity)
        self.backend.allocate(rows, capacity)

    def _release(self, handle: Handle) -> None:
        seq = handle.seq
        if seq.proposer is not None:
            seq.proposer.release(seq)
        self.pool.release(seq.slot)
        del self.rows[seq.slot]
        (self.prefilling if handle in self.prefilling else self.running).remove(handle)

    def _emit(self, handle: Handle, token: int) -> None:
        handle.chunks.append(StreamChunk(token, handle.seq.accept(token)))
        if handle.done:
            self._release(handle)

    # --- gpt-fast style entry points -------------------------------------------------------------
    def prefill(self, handle: Handle) -> None:
        """Write the next chunk of the sequence's prompt; after the last one, choose its first token."""
        seq = handle.seq
        start = seq.length  # a multiple of step_tokens
        chunk = seq.prompt_ids[start : start + self.step_tokens]
        t0 = time.perf_counter()
        logits = self.backend.prefill(seq.slot, np.asarray(chunk, np.int64), start)  # [V] of the chunk's last token
        seq.length += len(chunk)
        if seq.prefilled:
            token = seq.choose(logits)
            if seq.proposer is not None:
                seq.proposer.prefill(seq)
                # a paired target's one-token decode has a pad row that a model-free draft fills with a guess
                seq.draft_length.free = int(self.pairs and not seq.proposer.calls_a_model)
        now = time.perf_counter()
        seq.timings.prefill_s += now - t0
        if seq.prefilled:
            seq.timings.ttft_s = now - seq.start
            self.prefilling.remove(handle)
            self.running.append(handle)
            self._emit(handle, token)

    def decode(self) -> None:
        """Advance every running sequence: speculating rows by their accepted draft, the rest by one token."""
        busy = len(self.running)
        if self.pairs and busy > 1 and not self.batch_exact:
            # a paired target verifies row by row: with several rows, one batched call makes tokens cheaper (also
            # when no row drafts, e.g. requests that turned speculation off)
            self.decode_one_token(rowwise=False)
            return
        if all(h.seq.proposer is None for h in self.running):
            self.decode_one_token()
            return
        plain = []
        for handle in list(self.running):
            seq = handle.seq
            remaining = seq.config.max_new_tokens - len(seq.generated)  # the draft and its bonus fit the budget
            k = min(seq.draft_length.allowed(busy), remaining - 1) if seq.proposer is not None else 0
            if k <= 0 or not self.speculate(handle, k):
                plain.append(handle)
        if plain:
            self.decode_one_token(plain)

    def speculate(self, handle: Handle, k: int) -> bool:
        """Score up to k drafted tokens after the row's pending one and emit what the target keeps; False when the
        row still needs a one-token decode this step (no draft, or a position too close to call)."""
        seq = handle.seq
        stats, proposer = seq.spec_stats, seq.proposer
        assert stats is not None and proposer is not None
        t0 = time.perf_counter()
        draft = proposer.propose(seq, k)
        t1 = time.perf_counter()
        stats.draft_s += t1 - t0
        if not draft.tokens:
            return False
        tokens = np.array([seq.generated[-1], *draft.tokens], np.int64)  # [k+1]: pending token, then drafts
        ids, logits = self.backend.extend(seq.slot, tokens, seq.length)  # [k+1], [k+1, V]: until the next call
        t2 = time.perf_counter()
        stats.score_s += t2 - t1
        kept, chose = self._verify(seq, draft, ids, logits)
        accepted = len(kept) - chose
        proposer.advance(seq, len(draft.tokens), accepted)
        # a draft that first caught up on many tokens (after a pause) does not say what a draft step costs
        draft_s = t1 - t0 if draft.fed <= CATCH_UP else None
        seq.draft_length.update(len(draft.tokens), accepted, draft_s=draft_s, verify_s=t2 - t1)
        stats.record(len(draft.tokens), accepted)
        stats.target_calls += 1
        stats.deferred += not chose
        if not kept:
            return False
        # columns written: the pending token and the accepted drafts; a target choice after them becomes pending.
        # Without one (a deferred position) the last accepted draft is pending and the decode re-feeds it.
        seq.length += accepted + chose
        stats.emitted_tokens += len(kept)
        dt = (time.perf_counter() - t0) / len(kept)
        for i, token in enumerate(kept):
            seq.timings.token_latencies_s.append(dt)
            if seq.config.logprobs is not None:
                seq.record_logprobs(seq.masked(logits[i]), token)
            self._emit(handle, token)
            if handle.done:  # a stop rule mid-draft: the rest is dropped
                return True
        return chose

    def _verify(self, seq: SequenceState, draft: Draft, ids: np.ndarray, logits: np.ndarray) -> tuple[list[int], bool]:
        """The tokens the target keeps: accepted drafts, then its own choice at the first rejection (or the bonus
        after all k), and whether that choice is there: greedy stops short, before any choice, at a position whose
        top-2 gap is too close to call. ids, logits: the target's argmax [k+1] and logits [k+1, V]."""
        kept: list[int] = []
        vocab, k = logits.shape[-1], len(draft.tokens)
        for i in range(k + 1):
            if not seq.config.do_sample:
                choice = self._greedy(seq, logits[i], int(ids[i]), draft.tokens[:i])
                if choice is None:
                    return kept, False
                token = choice
            else:
                choice_ids, probs = seq.processed(logits[i], draft.tokens[:i])
                if i == k:  # all k kept: the bonus token
                    token = int(choice_ids[seq.rng.choice(len(choice_ids), p=probs)])
                else:
                    q = None if draft.q is None else dense(*draft.q[i], vocab)
                    _, token = accept_or_resample(dense(choice_ids, probs, vocab), q, draft.tokens[i], seq.rng)
            kept.append(token)
            if i == k or token != draft.tokens[i]:
                return kept, True
        raise AssertionError("unreachable: the last position always chooses")

    def _greedy(self, seq: SequenceState, logits: np.ndarray, argmax: int, drafted: list[int]) -> int | None:
        """The target's greedy choice at one verified position (the graph's ``argmax`` unless a penalty or a masked
        stop id changes the scores), None when its top-2 gap is too close to call."""
        scores = logits
        if not seq.argmax_decides(argmax, len(drafted)):
            scores = seq.scores(logits, drafted)
            argmax = int(scores.argmax())
        r = seq.config.repetition_penalty
        if self.verify_margin and top2_margin(scores, argmax) < self.verify_margin * max(r, 1 / r):
            return None  # the penalty scales differences
        return argmax

    def decode_one_token(self, handles: list[Handle] | None = None, rowwise: bool = True) -> None:
        """Advance ``handles`` (default: every running sequence) by one token in one batched call over rows
        0..highest in use (``rowwise``: a paired target's call per row, see ``batch_exact``)."""
        handles = self.running if handles is None else handles
        n = self.pool.highest_in_use() + 1
        if n == 1 and len(handles) == 1:  # one stream: scalars in and out
            t0 = time.perf_counter()
            seq = handles[0].seq
            argmax_id, row = self.backend.decode_row(seq.generated[-1], seq.length, seq.needs_logits)
            seq.length += 1
            self._decoded([(handles[0], seq.choose_next(argmax_id, row))], time.perf_counter() - t0)
            return
        # A row that is not decoding computes a throwaway token at its next free column (0 for a free row; for a
        # row mid-prefill, the column its next chunk overwrites), so no written column is touched. A backend
        # that decodes row by row skips those rows (``live``).
        tokens, lengths, live = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
        for slot, handle in self.rows.items():
            lengths[slot] = handle.seq.length
        for handle in handles:
            tokens[handle.seq.slot], live[handle.seq.slot] = handle.seq.generated[-1], True
        t0 = time.perf_counter()
        # argmax: [n] ids; logits: [n, V] only when a row samples, penalises or masks; valid until the next call
        argmax, logits = self.backend.decode_next(tokens, lengths, any(h.seq.needs_logits for h in handles),
                                                  live=live, rowwise=rowwise)
        chosen = []
        for handle in handles:
            seq = handle.seq
            seq.length += 1
            chosen.append((handle, seq.choose_next(int(argmax[seq.slot]), None if logits is None else logits[seq.slot])))
        self._decoded(chosen, time.perf_counter() - t0)

    def _decoded(self, chosen: list[tuple[Handle, int]], dt: float) -> None:
        """Record a one-token step that took ``dt`` and emit each row's token."""
        for handle, token in chosen:
            handle.seq.timings.token_latencies_s.append(dt)
            if handle.seq.spec_stats is not None:
                handle.seq.spec_stats.target_calls += 1
                handle.seq.spec_stats.emitted_tokens += 1
                handle.seq.spec_stats.plain_s += dt
                handle.seq.draft_length.record_decode(dt)  # what drafting must beat
            self._emit(handle, token)
