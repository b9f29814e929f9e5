"""The HTTP side: routes, admission control and graceful shutdown over one ``EngineLoop``.

Admission is counted when a request arrives, before its body is parsed or its prompt tokenized: at most
``max_batch`` running plus ``max_queue`` waiting, the next one gets 503 with Retry-After. Every refusal is a 4xx
with OpenAI's error body; a request that can never fit a cache row is told the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HttpRequest

from toolkit.errors import ToolkitError
from toolkit.runtime import Engine, GenerationConfig, Tokenizer, check_same_tokenizer, load, read_contract
from toolkit.serving.config import ServeConfig, source_hash
from toolkit.serving.loop import EngineLoop, Request, Update
from toolkit.serving.metrics import Metrics
from toolkit.serving.protocol import ChatRequest, CompletionRequest, Sampling, Shapes, error_body, usage

log = logging.getLogger("toolkit.serving")
RETRY_AFTER_S = 1


def refusal(status: int, message: str, kind: str = "invalid_request_error", retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    what = first["msg"]
    if first["type"] == "extra_forbidden":
        what = "this server does not serve this field; leave it out (README, Serving: the fields it takes)"
    return f"{where}: {what}" + (f" ({exc.error_count()} problems)" if exc.error_count() > 1 else "")


class Server:
    """The app's state: the engine (once loaded), its loop, the admission count and the shutdown flag."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.model_name, self.version = config.model_name, source_hash(config.export)
        self.metrics = Metrics(self.model_name, config.max_draft_tokens)
        self.engine: Engine | None = None
        self.loop: EngineLoop | None = None
        self.load_error: str | None = None
        self.admitted = 0  # requests counted in and not yet finished (only the event loop's thread changes it)
        self.draining = False

    @property
    def capacity(self) -> int:
        return self.config.max_batch + self.config.max_queue

    def load(self) -> None:
        """Open the export (in a worker thread: /health answers 503 meanwhile) and start the engine loop."""
        # a speculating int8 target decodes one row as a pair, so verify and decode agree bit for bit (README)
        engine = load(self.config.export, threads=self.config.threads, max_batch=self.config.max_batch,
                      draft=self.config.draft, paired_decode=self.config.speculates,
                      batch_exact=self.config.batch_exact)
        self.loop = EngineLoop(engine, self.metrics)
        pool = engine.pool
        self.metrics.watch(running=lambda: len(engine.scheduler.rows),
                           waiting=lambda: max(0, self.admitted - len(engine.scheduler.rows)),
                           kv_usage=lambda: pool.blocks_in_use / pool.blocks_total)
        self.engine = engine

    # --- completions -----------------------------------------------------------------------------
    async def complete(self, http: HttpRequest, chat: bool) -> Response:
        arrival = time.perf_counter()
        if self.draining:
            return refusal(503, "the server is shutting down: send the request to another instance",
                           "service_unavailable", retry=True)
        if self.engine is None or self.loop is None:
            return refusal(503, "the model is still loading: retry when GET /health answers 200",
                           "service_unavailable", retry=True)
        if self.admitted >= self.capacity:
            return refusal(503, f"{self.config.max_batch} requests running and {self.config.max_queue} waiting "
                           "(--max-queue): retry later", "service_unavailable", retry=True)
        self.admitted += 1
        streaming = False
        try:
            response, streaming = await self._admitted(http, chat, arrival)
            return response
        finally:
            if not streaming:  # a stream gives its place back when it ends
                self.admitted -= 1

    async def _admitted(self, http: HttpRequest, chat: bool, arrival: float) -> tuple[Response, bool]:
        assert self.engine is not None and self.loop is not None
        try:
            body = (ChatRequest if chat else CompletionRequest).model_validate_json(await http.body())
        except ValidationError as exc:
            return refusal(400, _validation_message(exc)), False
        if body.model != self.model_name:
            return refusal(404, f"model '{body.model}' is not served here: use '{self.model_name}' "
                           "(GET /v1/models)", "model_not_found"), False
        request = Request(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, arrival, asyncio.get_running_loop())
        try:
            await asyncio.to_thread(self._submit, request, body)
        except ToolkitError as exc:
            return refusal(400, str(exc)), False
        except asyncio.CancelledError:
            self.loop.cancel(request)
            raise
        shapes = Shapes(request.id, self.model_name, chat, self.engine.tokenizer)
        if body.stream:
            def closed() -> None:  # however the response ended, even before its first event
                assert self.loop is not None
                self.loop.cancel(request)  # a client gone mid-stream: its row is freed before the next step
                self.admitted -= 1

            return _EventStream(self._stream(request, body, shapes), closed), True
        return await self._collect(http, request, shapes), False

    def _submit(self, request: Request, body: ChatRequest | CompletionRequest) -> None:
        """Tokenize and queue (a worker thread); a ToolkitError is the client's mistake."""
        assert self.engine is not None and self.loop is not None
        contract = self.engine.contract
        if isinstance(body, ChatRequest):
            ids = self.engine.encode([m.as_template() for m in body.messages])
        elif isinstance(body.prompt, str):
            ids = self.engine.encode(body.prompt)
        else:
            ids = body.prompt
            if max(ids) >= contract.vocab_size:
                raise ToolkitError(f"prompt token id {max(ids)} is outside the vocabulary (size "
                                   f"{contract.vocab_size})")
        room = contract.context_length - len(ids)
        if body.token_limit is None and room < 1:
            raise ToolkitError(f"the prompt has {len(ids)} tokens and the model's context is "
                               f"{contract.context_length}: shorten the prompt")
        self.loop.submit(request, ids, generation_config(body, body.token_limit or room, self.config))

    async def _stream(self, request: Request, body: Sampling, shapes: Shapes) -> AsyncIterator[dict[str, str]]:
        """Server-sent events: a chunk per token (a step that kept several drafted tokens sends one for each, as a
        client counts tokens by chunks), the final chunk, the usage chunk if asked, [DONE]."""
        finished, first = False, True
        while not finished:
            update = await request.updates.get()
            finished = update.finish_reason is not None
            if update.error:
                yield {"data": _json(error_body(f"the engine failed: {update.error}", "server_error"))}
            for text, logprobs, reason in update.per_token():
                if text or first or reason or logprobs:  # a token that is no text yet sends nothing
                    yield {"data": _json(shapes.chunk(text, reason, logprobs, first=first))}
                    first = False
        if body.include_usage:
            yield {"data": _json(shapes.usage_chunk(self._usage(request)))}
        yield {"data": "[DONE]"}

    async def _collect(self, http: HttpRequest, request: Request, shapes: Shapes) -> Response:
        """The whole answer; a client that disconnects meanwhile cancels its request."""
        assert self.loop is not None
        gone = asyncio.ensure_future(_disconnected(http))
        parts, logprobs, update = [], [], Update([])
        try:
            while update.finish_reason is None:
                getter = asyncio.ensure_future(request.updates.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return Response(status_code=499)  # nobody reads it; the finally cancels the request
                update = getter.result()
                parts += [c.text for c in update.chunks]
                logprobs += update.logprobs or []
        finally:
            gone.cancel()
            if update.finish_reason is None:
                self.loop.cancel(request)
        if update.error:
            return refusal(500, f"the engine failed: {update.error}", "server_error")
        assert request.handle is not None
        wanted = logprobs if request.handle.seq.config.logprobs is not None else None
        return JSONResponse(shapes.full("".join(parts), update.finish_reason, self._usage(request), wanted))

    @staticmethod
    def _usage(request: Request) -> dict[str, int]:
        assert request.handle is not None
        seq = request.handle.seq
        return usage(len(seq.prompt_ids), len(seq.generated))

    # --- shutdown --------------------------------------------------------------------------------
    async def drain(self, stop: uvicorn.Server) -> None:
        """Refuse new requests (already set), let those in flight finish within the timeout, end the rest with
        a final chunk, then let uvicorn exit."""
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        while self.admitted and self.loop is not None:
            self.loop.cancel_all()  # again each round: one may have been tokenizing when the last round ran
            await asyncio.sleep(0.05)
        stop.should_exit = True


def generation_config(body: ChatRequest | CompletionRequest, max_new_tokens: int,
                      server: ServeConfig) -> GenerationConfig:
    """OpenAI's settings in the runtime's terms (its checks refuse what OpenAI's bounds let through, e.g.
    min_tokens above max_tokens), with the server's speculation unless the request asks for less."""
    if body.min_tokens > max_new_tokens:
        raise ToolkitError(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_new_tokens})")
    k = server.max_draft_tokens if body.num_speculative_tokens is None else body.num_speculative_tokens
    if k > server.max_draft_tokens and not server.speculates:
        raise ToolkitError("num_speculative_tokens: this server does not speculate (it was started without --draft "
                           "or --prompt-lookup): leave the field out or send 0")
    if k > server.max_draft_tokens:
        raise ToolkitError(f"num_speculative_tokens ({k}) must not exceed the server's --num-draft-tokens "
                           f"({server.max_draft_tokens}): send a smaller one, or 0 to turn speculation off")
    greedy = body.temperature == 0
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=body.min_tokens, do_sample=not greedy,
                            temperature=1.0 if greedy else body.temperature, top_k=max(body.top_k, 0),
                            top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                            stop_token_ids=() if body.ignore_eos else None, stop_strings=body.stop_strings,
                            logprobs=body.logprobs_count, num_draft_tokens=k,
                            prompt_lookup=server.prompt_lookup and k > 0)


