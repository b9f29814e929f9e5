"""The engine-lifetime scheduler: concurrent streams, interleaved submissions and cancellations, chunked prefill,
k-token scoring and the processed sampling distribution. Every output is compared with the request run alone."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime import GenerationConfig, load, sampling
from toolkit.runtime.scheduler import Scheduler

CONTEXT = 2304  # room for the 2,000-token prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sched") / "fp32"
    with atomic_dir(out) as tmp:
        export(tiny_llama(max_position_embeddings=CONTEXT), tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    return out


@pytest.fixture(scope="module")
def standard_folder(tmp_path_factory) -> Path:
    """The standard target: a fixed-capacity cache that TensorScatter writes (past and present share the buffer)."""
    out = tmp_path_factory.mktemp("sched") / "std"
    with atomic_dir(out) as tmp:
        export(tiny_llama(), tiny_tokenizer(), ONNXConfig(target="standard", accuracy_level=0), tmp)
    return out


def ids_of(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(0, 256, n)]  # byte tokens: any list is a valid prompt


def record(obj: object, name: str, log: list) -> None:
    """Wrap ``obj.name`` so that every call appends (name, args) to ``log``."""
    inner = getattr(obj, name)

    def wrapped(*args, **kw):  # type: ignore[no-untyped-def]
        log.append((name, args))
        return inner(*args, **kw)

    setattr(obj, name, wrapped)


def test_two_threads_streaming_on_one_engine_equal_single_requests(folder):
    engine = load(folder, threads=1, max_batch=4)
    requests = [("Hello tiny world, this is a prompt", GenerationConfig(max_new_tokens=40, stop_token_ids=())),
                ("The quick brown fox", GenerationConfig(max_new_tokens=30, do_sample=True, temperature=1.3,
                                                          top_k=40, top_p=0.9, seed=3, stop_token_ids=()))]
    alone = [engine.generate(p, c) for p, c in requests]
    widths: list[int] = []
    inner = engine.scheduler.decode_one_token

    def decode() -> None:
        widths.append(len(engine.scheduler.running))
        inner()

    engine.scheduler.decode_one_token = decode  # type: ignore[method-assign]
    first_out, second_out = threading.Event(), threading.Event()
    got: dict[int, tuple[list[int], str, object]] = {}

    def consume(i: int) -> None:
        if i == 1:
            first_out.wait()
        stream = engine.stream(*requests[i])
        chunks = [next(stream)]
        (first_out if i == 0 else second_out).set()
        if i == 0:
            second_out.wait()  # the first stream is mid-way when the second one starts
        chunks += list(stream)
        got[i] = [c.token_id for c in chunks], "".join(c.text for c in chunks), engine.last_timings

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, result in enumerate(alone):
        tokens, text, timings = got[i]
        assert tokens == result.token_ids and text == result.text
        assert timings is not None and len(timings.token_latencies_s) == len(tokens) - 1  # each thread its own
    assert max(widths) == 2  # the two requests were decoded in the same batched calls
    assert not engine.scheduler.busy and engine.pool.blocks_in_use == 0


def test_200_submissions_with_cancellations_equal_single_requests(folder):
    engine = load(folder, threads=1, max_batch=4, prefill_chunk=8)  # prompts of up to 40 tokens: up to 5 chunks
    rng = np.random.default_rng(0)
    specs = []
    for i in range(200):
        sampled = bool(i % 2)
        config = GenerationConfig(max_new_tokens=int(rng.integers(1, 13)), do_sample=sampled, temperature=1.2,
                                  top_k=int(rng.integers(0, 20)), top_p=0.95, seed=i if sampled else None)
        specs.append((ids_of(rng, int(rng.integers(1, 41))), config))
    alone = [engine.generate(ids, config).token_ids for ids, config in specs]
    allocations: list = []
    record(engine.backend, "allocate", allocations)
    to_cancel = {int(i): int(rng.integers(0, 25)) for i in rng.choice(200, 70, replace=False)}  # request -> delay

    handles, cancel_at, cancelled_in = [], {}, []
    step = 0
    while len(handles) < 200 or engine.scheduler.busy:
        if len(handles) < 200 and rng.random() < 0.3:  # arrivals at about the rate the rows drain
            i = len(handles)
            handles.append(engine.submit(*specs[i], with_text=False))
            if i in to_cancel:
                cancel_at.setdefault(step + to_cancel[i], []).append(i)
        for i in cancel_at.pop(step, []):
            h = handles[i]
            where = ("done" if h.done else "waiting" if h in engine.scheduler.waiting else
                     "prefilling" if h in engine.scheduler.prefilling else "running")
            cancelled_in.append(where)
            engine.cancel(h)
        engine.step()
        step += 1
    assert {"waiting", "prefilling", "running"} <= set(cancelled_in)  # cancellations hit every stage
    finished = 0
    for i, h in enumerate(handles):
        streamed = [c.token_id for c in h.chunks]
        result = engine.result(h)
        if result.finish_reason == "cancelled":
            assert i in to_cancel and alone[i][: len(result.token_ids)] == result.token_ids
        else:
            finished += 1
            assert result.token_ids == alone[i] and streamed[: len(alone[i])] == alone[i]
    assert 120 <= finished < 200
    assert engine.pool.blocks_in_use == 0 and not engine.scheduler.rows and engine.pool.has_free_slot()
    assert len(allocations) <= 2  # grown a couple of times at most, never once per request


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(folder):
    engine = load(folder, threads=1, max_batch=4, prefill_chunk=256)
    config = GenerationConfig(max_new_tokens=40, stop_token_ids=())
    short = [engine.submit(p, config, with_text=False) for p in ("abc", "hello there")]
    while not all(h.chunks for h in short):
        engine.step()
    long_prompt = ids_of(np.random.default_rng(1), 2000)
    long_config = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    calls: list = []
    record(engine.backend, "prefill", calls)
    record(engine.backend, "decode_next", calls)
    long = engine.submit(long_prompt, long_config, with_text=False)
    while engine.scheduler.busy:
        engine.step()
    slot = long.seq.slot
    chunks = [(i, args) for i, (name, args) in enumerate(calls) if name == "prefill" and args[0] == slot]
    assert [args[2] for _, args in chunks] == list(range(0, 2000, 256))  # 8 chunks, each at most the step budget
    assert sum(len(args[1]) for _, args in chunks) == 2000
    for (a, _), (b, _) in zip(chunks, chunks[1:], strict=False):
        assert any(name == "decode_next" for name, _ in calls[a + 1 : b])  # the short rows went on between chunks
    assert [engine.result(h).token_ids for h in short] == [engine.generate(p, config).token_ids
                                                          for p in ("abc", "hello there")]
    assert engine.result(long).token_ids == engine.generate(long_prompt, long_config).token_ids


@pytest.mark.parametrize("export_folder", ["folder", "standard_folder"])
def test_score_equals_one_token_decodes_and_rolls_back_by_length(request, export_folder):
    backend = load(request.getfixturevalue(export_folder), threads=1).backend
    cache = backend.allocate(3, 64)
    rng = np.random.default_rng(2)
    for row, n in enumerate((5, 9, 3)):
        backend.prefill(row, np.array(ids_of(rng, n)), 0)
    lengths, rows = np.array([5, 9, 3]), np.array([0, 2])  # two rows of different lengths, not adjacent
    drafts = np.array([ids_of(rng, 4), [0] * 4, ids_of(rng, 4)])  # [3, k]
    snapshot = [b.copy() for b in cache.buffers]
    stepped = []
    for j in range(4):
        stepped.append(backend.decode(drafts[:, j], lengths + j).copy())  # [3, V]
    for b, s in zip(cache.buffers, snapshot, strict=True):
        b[:] = s
    pointers = cache.data_pointers()
    scored = backend.score(rows, drafts[rows], lengths[rows])  # [2, 4, V]
    for i, row in enumerate(rows):
        expected = np.stack([stepped[j][row] for j in range(4)])
        np.testing.assert_allclose(scored[i], expected, atol=1e-4)
        assert (scored[i].argmax(-1) == expected.argmax(-1)).all()
    # rolling back is a shorter length: the 4 scored columns are ignored, then overwritten
    again = backend.decode(drafts[:, 0], lengths)
    np.testing.assert_allclose(again[rows], stepped[0][rows], atol=1e-4)
    assert backend.cache is cache and cache.data_pointers() == pointers
    with pytest.raises(ToolkitError, match=r"tokens \[B, k\]"):
        backend.score(rows, drafts[0], lengths[rows])


def test_cancel_of_a_finished_request_changes_nothing_and_bad_sizes_are_refused(folder):
    engine = load(folder, threads=1, max_batch=2)
    handle = engine.submit("abc", GenerationConfig(max_new_tokens=3, stop_token_ids=()))
    tokens = [c.token_id for c in engine.follow(handle)]
    engine.cancel(handle)
    assert engine.result(handle).finish_reason == "length" and len(tokens) == 3
    for max_batch, step_tokens in ((0, 8), (2, 0)):
        with pytest.raises(ToolkitError, match="max_batch and step_tokens must be >= 1"):
            Scheduler(engine.backend, max_batch, 16, step_tokens)


def test_closing_a_stream_early_cancels_its_request(folder):
    engine = load(folder, threads=1, max_batch=2)
    stream = engine.stream("abc", GenerationConfig(max_new_tokens=50, stop_token_ids=()))
    next(stream)
    assert engine.pool.blocks_in_use > 0
    stream.close()
    assert engine.pool.blocks_in_use == 0 and not engine.scheduler.busy


def _old_sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """``sampling.sample`` before the distribution was exposed (the reference for identical draws)."""
    ids, vals = sampling.top_k_top_p(logits.astype(np.float64) / temperature, top_k, top_p)
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])


def test_sample_draws_what_it_drew_before_at_the_same_seed():
    logits = np.random.default_rng(0).normal(0, 3, (50, 259)).astype(np.float32)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 40, 0.9), (1.5, 5, 1.0), (1.0, 0, 0.5)):
        ours, before = np.random.default_rng(11), np.random.default_rng(11)
        drawn = [sampling.sample(row, temperature, top_k, top_p, ours) for row in logits]
        assert drawn == [_old_sample(row, temperature, top_k, top_p, before) for row in logits]


def test_distribution_applies_penalty_temperature_top_k_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=2.0)
    choice = sampling.choose(logits, config, np.random.default_rng(0), seen=np.array([0]))
    # penalty: log 0.4 * 2 (negative logit); temperature 0.5; top-3 drops id 3; top-p keeps what reaches 0.9
    scaled = np.array([np.log(0.4) * 2, np.log(0.3), np.log(0.2)]) / 0.5
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = int(np.searchsorted(np.cumsum(probs[order]), 0.9) + 1)
    expected = probs[order[:keep]] / probs[order[:keep]].sum()
    assert choice.ids.tolist() == order[:keep].tolist() and choice.token in choice.ids.tolist()
    np.testing.assert_allclose(choice.probs, expected)
    assert choice.dense(4).sum() == pytest.approx(1.0) and choice.dense(4)[3] == 0.0
    greedy = sampling.choose(logits, GenerationConfig(), np.random.default_rng(0))
    assert greedy.token == 0 and greedy.probs.tolist() == [1.0]


def test_cache_grows_under_running_rows_without_disturbing_them(folder):
    engine = load(folder, threads=1, max_batch=4)
    small, large = GenerationConfig(max_new_tokens=30, stop_token_ids=()), GenerationConfig(max_new_tokens=200,
                                                                                             stop_token_ids=())
    alone = [engine.generate("abc", small).token_ids, engine.generate("hello", large).token_ids]
    engine = load(folder, threads=1, max_batch=4)
    first = engine.submit("abc", small, with_text=False)
    while len(first.chunks) < 5:
        engine.step()
    cache = engine.backend.cache
    assert cache is not None and (cache.slots, cache.capacity) == (1, 48)
    second = engine.submit("hello", large, with_text=False)
    while engine.scheduler.busy:
        engine.step()
    grown = engine.backend.cache
    assert grown is not cache and (grown.slots, grown.capacity) == (2, 208)  # doubled rows, the columns it needs
    assert [engine.result(h).token_ids for h in (first, second)] == alone
