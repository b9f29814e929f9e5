"""``toolkit serve --draft EXPORT | --prompt-lookup``: every request speculates unless it turns it off, greedy output
equals plain greedy decoding token for token (streamed or not, concurrent requests accepting different lengths),
multi-token steps stream as one chunk per token, vLLM's spec_decode counters add up, and bad speculation settings
are refused in one line before the port opens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from tests.runtime.test_speculative import draft, target, with_swapped_vocabulary  # noqa: F401  (tiny target, and a noisy copy as its draft)
from tests.serving.test_server import MODEL, Served, start, stop
from toolkit import cli
from toolkit.runtime import GenerationConfig, load
from toolkit.serving import app as serving_app
from toolkit.serving.loop import EngineLoop, Request
from toolkit.serving.metrics import Metrics

PROMPTS = ["Hello tiny world", "The quick brown fox jumps", "abcabcabc", "def f(x): return x + 1",
           "Once upon a time", "1, 2, 3, 4,", "quote: 'to be or not'", "zzz"]
N = 48  # tokens per request (ignore_eos: every request runs to its limit)
K = 4  # the server's longest draft


@pytest.fixture(scope="module")
def plain(target: Path) -> dict[str, str]:  # noqa: F811
    """Each prompt's greedy text from the target alone, no speculation."""
    engine = load(target, threads=1, max_batch=1)
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=(), num_draft_tokens=0)
    return {p: engine.generate(p, config).text for p in PROMPTS}


Tokens = list[tuple[str, float]]  # (token, logprob) per generated token, as the chat logprobs name them


@pytest.fixture(scope="module")
def plain_chat(target: Path) -> dict[str, tuple[str, Tokens]]:  # noqa: F811
    """Each prompt as a user message: the target's greedy text and its tokens with their logprobs (the text alone
    hides which high bytes make its replacement characters)."""
    engine = load(target, threads=1, max_batch=1)
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=(), num_draft_tokens=0, logprobs=0)
    out = {}
    for p in PROMPTS:
        handle = engine.submit([{"role": "user", "content": p}], config)
        text = "".join(c.text for c in engine.follow(handle))
        out[p] = text, [(engine.tokenizer.decode([e.token_id], skip_special_tokens=False), e.logprob)
                        for e in handle.seq.logprobs]
    return out


def speculating(source: list[str], tmp_path_factory: pytest.TempPathFactory, target: Path) -> Iterator[Served]:  # noqa: F811
    served = start(target, tmp_path_factory.mktemp("spec-serve"), "--max-batch", "4", *source,
                   "--num-draft-tokens", str(K))
    yield served
    assert stop(served) == 0


