"""The engine: tokenizer + backend + one scheduler for its lifetime. ``generate``/``stream``/``generate_batch``
are thin wrappers over ``submit`` and ``step``.

Any number of threads may call it at once: one lock guards the scheduler, and a caller waiting for its next
token steps the scheduler for every request in flight (whoever holds the lock advances all rows; the others
find their tokens waiting when they get it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from toolkit.errors import ToolkitError
from toolkit.runtime.backend import Backend
from toolkit.runtime.generation import (
    Detokenizer,
    GenerationConfig,
    GenerationResult,
    SequenceState,
    StreamChunk,
    Timings,
)
from toolkit.runtime.kv_cache import BlockPool
from toolkit.runtime.scheduler import Handle, Scheduler
from toolkit.runtime.speculative import DraftModel, PromptLookup, SpecStats
from toolkit.runtime.tokenizer import Tokenizer

Prompt = str | list[dict[str, str]]  # text, or chat messages [{"role": ..., "content": ...}]


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, max_batch: int = 8, block_size: int = 16,
                 step_tokens: int = 256, draft: Backend | None = None, batch_exact: bool = True) -> None:
        """step_tokens: prompt tokens prefilled per step (bounds how long running rows wait for a new prompt);
        draft: another export's backend (same tokenizer) that proposes tokens for speculative decoding;
        batch_exact: see ``Scheduler`` (a paired target's batch row by row, or batched without speculation)."""
        if max_batch < 1 or block_size < 1:
            raise ToolkitError(f"max_batch and block_size must be >= 1 (got {max_batch}, {block_size})")
        self.backend, self.tokenizer = backend, tokenizer
        self.contract = backend.contract
        self.max_batch, self.block_size = max_batch, block_size
        self.scheduler = Scheduler(backend, max_batch, block_size, step_tokens, batch_exact)
        self._lock = threading.Lock()
        self._local = threading.local()
        if draft is not None and draft.contract.vocab_size != self.contract.vocab_size:
            raise ToolkitError(f"the draft's vocabulary has {draft.contract.vocab_size} entries, the target's "
                               f"{self.contract.vocab_size}: a draft must come from the target's model family")
        self.draft = DraftModel(draft) if draft is not None else None
        self.prompt_lookup = PromptLookup()

    @property
    def pool(self) -> BlockPool:
        return self.scheduler.pool

    @property
    def last_timings(self) -> Timings | None:
        """Timings of the calling thread's last finished ``generate`` or ``stream``."""
        return getattr(self._local, "timings", None)

    @property
    def last_speculation(self) -> SpecStats | None:
        """Speculation counters of the calling thread's last finished ``generate`` or ``stream``."""
        return getattr(self._local, "speculation", None)

    # --- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ToolkitError("the prompt is empty after tokenization: give at least one token of text")
        return list(ids)

    def _new_sequence(self, prompt: Prompt | list[int], config: GenerationConfig, with_text: bool) -> SequenceState:
        ids = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else None
        ids = ids or self.encode(prompt)  # type: ignore[arg-type]
        stop_ids = config.stop_token_ids if config.stop_token_ids is not None else self.contract.eos_token_ids
        detok = Detokenizer(self.tokenizer, config.stop_strings) if with_text or config.stop_strings else None
        seq = SequenceState(ids, config, tuple(stop_ids), detok, self.contract.vocab_size)
        proposer = self.prompt_lookup if config.prompt_lookup else self.draft
        if proposer is not None and config.num_draft_tokens > 0:
            seq.speculate(proposer)
        return seq

    # --- the scheduler, under the lock -----------------------------------------------------------
    def submit(self, prompt: Prompt | list[int], config: GenerationConfig | None = None,
               with_text: bool = True) -> Handle:
        """Queue a request (refused here if it cannot fit the context); ``step`` or ``follow`` runs it."""
        seq = self._new_sequence(prompt, config or GenerationConfig(), with_text)
        with self._lock:
            return self.scheduler.submit(seq)

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            self.scheduler.cancel(handle)

    def step(self) -> None:
        with self._lock:
            self.scheduler.step()

    def follow(self, handle: Handle) -> Iterator[StreamChunk]:
        """The handle's chunks as they are chosen, stepping the scheduler while none is ready. Closing the
        iterator early cancels the request."""
        try:
            while True:
                with self._lock:
                    if not handle.chunks and not handle.done:
                        self.scheduler.step()
                    ready, done = list(handle.chunks), handle.done
                    handle.chunks.clear()
                yield from ready
                if done:
                    return
        finally:
            if not handle.done:
                self.cancel(handle)

    def result(self, handle: Handle) -> GenerationResult:
        seq = handle.seq
        text = seq.detok.text if seq.detok else str(self.tokenizer.decode(seq.generated, skip_special_tokens=True))
        return GenerationResult(text, list(seq.generated), seq.finish_reason, seq.timings, seq.spec_stats)

    # --- the public API --------------------------------------------------------------------------
    def generate(self, prompt: Prompt | list[int], config: GenerationConfig | None = None) -> GenerationResult:
        handle = self.submit(prompt, config, with_text=False)
        for _ in self.follow(handle):
            pass
        self._local.timings, self._local.speculation = handle.timings, handle.seq.spec_stats
        return self.result(handle)

    def stream(self, prompt: Prompt | list[int], config: GenerationConfig | None = None) -> Iterator[StreamChunk]:
        handle = self.submit(prompt, config)
        yield from self.follow(handle)
        self._local.timings, self._local.speculation = handle.timings, handle.seq.spec_stats

    def generate_batch(self, prompts: Sequence[Prompt | list[int]],
                       config: GenerationConfig | None = None) -> list[GenerationResult]:
        """Decode all prompts together, at most ``max_batch`` at a time (continuous batching)."""
        seqs = [self._new_sequence(p, config or GenerationConfig(), with_text=False) for p in prompts]
        for seq in seqs:  # every request is checked before any is queued
            self.scheduler.check(seq)
        with self._lock:
            handles = [self.scheduler.submit(seq) for seq in seqs]
        try:
            for handle in handles:
                for _ in self.follow(handle):
                    pass
        finally:  # an error leaves none of them queued
            for handle in handles:
                self.cancel(handle)
        return [self.result(h) for h in handles]
