"""What one request is: its settings, its sequence state (tokens, sampling, stop rules), its text and timings.

The scheduler (scheduler.py) moves sequences through the cache; the engine (engine.py) turns prompts into them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime import sampling
from toolkit.runtime.speculative import DraftLength, Proposer, SpecStats
from toolkit.runtime.tokenizer import Tokenizer
from toolkit.schema import check_numbers

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
# The longest draft: a verify call returns [k+1, V] float logits (k = 10,000 with SmolLM2's 49,152-entry vocabulary
# would be 2 GB a call), and the adaptive length seldom passes 8 (README: 2.5-2.7 tokens per target call)
MAX_DRAFT_TOKENS = 32


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
    logprobs: int | None = None  # record the chosen token's log-probability and this many top alternatives
    # speculative decoding: the longest draft (0: none); drafts come from the engine's draft export, or with
    # prompt_lookup from n-gram matches in the prompt and the generated text
    num_draft_tokens: int = 4
    prompt_lookup: bool = False
    # choose the draft length by measured cost and pause a draft that does not pay (speculative.DraftLength);
    # False drafts whatever it costs (acceptance as a fidelity figure, tests on tiny models)
    draft_by_cost: bool = True

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
        if not 0 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS or (self.prompt_lookup and self.num_draft_tokens == 0):
            raise ToolkitError(f"num_draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], and >= 1 with prompt_lookup "
                               f"(got {self.num_draft_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ToolkitError(f"logprobs must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})")
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
    admitted_at: float = 0.0  # perf_counter when the scheduler gave the sequence a cache row (0: still waiting)

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
    finish_reason: str  # "length" | "stop_token" | "stop_string" | "cancelled"
    timings: Timings
    speculation: SpecStats | None = None  # None: the sequence did not speculate


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's log-probabilities (log-softmax of the raw logits, before sampling settings) at one choice."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids and their log-probabilities, most likely first


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprobs:
    logp = logits.astype(np.float64) - logits.max()
    logp -= np.log(np.exp(logp).sum())  # [V] log-softmax
    ids = np.argsort(-logp, kind="stable")[:top]
    return TokenLogprobs(token, float(logp[token]), [(int(i), float(logp[i])) for i in ids])


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
        """The rest of the text, with the bytes still waiting for a complete character decoded as they are (as a
        decode of all the ids would), unless a stop string ended the text."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
            self.prefix = self.read = len(self.ids)
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class SequenceState:
    """One request in flight: its cache row, its tokens and its sampling state."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, stop_ids: tuple[int, ...],
                 detok: Detokenizer | None, vocab: int) -> None:
        self.prompt_ids, self.config, self.stop_ids, self.detok = prompt_ids, config, stop_ids, detok
        self.slot = -1
        self.length = 0  # positions written in the cache row (during prefill: the prompt tokens written so far)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprobs] = []  # one per choice (the stop token's too) when config.logprobs is set
        self.finish_reason = ""
        self.rng = np.random.default_rng(config.seed)
        self.seen = np.zeros(vocab, bool) if config.repetition_penalty != 1.0 else None
        if self.seen is not None:
            self.seen[prompt_ids] = True
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self.start = time.perf_counter()
        self.proposer: Proposer | None = None  # set by the engine when the sequence speculates
        self.draft_length = DraftLength(config.num_draft_tokens, config.num_draft_tokens, by_cost=config.draft_by_cost)
        self.spec_stats: SpecStats | None = None

    def speculate(self, proposer: Proposer) -> None:
        self.proposer, self.spec_stats = proposer, SpecStats()

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.config.max_new_tokens

    @property
    def prefilled(self) -> bool:
        return self.length >= len(self.prompt_ids)

    @property
    def _masks_stops(self) -> bool:
        return len(self.generated) < self.config.min_new_tokens and bool(self.stop_ids)

    @property
    def _reads_logits(self) -> bool:
        """Sampling, the penalty and logprobs read every step's logits."""
        c = self.config
        return c.do_sample or self.seen is not None or c.logprobs is not None

    @property
    def needs_logits(self) -> bool:
        """Whether this row's next decode step must return its logits: ``_reads_logits``, and while stop ids are
        masked a greedy row reads them when the argmax is one of them."""
        return self._reads_logits or self._masks_stops

    def choose_next(self, argmax: int, logits: np.ndarray | None) -> int:
        """The token after a decode step from its argmax [the backend's next-token id] where that is the answer:
        greedy without penalty or logprobs, and the argmax is not a masked stop id (masking only lowers other
        entries, so the first maximum stays the first). Otherwise from the logits, which ``needs_logits`` asked for."""
        if not (self._reads_logits or (self._masks_stops and argmax in self.stop_ids)):
            return argmax
        assert logits is not None, "the scheduler asks for logits when needs_logits says so"
        return self.choose(logits)

    def argmax_decides(self, argmax: int, drafted: int = 0) -> bool:
        """Whether the raw logits' argmax is the greedy choice once ``drafted`` more tokens are accepted: greedy,
        no penalty, and not a stop id that is still masked (masking only lowers other entries)."""
        masked = len(self.generated) + drafted < self.config.min_new_tokens and argmax in self.stop_ids
        return not self.config.do_sample and self.seen is None and not masked

    def choose(self, logits: np.ndarray) -> int:
        seen = np.flatnonzero(self.seen) if self.seen is not None else None
        masked = self.masked(logits)
        token = sampling.choose(masked, self.config, self.rng, seen).token
        self.record_logprobs(masked, token)
        return token

    def record_logprobs(self, masked: np.ndarray, token: int) -> None:
        """One entry per choice when config.logprobs is set; ``masked``: the logits with stop ids masked."""
        if self.config.logprobs is not None:
            self.logprobs.append(token_logprobs(masked, token, self.config.logprobs))

    def scores(self, logits: np.ndarray, drafted: list[int]) -> np.ndarray:
        """The logits ``choose`` sees once ``drafted`` tokens have been accepted: stop ids masked while fewer than
        min_new_tokens exist, repetition penalty over the prompt, the generated and the drafted tokens."""
        logits = self.masked(logits, len(drafted))
        if self.seen is None:
            return logits
        seen = np.union1d(np.flatnonzero(self.seen), drafted) if drafted else np.flatnonzero(self.seen)
        return sampling.repetition_penalty(logits, seen, self.config.repetition_penalty)

    def masked(self, logits: np.ndarray, drafted: int = 0) -> np.ndarray:
        """Stop ids masked while fewer than min_new_tokens exist once ``drafted`` more tokens are accepted."""
        if len(self.generated) + drafted < self.config.min_new_tokens and self.stop_ids:
            logits = logits.copy()
            logits[list(self.stop_ids)] = -np.inf
        return logits

    def processed(self, logits: np.ndarray, drafted: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The distribution ``choose`` draws from once ``drafted`` tokens have been accepted (ids, probs)."""
        return sampling.distribution(self.scores(logits, drafted), self.config)

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