@pytest.fixture(scope="module")
def drafted(target: Path, draft: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:  # noqa: F811
    yield from speculating(["--draft", str(draft)], tmp_path_factory, target)


@pytest.fixture(scope="module", params=["draft", "prompt_lookup"])
def either(request: pytest.FixtureRequest, drafted: Served, target: Path,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The server with each draft source in turn."""
    if request.param == "draft":
        yield drafted
        return
    yield from speculating(["--prompt-lookup"], tmp_path_factory, target)


def log_lines(served: Served) -> dict[str, dict[str, Any]]:
    """The server's one line per finished request, by request id."""
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.startswith('{"request"')]
    return {line["request"]: line for line in lines}


def spec_metrics(served: Served) -> dict[str, float]:
    return {k.removeprefix("toolkit:spec_decode_"): v for k, v in served.metrics().items()
            if k.startswith("toolkit:spec_decode_") and "_total" in k}


async def chat(client: openai.AsyncOpenAI, prompt: str, streamed: bool) -> tuple[str, str, Tokens]:
    """(request id, text, tokens) of a greedy chat answer of N tokens with logprobs."""
    kwargs: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=N,
                                  temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    if streamed:
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
        rid, text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    else:
        answer = await client.chat.completions.create(**kwargs)
        assert answer.choices[0].logprobs is not None
        rid, text, entries = answer.id, answer.choices[0].message.content or "", answer.choices[0].logprobs.content or []
    return rid, text, [(e.token, e.logprob) for e in entries]


async def complete(client: openai.AsyncOpenAI, prompt: str, streamed: bool, **extra: Any) -> tuple[str, str]:
    """(request id, text) of a greedy completion of N tokens."""
    kwargs: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    if streamed:
        chunks = [c async for c in await client.completions.create(stream=True, **kwargs)]
        return chunks[0].id, "".join(c.choices[0].text for c in chunks)
    answer = await client.completions.create(**kwargs)
    return answer.id, answer.choices[0].text


def test_concurrent_greedy_requests_equal_plain_greedy_and_the_counters_add_up(
        either: Served, plain_chat: dict[str, tuple[str, Tokens]]) -> None:
    before = spec_metrics(either)  # vLLM's names, every position's counter there from the start
    assert set(before) == {"num_drafts_total", "num_draft_tokens_total", "num_accepted_tokens_total",
                           *(f'num_accepted_tokens_per_pos_total{{position="{i}"}}' for i in range(K))}

    async def drive() -> list[tuple[str, str, Tokens]]:
        client, gate = either.async_client(), asyncio.Semaphore(4)

        async def one(i: int) -> tuple[str, str, Tokens]:
            async with gate:
                return await chat(client, PROMPTS[i % len(PROMPTS)], streamed=i % 2 == 1)

        try:
            return await asyncio.gather(*(one(i) for i in range(2 * len(PROMPTS))))
        finally:
            await client.close()

    answers = asyncio.run(drive())
    for i, (_, text, tokens) in enumerate(answers):
        expected_text, expected_tokens = plain_chat[PROMPTS[i % len(PROMPTS)]]
        assert text == expected_text and [t for t, _ in tokens] == [t for t, _ in expected_tokens], i
        # a verify row's logits differ from a one-token decode's in the last bits (< 1e-3: scheduler.py)
        assert [lp for _, lp in tokens] == pytest.approx([lp for _, lp in expected_tokens], abs=1e-3), i
    lines = [log_lines(either)[rid] for rid, _, _ in answers]
    assert all(line["generated_tokens"] == N for line in lines)
    rates = {line["spec_accepted_tokens"] / max(line["spec_draft_tokens"], 1) for line in lines}
    assert len(rates) > 1 and max(rates) > 0  # they speculated, and accepted different lengths
    now = spec_metrics(either)
    after = {name: now[name] - before[name] for name in now}
    for name, field in (("num_drafts_total", "spec_drafts"), ("num_draft_tokens_total", "spec_draft_tokens"),
                        ("num_accepted_tokens_total", "spec_accepted_tokens")):
        assert after[name] == sum(line[field] for line in lines), name
    per_pos = [after[f'num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(K)]
    assert sum(per_pos) == after["num_accepted_tokens_total"] > 0
    assert per_pos == sorted(per_pos, reverse=True) and per_pos[0] <= after["num_drafts_total"]
    assert after["num_drafts_total"] <= after["num_draft_tokens_total"] <= K * after["num_drafts_total"]


def test_a_request_turns_speculation_off_or_shortens_it_within_the_servers_limit(drafted: Served,
                                                                                 plain: dict[str, str]) -> None:
    prompt = PROMPTS[1]

    async def drive() -> list[tuple[str, str]]:
        client = drafted.async_client()
        try:
            return [await complete(client, prompt, streamed, num_speculative_tokens=k)
                    for k, streamed in ((0, False), (0, True), (1, False), (K, True))]
        finally:
            await client.close()

    before = spec_metrics(drafted)
    off, off_streamed, one, full = asyncio.run(drive())
    assert {off[1], off_streamed[1], one[1], full[1]} == {plain[prompt]}
    lines = log_lines(drafted)
    assert "spec_drafts" not in lines[off[0]] and "spec_drafts" not in lines[off_streamed[0]]
    assert 0 < lines[one[0]]["spec_drafts"] == lines[one[0]]["spec_draft_tokens"]  # never more than one a draft
    assert lines[full[0]]["spec_draft_tokens"] > lines[full[0]]["spec_drafts"]
    after = spec_metrics(drafted)
    assert after["num_drafts_total"] - before["num_drafts_total"] == lines[one[0]]["spec_drafts"] + \
        lines[full[0]]["spec_drafts"]

    with pytest.raises(openai.BadRequestError, match=rf"num_speculative_tokens \({K + 1}\) must not exceed the "
                                                     rf"server's --num-draft-tokens \({K}\)"):
        drafted.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                            extra_body={"num_speculative_tokens": K + 1})
    for bad in (-1, "2", 1.5):
        response = httpx.post(drafted.url + "/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                     "num_speculative_tokens": bad})
        assert response.status_code == 400 and "num_speculative_tokens" in response.json()["error"]["message"]


def test_multi_token_steps_stream_as_one_chunk_per_token(target: Path, tmp_path: Path) -> None:  # noqa: F811
    """Prompt lookup on a prompt that repeats itself keeps several tokens a step; each leaves as its own chunk with
    its own logprobs entry, and the text is plain greedy's."""
    messages = [{"role": "user", "content": "abc abc abc abc abc abc abc abc abc abc abc abc"}]
    engine = load(target, threads=1, max_batch=1)
    expected = engine.generate(messages, GenerationConfig(max_new_tokens=N, stop_token_ids=(), num_draft_tokens=0))
    served = start(target, tmp_path, "--prompt-lookup", "--num-draft-tokens", "8")
    try:
        chunks = list(served.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=N, temperature=0, logprobs=True, stream=True,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True}))
        line = log_lines(served)[chunks[0].id]
    finally:
        assert stop(served) == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    entries = [len(c.choices[0].logprobs.content or []) if c.choices[0].logprobs else 0 for c in chunks]
    assert entries == [1] * N  # the last token's chunk carries the finish reason
    tokens = [engine.tokenizer.decode([i], skip_special_tokens=False) for i in expected.token_ids]
    assert [c.choices[0].logprobs.content[0].token for c in chunks] == tokens  # type: ignore[union-attr,index]
    assert chunks[-1].choices[0].finish_reason == "length" and line["generated_tokens"] == N
    assert line["spec_accepted_tokens"] >= 4  # steps kept several tokens, and still one chunk per token


def test_speculation_turns_itself_down_as_the_server_loops_batch_grows(target: Path, draft: Path) -> None:  # noqa: F811
    """Through the server's engine loop: the draft length is K // running rows, so four rows with K = 2 draft
    nothing, and the outputs still equal plain greedy."""
    engine = load(target, threads=1, max_batch=4, draft=draft)
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=(), num_draft_tokens=2)
    plain = [engine.generate(p, GenerationConfig(max_new_tokens=N, stop_token_ids=(), num_draft_tokens=0)).token_ids
             for p in PROMPTS[:4]]
    calls: list[tuple[int, int]] = []  # (rows running, draft length) of every verify
    widths: list[int] = []  # rows running at every decode step
    speculate, decode = engine.scheduler.speculate, engine.scheduler.decode

    def recorded(handle: Any, k: int) -> bool:
        calls.append((len(engine.scheduler.running), k))
        return speculate(handle, k)

    def decoding() -> None:
        widths.append(len(engine.scheduler.running))
        decode()

    engine.scheduler.speculate = recorded  # type: ignore[method-assign]
    engine.scheduler.decode = decoding  # type: ignore[method-assign]

    async def scenario() -> list[list[int]]:
        loop = EngineLoop(engine, Metrics("tiny", 2))
        requests = [Request(str(i), time.perf_counter(), asyncio.get_running_loop()) for i in range(4)]
        try:
            ids = [engine.encode(p) for p in PROMPTS[:4]]
            await asyncio.to_thread(lambda: [loop.submit(r, i, config) for r, i in zip(requests, ids, strict=True)])
            tokens: list[list[int]] = []
            for request in requests:
                out = [await asyncio.wait_for(request.updates.get(), 60)]
                while out[-1].finish_reason is None:
                    out.append(await asyncio.wait_for(request.updates.get(), 60))
                tokens.append([c.token_id for u in out for c in u.chunks])
            return tokens
        finally:
            loop.stop()

    assert asyncio.run(scenario()) == plain
    assert widths.count(4) >= 10  # the four rows decoded together (submitted one by one, they start apart)
    assert calls and all(1 <= k <= 2 // rows for rows, k in calls)  # drafts only while one or two rows ran


# --- refusals before the port opens ------------------------------------------------------------------------
@pytest.fixture
def no_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_app, "listen", lambda *a: pytest.fail("the port was opened"))


