"""The engine loop: ONE background thread owns the engine's scheduler and steps it while anything is waiting or
running. Requests and cancellations are handed to it through a lock-guarded list; the tokens of each step go back
to asyncio with ``call_soon_threadsafe`` into the request's own queue.

Only this thread calls ``Engine.step`` and ``Engine.cancel``, so a cancellation (a client gone, a shutdown) takes
effect before the next step and frees the row and its blocks then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from toolkit.runtime import Engine, GenerationConfig, Handle, SpecStats, StreamChunk
from toolkit.runtime.generation import TokenLogprobs
from toolkit.serving.metrics import Metrics

log = logging.getLogger("toolkit.serving")
FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length", "cancelled": "abort"}


@dataclass
class Update:
    """What one step produced for a request: its new chunks, and its OpenAI finish reason once it is done."""

    chunks: list[StreamChunk]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # of the generated tokens among the chunks (the stop token's not)
    error: str | None = None  # the engine failed: the request ends with this message

    def per_token(self) -> list[tuple[str, list[TokenLogprobs] | None, str | None]]:
        """(text, logprobs, finish reason) for each token, the finish reason with the last; one entry for an update
        with no token (a request ended between steps). A step that kept several drafted tokens gives several."""
        parts = [(c.text, None if self.logprobs is None else self.logprobs[i : i + 1])
                 for i, c in enumerate(self.chunks)] or [("", None if self.logprobs is None else [])]
        return [(text, logprobs, self.finish_reason if i == len(parts) - 1 else None)
                for i, (text, logprobs) in enumerate(parts)]


@dataclass
class Request:
    """A request from arrival to its last token; timestamps are ``perf_counter`` seconds."""

    id: str
    arrival: float
    aio: asyncio.AbstractEventLoop
    updates: asyncio.Queue[Update] = field(default_factory=asyncio.Queue)
    handle: Handle | None = None
    cancelled: bool = False
    finished: bool = False  # its last update is on its way (set by the loop thread)
    first_at: float = 0.0
    last_at: float = 0.0
    logprobs_sent: int = 0
    tokens_counted: int = 0  # generated tokens already added to the counter
    spec_counted: SpecStats = field(default_factory=SpecStats)  # its speculation already added to the counters

    def push(self, update: Update) -> None:
        self.aio.call_soon_threadsafe(self.updates.put_nowait, update)


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._lock = threading.Lock()
        self._live: list[Request] = []
        self._cancels: list[Request] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # --- called from other threads ---------------------------------------------------------------
    def submit(self, request: Request, ids: list[int], config: GenerationConfig) -> None:
        """Queue the request (a ToolkitError when it can never fit the context); a request cancelled meanwhile
        is dropped at once."""
        handle = self.engine.submit(ids, config)
        with self._lock:
            request.handle = handle
            self._live.append(request)
            if request.cancelled:
                self._cancels.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        with self._lock:
            if request.cancelled or request.finished:
                return
            request.cancelled = True
            if request.handle is not None:
                self._cancels.append(request)
        self._wake.set()

    def cancel_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for request in live:
            self.cancel(request)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.rows)

    # --- the loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                cancels, self._cancels = self._cancels, []
            for request in cancels:
                assert request.handle is not None
                self.engine.cancel(request.handle)
            if not self.engine.scheduler.busy:
                self._deliver()  # the cancelled ones
                self._wake.wait()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # a failing graph ends every request in flight with its message
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            self._deliver()

    def _deliver(self) -> None:
        now = time.perf_counter()
        with self._lock:
            live = list(self._live)
        finished = []
        for request in live:
            handle = request.handle
            assert handle is not None
            chunks = list(handle.chunks)
            handle.chunks.clear()
            self._count_speculation(request)
            if chunks:
                self._count(request, now)
                if not request.first_at:
                    request.first_at = now
                else:
                    self.metrics.itl.labels(self.metrics.model_name).observe(now - request.last_at)
                request.last_at = now
            logprobs = None
            if handle.seq.config.logprobs is not None:  # entries of tokens kept in the output, not the stop token
                end = min(len(handle.seq.generated), len(handle.seq.logprobs))
                logprobs, request.logprobs_sent = handle.seq.logprobs[request.logprobs_sent : end], end
            if handle.done:
                finished.append(request)
                request.finished = True
                reason = FINISH_REASONS[handle.seq.finish_reason]
                self._record(request, reason, now)
                request.push(Update(chunks, reason, logprobs))
            elif chunks:
                request.push(Update(chunks, None, logprobs))
        if finished:
            with self._lock:
                self._live = [r for r in self._live if r not in finished]

    def _count(self, request: Request, now: float) -> None:
        """The token counters as tokens arrive (a rate over a long request is smooth); the stop token is not one."""
        m, name = self.metrics, self.metrics.model_name
        assert request.handle is not None
        seq = request.handle.seq
        if not request.first_at:
            m.prompt_tokens.labels(name).inc(len(seq.prompt_ids))
        if len(seq.generated) > request.tokens_counted:
            m.generation_tokens.labels(name).inc(len(seq.generated) - request.tokens_counted)
            request.tokens_counted = len(seq.generated)

    def _count_speculation(self, request: Request) -> None:
        """The spec_decode counters as drafts are verified, like the token counters."""
        assert request.handle is not None
        stats = request.handle.seq.spec_stats
        if stats is not None and self.metrics.spec_decode is not None:
            self.metrics.spec_decode.add(stats, request.spec_counted)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            live, self._live, self._cancels = self._live, [], []
        now = time.perf_counter()
        for request in live:
            assert request.handle is not None
            self.engine.cancel(request.handle)
            request.finished = True
            self._record(request, "abort", now)
            request.push(Update([], "abort", error=message))

    def _record(self, request: Request, reason: str, now: float) -> None:
        """The request's histograms and counters, and its one log line."""
        m, name = self.metrics, self.metrics.model_name
        assert request.handle is not None
        seq = request.handle.seq
        admitted, generated = seq.timings.admitted_at, len(seq.generated)
        self._count_speculation(request)
        m.success.labels(name, reason).inc()
        m.e2e.labels(name).observe(now - request.arrival)
        if admitted:
            m.queue.labels(name).observe(admitted - request.arrival)
        if request.first_at:
            m.ttft.labels(name).observe(request.first_at - request.arrival)
            m.prefill.labels(name).observe(request.first_at - admitted)
            m.decode.labels(name).observe(now - request.first_at)
        ms = lambda t: round(t * 1000, 2)  # noqa: E731
        log.info(json.dumps({
            "request": request.id, "prompt_tokens": len(seq.prompt_ids), "generated_tokens": generated,
            "queue_ms": ms(admitted - request.arrival) if admitted else None,
            "ttft_ms": ms(request.first_at - request.arrival) if request.first_at else None,
            "decode_ms": ms(now - request.first_at) if request.first_at else None,
            "e2e_ms": ms(now - request.arrival), "finish_reason": reason,
            **({} if seq.spec_stats is None else {"spec_drafts": seq.spec_stats.num_drafts,
                                                  "spec_draft_tokens": seq.spec_stats.num_draft_tokens,
                                                  "spec_accepted_tokens": seq.spec_stats.num_accepted_tokens}),
        }))

