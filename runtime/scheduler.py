"""The scheduler: one per engine, for its lifetime. ``submit`` a sequence, ``cancel`` it, ``step`` everything.

Each ``step`` (continuous batching with chunked prefill, as in Sarathi-Serve and vLLM):
1. admit waiting sequences into free cache rows (first come, first served);
2. decode one token for every running row in one batched call (decodes first: running rows never wait for a prompt);
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
    def __init__(self, backend: Backend, max_batch: int, block_size: int, step_tokens: int) -> None:
        if max_batch < 1 or step_tokens < 1:
            raise ToolkitError(f"max_batch and step_tokens must be >= 1 (got {max_batch}, {step_tokens})")
        self.backend, self.step_tokens = backend, step_tokens
        context = backend.contract.context_length
        self.pool = BlockPool(max_batch, blocks_for(context, block_size) * block_size, block_size)
        self.waiting: deque[Handle] = deque()
        self.prefilling: list[Handle] = []  # admitted, prompt not fully written; oldest first
        self.running: list[Handle] = []  # prompt written, decoding
        self.rows: dict[int, Handle] = {}  # cache row -> the sequence holding it

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
            self.decode_one_token()
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
        now = time.perf_counter()
        seq.timings.prefill_s += now - t0
        if seq.prefilled:
            seq.timings.ttft_s = now - seq.start
            self.prefilling.remove(handle)
            self.running.append(handle)
            self._emit(handle, token)

    def decode_one_token(self) -> None:
        """Advance every running sequence by one token in one batched call over rows 0..highest in use."""
        n = self.pool.highest_in_use() + 1
        # A row that is not decoding computes a throwaway token at its next free column (0 for a free row; for a
        # row mid-prefill, the column its next chunk overwrites), so no written column is touched.
        tokens, lengths = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for slot, handle in self.rows.items():
            lengths[slot] = handle.seq.length
        for handle in self.running:
            tokens[handle.seq.slot] = handle.seq.generated[-1]
        t0 = time.perf_counter()
        logits = self.backend.decode(tokens, lengths)  # [n, V], valid until the next call
        chosen = []
        for handle in self.running:
            handle.seq.length += 1
            chosen.append((handle, handle.seq.choose(logits[handle.seq.slot])))
        dt = time.perf_counter() - t0
        for handle, token in chosen:
            handle.seq.timings.token_latencies_s.append(dt)
            self._emit(handle, token)
