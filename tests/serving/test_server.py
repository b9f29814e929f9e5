"""``toolkit serve`` on loopback over a tiny export, driven by the official ``openai`` client: every output equals
the engine's own (``Engine.generate``), every bad request is a 4xx, disconnects and SIGTERM leave nothing behind.

The server runs as a subprocess (``python -m toolkit serve``), as a user starts it: its RSS, its exit code and
its signal handling are the real ones."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np
import openai
import pytest

from tests.runtime.test_scheduler import CONTEXT, folder  # noqa: F401  (the tiny export, built once per module)
from toolkit.runtime import GenerationConfig, load
from toolkit.serving.config import source_hash

MODEL = "tiny"


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value, the model_name label left out."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{").replace("{}", "")] = float(value)
        return out

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(export: Path, tmp: Path, *options: str) -> Served:
    port, log = free_port(), tmp / "server.log"
    argv = [sys.executable, "-m", "toolkit", "serve", str(export), "--port", str(port), "--threads", "1",
            "--served-model-name", MODEL, *options]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    served = Served(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(served.url + "/health").status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not become ready in 60 s: " + log.read_text()[-2000:])


def stop(served: Served) -> int:
    served.process.send_signal(signal.SIGTERM)
    try:
        return served.process.wait(timeout=30)
    finally:
        if served.process.poll() is None:
            served.process.kill()


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:  # noqa: F811
    served = start(folder, tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-queue", "16")
    yield served
    assert stop(served) == 0


@pytest.fixture(scope="module")
def engine(folder: Path):  # noqa: F811
    return load(folder, threads=1, max_batch=1)


def alone(engine, prompt, max_tokens: int, stop: tuple[str, ...] = ()):  # noqa: ANN001, ANN201
    return engine.generate(prompt, GenerationConfig(max_new_tokens=max_tokens, stop_strings=stop))


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


# --- shapes and outputs ----------------------------------------------------------------------------------
def test_chat_greedy_equals_engine_generate_token_for_token(server: Served, engine) -> None:  # noqa: ANN001
    expected = alone(engine, CHAT, 24)
    answer = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24,  # type: ignore[arg-type]
                                                     temperature=0, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == {"length": "length", "stop_token": "stop"}[expected.finish_reason]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = [engine.tokenizer.decode([i], skip_special_tokens=False) for i in expected.token_ids]
    assert [e.token for e in choice.logprobs.content] == tokens
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob < 0
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(engine.encode(CHAT)),
                                                                           len(expected.token_ids))
    assert answer.model == MODEL and answer.object == "chat.completion"


def test_streamed_chat_and_completion_equal_non_streamed(server: Served, engine) -> None:  # noqa: ANN001
    client = server.client()
    expected = alone(engine, CHAT, 30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0,  # type: ignore[arg-type]
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    prompt = "The quick brown fox jumps"
    expected = alone(engine, prompt, 20, stop=("x",))
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                              stop="x", stream=True))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop="x")
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text == expected.text
    reason = {"length": "length", "stop_token": "stop", "stop_string": "stop"}[expected.finish_reason]
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason == reason
    assert whole.usage is not None and whole.usage.completion_tokens == len(expected.token_ids)


def test_include_usage_adds_one_final_chunk_with_no_choices(server: Served, engine) -> None:  # noqa: ANN001
    expected = alone(engine, "hello", 12)
    chunks = list(server.client().completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        len(engine.encode("hello")), len(expected.token_ids), len(engine.encode("hello")) + len(expected.token_ids))
    assert body and all(c.usage is None and len(c.choices) == 1 for c in body)
    assert "".join(c.choices[0].text for c in body) == expected.text


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(server: Served) -> None:
    client = server.client()
    runs = [client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=1.3, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2)]
    greedy = client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0).choices[0].text
    assert runs[0] == runs[1] != greedy


def test_vllm_extensions_and_neutral_openai_fields_are_served(server: Served, engine) -> None:  # noqa: ANN001
    assert alone(engine, "holder 1", 40).finish_reason == "stop_token"  # the tiny model's eos comes early here
    expected = engine.generate("holder 1", GenerationConfig(max_new_tokens=40, stop_token_ids=(), top_k=5,
                                                            repetition_penalty=1.3))
    answer = server.client().completions.create(
        model=MODEL, prompt="holder 1", max_tokens=40, temperature=0, presence_penalty=0, frequency_penalty=0,
        user="someone", extra_body={"ignore_eos": True, "min_tokens": 40, "top_k": 5, "repetition_penalty": 1.3,
                                    "num_speculative_tokens": 0})
    assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 40


# --- refusals --------------------------------------------------------------------------------------------
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
BAD = [
    ("malformed JSON", "completions", b'{"model": "tiny", "prompt": ', 400, "Invalid JSON"),
    ("not an object", "completions", [1, 2], 400, "Input should be an object"),
    ("negative temperature", "completions", {**OK, "temperature": -0.5}, 400, "temperature"),
    ("NaN temperature", "completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("temperature as a string", "completions", {**OK, "temperature": "0.5"}, 400, "temperature"),
    ("top_p 0", "completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ("n 2", "completions", {**OK, "n": 2}, 400, "n"),
    ("max_tokens 0", "completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("negative seed", "completions", {**OK, "seed": -1}, 400, "seed"),
    ("five stops", "completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("no messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown role", "chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "role"),
    ("top_logprobs 21", "chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True,
                                             "top_logprobs": 21}, 400, "top_logprobs"),
    ("token id outside the vocabulary", "completions", {**OK, "prompt": [1, 10**6]}, 400, "outside the vocabulary"),
    ("can never fit", "completions", {**OK, "max_tokens": CONTEXT}, 400, f"the model's context is {CONTEXT}"),
    ("prompt fills the context", "completions", {"model": MODEL, "prompt": [65] * CONTEXT}, 400,
     f"the model's context is {CONTEXT}"),
    ("a field not served", "chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {}}, 400,
     "response_format: this server does not serve this field"),
    ("a penalty not served", "completions", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("min_tokens above max_tokens", "completions", {**OK, "min_tokens": 5}, 400,
     "min_tokens (5) must not exceed max_tokens (4)"),
    ("logprobs on completions", "completions", {**OK, "logprobs": 2}, 400, "/v1/chat/completions with logprobs"),
    ("speculation without a draft source", "completions", {**OK, "num_speculative_tokens": 2}, 400,
     "this server does not speculate (it was started without --draft or --prompt-lookup)"),
    ("unknown model", "completions", {**OK, "model": "gpt-4"}, 404, "use 'tiny'"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_their_4xx_with_a_message(server: Served, path: str, body: object, status: int,
                                                   message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]


def test_the_openai_client_sees_a_bad_request_as_its_4xx(server: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client().completions.create(model=MODEL, prompt="hi", top_p=2.0)
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        server.client().chat.completions.create(model="other", messages=CHAT)  # type: ignore[arg-type]


# --- health, models, metrics -----------------------------------------------------------------------------
def test_health_models_and_metric_names(server: Served, folder: Path) -> None:  # noqa: F811
    assert httpx.get(server.url + "/health").status_code == 200
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["version"] == source_hash(folder)
    server.client().completions.create(model=MODEL, prompt="warm", max_tokens=8, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds"):
        buckets = [float(b) for b in re.findall(rf'toolkit:{name}_bucket{{le="([^"]+)"', text)[:-1]]  # +Inf last
        assert buckets and buckets[0] < 0.007 and any(0.005 <= b < 0.01 for b in buckets), name  # 7 ms: not the first
    for name in ("prompt_tokens_total", "generation_tokens_total", 'request_success_total{finished_reason="length"}',
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert "toolkit:" + name.split("{")[0] in text, name
    metrics = server.metrics()
    assert metrics["toolkit:generation_tokens_total"] >= 8 and metrics["toolkit:prompt_tokens_total"] >= 1


def test_source_hash_is_the_runs_model_key(tmp_path: Path) -> None:
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    assert source_hash(export) is None
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"files": {}, "model": {"key": "abc123"}}))
    assert source_hash(export) == "abc123"


# --- load, disconnects ----------------------------------------------------------------------------------
def test_200_requests_at_concurrency_16_equal_single_requests(server: Served, engine) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "far", "away"]
    specs = [(" ".join(rng.choice(words, int(rng.integers(1, 60)))), int(rng.integers(1, 40)), i % 2 == 0)
             for i in range(232)]
    expected = [alone(engine, prompt, n) for prompt, n, _ in specs]

    async def drive(batch: list[int]) -> list[str]:
        client, gate = server.async_client(), asyncio.Semaphore(16)

        async def one(i: int) -> str:
            prompt, n, streamed = specs[i]
            async with gate:
                if streamed:
                    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                             temperature=0, stream=True)
                    return "".join([c.choices[0].text async for c in stream])
                return (await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                        temperature=0)).choices[0].text

        try:
            return await asyncio.gather(*(one(i) for i in batch))  # an HTTP error (any 5xx) raises here
        finally:
            await client.close()

    warm = list(range(200, 232))
    assert asyncio.run(drive(warm)) == [expected[i].text for i in warm]  # the cache and the arenas reach size
    before = server.rss_kb()
    assert asyncio.run(drive(list(range(200)))) == [expected[i].text for i in range(200)]
    assert abs(server.rss_kb() - before) <= 0.05 * before
    metrics = server.metrics()
    assert metrics["toolkit:num_requests_running"] == 0 and metrics["toolkit:kv_cache_usage_perc"] == 0


def test_disconnects_free_their_rows_beside_a_request_that_finishes(server: Served, engine) -> None:  # noqa: ANN001
    beside_prompt, long = "A request running beside the others", CONTEXT - 64
    expected = alone(engine, beside_prompt, long)
    aborted_before = server.metrics().get('toolkit:request_success_total{finished_reason="abort"}', 0.0)

    async def scenario() -> tuple[str, bool]:
        client = server.async_client()

        async def beside() -> str:
            stream = await client.completions.create(model=MODEL, prompt=beside_prompt, max_tokens=long,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def read_one_and_leave(prompt: str) -> None:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=long, temperature=0,
                                                     stream=True)
            async for _ in stream:
                break
            await stream.close()

        running = asyncio.ensure_future(beside())
        holders = []
        for i in (0, 2, 3):  # with the one beside, every row (--max-batch 4) is busy ("holder 1" meets eos early)
            stream = await client.completions.create(model=MODEL, prompt=f"holder {i}", max_tokens=long,
                                                     temperature=0, stream=True)
            await stream.__anext__()
            holders.append(stream)
        queued = [asyncio.ensure_future(client.completions.create(model=MODEL, prompt=f"queued {i}",
                                                                  max_tokens=8, temperature=0)) for i in range(5)]
        deadline = time.monotonic() + 10
        while server.metrics()["toolkit:num_requests_waiting"] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.metrics()["toolkit:num_requests_waiting"] == 5
        for task in queued:  # disconnect while queued
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        for stream in holders:  # disconnect mid-stream
            await stream.close()
        gate = asyncio.Semaphore(3)

        async def leave(i: int) -> None:
            async with gate:
                await read_one_and_leave(f"leaver {i}")

        await asyncio.gather(*(leave(i) for i in range(17)))
        still_running = not running.done()
        text = await running
        await client.close()
        return text, still_running

    text, overlapped = asyncio.run(scenario())
    assert text == expected.text and overlapped  # it ran through all 25 disconnects and finished correctly
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["toolkit:num_requests_running"] == 0 and metrics["toolkit:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    assert metrics["toolkit:num_requests_running"] == 0 and metrics["toolkit:kv_cache_usage_perc"] == 0
    assert metrics["toolkit:num_requests_waiting"] == 0
    assert metrics['toolkit:request_success_total{finished_reason="abort"}'] - aborted_before == 25
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith('{"request"')]
    assert sum(line["finish_reason"] == "abort" for line in lines) >= 25
    assert {"prompt_tokens", "generated_tokens", "queue_ms", "ttft_ms", "decode_ms"} <= set(lines[-1])


# --- shutdown --------------------------------------------------------------------------------------------
def test_sigterm_under_load_ends_every_stream_and_exits_0(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    served = start(folder, tmp_path, "--max-batch", "4", "--max-queue", "8", "--shutdown-timeout", "0.5")
    try:
        async def streams() -> tuple[list[list[str | None]], int]:
            client = served.async_client()
            opened = [await client.completions.create(model=MODEL, prompt=f"stream {i}", temperature=0,
                                                      max_tokens=8 if i < 2 else CONTEXT - 64, stream=True)
                      for i in range(6)]
            firsts = [await s.__anext__() for s in opened[:4]]  # four running, two queued
            served.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            refused = httpx.post(served.url + "/v1/completions", json=OK).status_code

            async def rest(stream, first) -> list[str | None]:  # noqa: ANN001
                return [c.choices[0].finish_reason for c in ([first] if first else []) + [c async for c in stream]]

            ends = await asyncio.gather(*(rest(s, f) for s, f in zip(opened, firsts + [None, None], strict=True)))
            await client.close()
            return ends, refused

        ends, refused = asyncio.run(streams())
        assert refused == 503
        assert served.process.wait(timeout=30) == 0
        for reasons in ends:  # every stream got its final chunk (the openai client saw [DONE] to end the loop)
            assert reasons[-1] is not None and all(r is None for r in reasons[:-1])
        assert {e[-1] for e in ends[:2]} <= {"length", "stop"} and "abort" in {e[-1] for e in ends[2:]}
    finally:
        if served.process.poll() is None:
            served.process.kill()