def test_bad_speculation_settings_are_refused_in_one_line(target: Path, draft: Path, tmp_path: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str], no_port: None) -> None:
    other = with_swapped_vocabulary(draft, tmp_path / "other")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.onnx").write_bytes(b"not a graph")
    cases = [
        (["--prompt-lookup", "--num-draft-tokens", "0"], "error: --num-draft-tokens must be in [1, 32] (got 0); "
         "to serve without speculation leave --draft and --prompt-lookup out"),
        (["--draft", str(draft), "--num-draft-tokens", "33"], "error: --num-draft-tokens must be in [1, 32] (got 33)"),
        (["--num-draft-tokens", "3"], "error: --num-draft-tokens is the longest draft of --draft or --prompt-lookup"),
        (["--draft", str(draft), "--prompt-lookup"], "error: --draft and --prompt-lookup are two draft sources"),
        (["--batch-exact"], "error: --batch-exact is how --draft or --prompt-lookup decode a batch"),
        (["--draft", str(tmp_path)], f"error: --draft {tmp_path} holds no model.onnx"),
        (["--draft", str(junk)], "it is not an export folder"),
        (["--draft", str(other)], f"error: {other} cannot draft for {target}: their tokenizers differ"),
    ]
    for options, message in cases:
        assert cli.main(["serve", str(target), "--port", "0", *options]) == 2, options
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (options, err)
