"""The engine loop on its own: tokens reach asyncio in order, and a failing engine step ends the requests in
flight with its message instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from tests.runtime.test_scheduler import folder  # noqa: F401  (the tiny export, built once per module)
from toolkit.runtime import GenerationConfig, load
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

            def boom(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
                raise RuntimeError("the graph failed")

            engine.backend.decode = boom  # type: ignore[method-assign]
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