async def _disconnected(http: HttpRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(asyncio.to_thread(server.load))
        loading.add_done_callback(lambda task: _loaded(server, task))
        yield
        if server.loop is not None:
            server.loop.stop()

    app = FastAPI(title="toolkit serve", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest) -> Response:
        return await server.complete(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        return await server.complete(http, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "toolkit", "root": str(server.config.export),
                                            "version": server.version}]}

    @app.get("/health")
    async def health() -> Response:
        if server.load_error:
            return refusal(503, f"the export failed to load: {server.load_error}", "service_unavailable")
        if server.engine is None:
            return refusal(503, "the model is still loading", "service_unavailable", retry=True)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _EventStream(EventSourceResponse):
    """An SSE response that runs ``closed`` when it ends, whether it finished, the client left, or it never
    started (a generator's own ``finally`` does not run when it was never iterated)."""

    def __init__(self, events: AsyncIterator[dict[str, str]], closed: Callable[[], None]) -> None:
        super().__init__(events, ping=5)
        self._closed = closed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._closed()


def _loaded(server: Server, task: asyncio.Future[None]) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is not None:  # the server stops (see _Uvicorn.on_tick) and ``serve`` raises it as one line
        server.load_error = str(exc) if isinstance(exc, ToolkitError) else f"{type(exc).__name__}: {exc}"


