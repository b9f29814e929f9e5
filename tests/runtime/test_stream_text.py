"""What a stream hands out besides token ids: its text (equal to a decode of all the ids) and, when asked, the
model's log-probabilities at every choice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_scheduler import folder  # noqa: F401  (the tiny export, built once per module)
from toolkit.errors import ToolkitError
from toolkit.runtime import GenerationConfig, load
from toolkit.runtime.generation import MAX_LOGPROBS, token_logprobs

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_streamed_text_equals_the_decode_of_all_ids_when_bytes_stay_incomplete(folder: Path) -> None:  # noqa: F811
    engine = load(folder, threads=1, max_batch=1)
    config = GenerationConfig(max_new_tokens=24)
    whole = engine.generate(CHAT, config)
    assert "\ufffd" in whole.text  # the tiny model's bytes never complete a character: the case that was dropped
    assert "".join(c.text for c in engine.stream(CHAT, config)) == whole.text


def test_logprobs_are_recorded_per_choice_with_the_top_alternatives(folder: Path) -> None:  # noqa: F811
    engine = load(folder, threads=1, max_batch=1)
    handle = engine.submit("hello", GenerationConfig(max_new_tokens=10, logprobs=3, stop_token_ids=()))
    tokens = [c.token_id for c in engine.follow(handle)]
    entries = handle.seq.logprobs
    assert [e.token_id for e in entries] == tokens
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top) == 3 and e.top[0] == (e.token_id, e.logprob)
        assert e.logprob <= 0 and sum(math.exp(lp) for _, lp in e.top) <= 1 + 1e-9
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    assert engine.submit("hello", GenerationConfig(max_new_tokens=2)).seq.logprobs == []


def test_token_logprobs_is_the_log_softmax() -> None:
    logits = np.array([2.0, 1.0, -np.inf, 0.5], np.float32)
    entry = token_logprobs(logits, 1, 2)
    probs = np.exp(logits.astype(np.float64))
    expected = np.log(probs[1] / probs.sum())
    assert entry.logprob == pytest.approx(expected) and [i for i, _ in entry.top] == [0, 1]


@pytest.mark.parametrize("logprobs", [-1, MAX_LOGPROBS + 1])
def test_logprobs_outside_the_range_are_refused(logprobs: int) -> None:
    with pytest.raises(ToolkitError, match=rf"logprobs must be in \[0, {MAX_LOGPROBS}\]"):
        GenerationConfig(logprobs=logprobs)
