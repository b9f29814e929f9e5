"""Generation on top of a backend: admission, prefill, ``decode_one_token``, sampling, stop rules, streaming.

Several requests are decoded together (continuous batching): each holds one cache row; a finished
sequence frees its row for the next waiting request. Every request's budget (prompt +
max_new_tokens) is checked against the cache before any compute, so nothing fails halfway.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime import sampling
from toolkit.runtime.backend import Backend
from toolkit.runtime.kv_cache import BlockPool, blocks_for
from toolkit.runtime.tokenizer import Tokenizer
from toolkit.schema import check_numbers

Prompt = str | list[dict[str, str]]  # text, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens exist (benchmarks use it)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ToolkitError(f"min_new_tokens must be in [0, max_new_tokens] (got {self.min_new_tokens})")
        if self.temperature <= 0:
            raise ToolkitError(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise ToolkitError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ToolkitError("top_k must be >= 0 and repetition_penalty > 0 (1.0 disables it)")
        if any(not s for s in self.stop_strings):
            raise ToolkitError("stop_strings must not contain an empty string")
        # what the bounds above cannot see, for every field: NaN compares false, a negative seed reaches numpy
        check_numbers(GenerationConfig, {f.name: getattr(self, f.name) for f in fields(self)}, "generation settings")


@dataclass
class Timings:
    prompt_tokens: int = 0
    ttft_s: float = 0.0  # request start to first token chosen (includes prefill)
    prefill_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)  # one per decode step

    @property
    def decode_s(self) -> float:
        return float(sum(self.token_latencies_s))

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return len(self.token_latencies_s) / self.decode_s if self.token_latencies_s else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop_token" | "stop_string"
    timings: Timings


@dataclass
class StreamChunk:
    token_id: int
    text: str  # text that became final with this token (may be "" while a stop string is pending)


class Detokenizer:
    """Incremental decoding (re-decode a small window, emit the stable suffix) with stop strings.

    Text that could still be the start of a stop string is held back until it is resolved.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.tok, self.stops = tokenizer, stop_strings
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.emitted, self.stopped = "", 0, False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # a complete character arrived
            delta = after[len(before) :]
            self.text += delta
            self.prefix, self.read = self.read, len(self.ids)
            self._check_stops(len(delta))
        return self._flushable()

    def _check_stops(self, delta: int) -> None:
        longest = max((len(s) for s in self.stops), default=0)
        lo = max(0, len(self.text) - delta - longest)
        hits = [i for s in self.stops if (i := self.text.find(s, lo)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _flushable(self) -> str:
        hold = 0
        if not self.stopped:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = len(self.text) - hold
        out, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return out

    def finish(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class SequenceState:
    """One request in flight: its cache row, its tokens and its sampling state."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, stop_ids: tuple[int, ...],
                 detok: Detokenizer | None, vocab: int) -> None:
        self.prompt_ids, self.config, self.stop_ids, self.detok = prompt_ids, config, stop_ids, detok
        self.slot = -1
        self.length = 0  # positions written in the cache row
        self.generated: list[int] = []
        self.finish_reason = ""
        self.rng = np.random.default_rng(config.seed)
        self.seen = np.zeros(vocab, bool) if config.repetition_penalty != 1.0 else None
        if self.seen is not None:
            self.seen[prompt_ids] = True
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self.start = time.perf_counter()

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.config.max_new_tokens

    def choose(self, logits: np.ndarray) -> int:
        c = self.config
        if self.seen is not None:
            logits = sampling.repetition_penalty(logits, np.flatnonzero(self.seen), c.repetition_penalty)
        if len(self.generated) < c.min_new_tokens and self.stop_ids:
            logits = logits.copy()
            logits[list(self.stop_ids)] = -np.inf
        if c.do_sample:
            return sampling.sample(logits, c.temperature, c.top_k, c.top_p, self.rng)
        return sampling.greedy(logits)

    def accept(self, token: int) -> str:
        """Record ``token``; sets finish_reason when a stop rule fires. Returns newly final text."""
        if token in self.stop_ids and len(self.generated) >= self.config.min_new_tokens:
            self.finish_reason = "stop_token"
            return self.detok.finish() if self.detok else ""
        self.generated.append(token)
        if self.seen is not None:
            self.seen[token] = True
        text = self.detok.add(token) if self.detok else ""
        if self.detok and self.detok.stopped:
            self.finish_reason = "stop_string"
        elif len(self.generated) >= self.config.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason and self.detok:
            text += self.detok.finish()
        return text


class Engine:
    """Tokenizer + backend + scheduler. ``generate``/``stream``/``generate_batch`` are the public API."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, max_batch: int = 8,
                 block_size: int = 16) -> None:
        if max_batch < 1 or block_size < 1:
            raise ToolkitError(f"max_batch and block_size must be >= 1 (got {max_batch}, {block_size})")
        self.backend, self.tokenizer = backend, tokenizer
        self.contract = backend.contract
        self.max_batch, self.block_size = max_batch, block_size
        self.pool: BlockPool | None = None
        self.last_timings: Timings | None = None  # of the last finished stream/generate call

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
        return SequenceState(ids, config, tuple(stop_ids), detok, self.contract.vocab_size)

    # --- admission -------------------------------------------------------------------------------
    def _admit_all(self, seqs: Sequence[SequenceState]) -> BlockPool:
        """Size the cache for this job's largest budget and refuse what cannot fit, before any compute."""
        longest = max(s.budget for s in seqs)
        if longest > self.contract.context_length:
            raise ToolkitError(
                f"request needs {longest} positions (prompt + max_new_tokens) but the model's context is "
                f"{self.contract.context_length}: shorten the prompt or lower max_new_tokens"
            )
        capacity = blocks_for(longest, self.block_size) * self.block_size
        slots = min(self.max_batch, len(seqs))
        cache = self.backend.allocate(slots, capacity)
        pool = BlockPool(cache.slots, cache.capacity, self.block_size)
        for s in seqs:
            pool.check_fits(s.budget)
        self.pool = pool
        return pool

    # --- gpt-fast style entry points ---------------------------------------------------------------
    def prefill(self, seq: SequenceState) -> int:
        """Fill the sequence's cache row with its prompt (chunked) and choose the first token."""
        t0 = time.perf_counter()
        logits = self.backend.prefill(seq.slot, np.asarray(seq.prompt_ids, np.int64), 0)
        seq.length = len(seq.prompt_ids)
        token = seq.choose(logits)
        now = time.perf_counter()
        seq.timings.prefill_s, seq.timings.ttft_s = now - t0, now - seq.start
        return token

    def decode_one_token(self, active: list[SequenceState]) -> list[int]:
        """Advance every active sequence by one token in one batched call (rows 0..max slot)."""
        if self.pool is None:
            raise ToolkitError("decode_one_token before admission: run requests through generate/stream")
        n = self.pool.highest_in_use() + 1
        tokens = np.zeros(n, np.int64)  # rows without a sequence compute a throwaway token at position 0
        lengths = np.zeros(n, np.int64)
        for s in active:
            tokens[s.slot], lengths[s.slot] = s.generated[-1], s.length
        logits = self.backend.decode(tokens, lengths)  # [n, V]
        out = []
        for s in active:
            s.length += 1
            out.append(s.choose(logits[s.slot]))
        return out

    # --- scheduling ------------------------------------------------------------------------------
    def _run(self, seqs: list[SequenceState]) -> Iterator[tuple[SequenceState, StreamChunk]]:
        pool = self._admit_all(seqs)
        pending, active = deque(seqs), list[SequenceState]()
        while pending or active:
            while pending and pool.has_free_slot():
                seq = pending.popleft()
                seq.slot = pool.admit(seq.budget)
                yield seq, StreamChunk(token := self.prefill(seq), seq.accept(token))
                (pool.release(seq.slot) if seq.finish_reason else active.append(seq))
            if not active:
                continue
            t0 = time.perf_counter()
            tokens = self.decode_one_token(active)
            dt = time.perf_counter() - t0
            for seq, token in zip(active, tokens, strict=True):
                seq.timings.token_latencies_s.append(dt)
                yield seq, StreamChunk(token, seq.accept(token))
            for seq in [s for s in active if s.finish_reason]:
                pool.release(seq.slot)
                active.remove(seq)

    def _result(self, seq: SequenceState) -> GenerationResult:
        text = seq.detok.text if seq.detok else str(self.tokenizer.decode(seq.generated, skip_special_tokens=True))
        return GenerationResult(text, list(seq.generated), seq.finish_reason, seq.timings)

    def generate(self, prompt: Prompt | list[int], config: GenerationConfig | None = None) -> GenerationResult:
        seq = self._new_sequence(prompt, config or GenerationConfig(), with_text=False)
        for _ in self._run([seq]):
            pass
        self.last_timings = seq.timings
        return self._result(seq)

    def stream(self, prompt: Prompt | list[int], config: GenerationConfig | None = None) -> Iterator[StreamChunk]:
        seq = self._new_sequence(prompt, config or GenerationConfig(), with_text=True)
        for _, chunk in self._run([seq]):
            yield chunk
        self.last_timings = seq.timings

    def generate_batch(self, prompts: Sequence[Prompt | list[int]],
                       config: GenerationConfig | None = None) -> list[GenerationResult]:
        """Decode all prompts together, at most ``max_batch`` at a time (continuous batching)."""
        if not prompts:
            return []
        seqs = [self._new_sequence(p, config or GenerationConfig(), with_text=False) for p in prompts]
        for _ in self._run(seqs):
            pass
        return [self._result(s) for s in seqs]