class _Uvicorn(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (see ``Server.drain``); a second one stops at once."""

    def __init__(self, config: uvicorn.Config, server: Server) -> None:
        super().__init__(config)
        self.app_server = server
        self.aio: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.aio = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.app_server.load_error is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.app_server.draining or self.aio is None or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self.app_server.draining = True
        log.info("shutting down: refusing new requests, %d in flight get %.0f s", self.app_server.admitted,
                 self.app_server.config.shutdown_timeout)
        self.aio.call_soon_threadsafe(lambda: asyncio.ensure_future(self.app_server.drain(self)))


def serve(config: ServeConfig) -> None:
    """Run until SIGTERM; an export that fails to load is reported as a ToolkitError after the server stops."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # one line per request, whatever the root logger does
    read_contract(config.export)  # a folder that is no export is refused before the port is taken
    if config.draft is not None:  # so is a draft that is no export or speaks another vocabulary
        read_contract(config.draft)
        check_same_tokenizer(Tokenizer.from_folder(config.export), Tokenizer.from_folder(config.draft),
                             config.export, config.draft)
    listening = listen(config.host, config.port)
    server = Server(config)
    uv = _Uvicorn(uvicorn.Config(create_app(server), host=config.host, port=config.port, access_log=False,
                                 log_level="warning", lifespan="on"), server)
    with listening:
        uv.run(sockets=[listening])
    if server.load_error:
        raise ToolkitError(server.load_error)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a taken port is one line, not uvicorn's log and exit 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ToolkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port or "
                           "--host, or stop what holds it") from exc
    return sock
