"""The engine loop: tokens reach asyncio in order and leave as events when they are made, and a failing engine step
ends the requests in flight with its message instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np
import uvicorn

from tests.runtime.test_scheduler import folder  # noqa: F401  (the tiny export, built once per module)
from toolkit.runtime import GenerationConfig, load
from toolkit.serving.app import Server, create_app, listen
from toolkit.serving.config import ServeConfig
from toolkit.serving.loop import EngineLoop, Request, Update
from toolkit.serving.metrics import Metrics


async def updates_of(request: Request) -> list[Update]:
    out = [await asyncio.wait_for(request.updates.get(), 30)]
    while out[-1].finish_reason is None:
        out.append(await asyncio.wait_for(request.updates.get(), 30))
    return out


def test_tokens_arrive_in_order_and_a_failing_step_ends_the_requests(folder: Path) -> None:  # noqa: F811
    engine = load(folder, threads=1, max_batch=2)
    config = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    expected = engine.generate("hello", config).token_ids

    metrics = Metrics("tiny")

    async def scenario() -> tuple[list[Update], list[Update]]:
        loop = EngineLoop(engine, metrics)
        try:
            ok = Request("ok", time.perf_counter(), asyncio.get_running_loop())
            await asyncio.to_thread(loop.submit, ok, engine.encode("hello"), config)
            good = await updates_of(ok)

            def boom(*args: Any, **kw: Any) -> tuple[np.ndarray, None]:
                raise RuntimeError("the graph failed")

            # the scheduler's decode calls: a batch's and one stream's
            engine.backend.decode_next = engine.backend.decode_row = boom  # type: ignore[method-assign]
            failing = Request("bad", time.perf_counter(), asyncio.get_running_loop())
            await asyncio.to_thread(loop.submit, failing, engine.encode("hello"), config)
            return good, await updates_of(failing)
        finally:
            loop.stop()

    good, bad = asyncio.run(scenario())
    assert [c.token_id for u in good for c in u.chunks] == expected and good[-1].finish_reason == "length"
    assert bad[-1].finish_reason == "abort" and bad[-1].error == "RuntimeError: the graph failed"
    assert engine.pool.blocks_in_use == 0 and not engine.scheduler.busy

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value("toolkit:" + name, {"model_name": "tiny", **labels})

    prompt = len(engine.encode("hello"))  # both were prefilled; the failing one chose its first token, then failed
    assert (sample("prompt_tokens_total"), sample("generation_tokens_total")) == (2 * prompt, len(expected) + 1)
    assert sample("request_success_total", finished_reason="length") == 1
    assert sample("request_success_total", finished_reason="abort") == 1
    assert sample("time_to_first_token_seconds_count") == 2 and sample("inter_token_latency_seconds_count") == 5


def test_tokens_of_a_slow_engine_arrive_one_event_each_as_they_are_made(folder: Path) -> None:  # noqa: F811
    """Each decode step's token leaves as its own server-sent event when it is chosen: neither the hand-over from the
    loop thread to asyncio nor sse-starlette holds tokens back to send them in a burst."""
    step_s, tokens = 0.1, 6

    class SlowServer(Server):
        def load(self) -> None:
            super().load()
            assert self.engine is not None
            backend = self.engine.backend

            def slowed(decode: Any) -> Any:
                def slow(*args: Any, **kw: Any) -> Any:
                    time.sleep(step_s)  # a large model's step: the GIL is free meanwhile, as inside session.run
                    return decode(*args, **kw)
                return slow

            backend.decode_next, backend.decode_row = slowed(backend.decode_next), slowed(backend.decode_row)  # type: ignore[method-assign]

    server = SlowServer(ServeConfig(folder, threads=1, served_model_name="tiny"))
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (server.engine and httpx.get(url + "/health").status_code == 200):
            assert time.monotonic() < deadline, "the server did not load in 60 s"
            time.sleep(0.05)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": True, "stream": True}
        events = []  # (arrival, tokens in the event): logprobs name every token, even one that is no text yet
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[len("data: "):])["choices"]
                    if choices and choices[0]["logprobs"]:
                        events.append((time.perf_counter(), len(choices[0]["logprobs"]["content"])))
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
    assert [n for _, n in events] == [1] * tokens
    gaps = np.diff([t for t, _ in events])
    assert gaps.min() > step_s / 2, f"tokens arrived in bursts: gaps {np.round(gaps * 1000, 1)} ms"
