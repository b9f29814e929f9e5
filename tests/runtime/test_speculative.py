"""Speculative decoding: greedy output equal to plain greedy token for token (both draft sources, batches of rows
with different acceptance lengths), lossless sampling by a chi-square test, and the draft's refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from tests.conftest import requires_smollm2
from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime import GenerationConfig, load, sampling
from toolkit.runtime.backend import BackendOptions, OrtBackend
from toolkit.runtime.speculative import (
    DraftLength,
    NgramIndex,
    PromptLookup,
    accept_or_resample,
    residual,
    top2_margin,
)

PROMPTS = ["Hello tiny world", "The quick brown fox jumps", "abcabcabc", "def f(x): return x + 1",
           "Once upon a time", "1, 2, 3, 4,", "quote: 'to be or not'", "zzz"]
N = 256


def _export(out: Path, model: torch.nn.Module) -> Path:
    with atomic_dir(out) as tmp:
        export(model, tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("spec") / "target", tiny_llama())


@pytest.fixture(scope="module")
def draft(tmp_path_factory) -> Path:
    """The target's weights plus noise: it agrees with the target often, not always."""
    model = tiny_llama()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return _export(tmp_path_factory.mktemp("spec") / "draft", model)


def greedy(**kw: object) -> GenerationConfig:
    """Drafting whatever it costs: a tiny draft costs as much as the tiny target, so by cost it would pause."""
    return GenerationConfig(max_new_tokens=N, min_new_tokens=N, stop_token_ids=(), draft_by_cost=False, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain(target) -> list[list[int]]:
    engine = load(target, threads=1, max_batch=1)
    return [engine.generate(p, greedy(num_draft_tokens=0)).token_ids for p in PROMPTS]


@pytest.mark.parametrize("source", ["draft", "prompt_lookup"])
def test_speculative_greedy_equals_plain_greedy_over_256_tokens(target, draft, plain, source):
    engine = load(target, threads=1, max_batch=4, draft=draft if source == "draft" else None)
    config = greedy(num_draft_tokens=8, prompt_lookup=source == "prompt_lookup")
    alone = [engine.generate(p, config) for p in PROMPTS]
    assert [r.token_ids for r in alone] == plain
    stats = [r.speculation for r in alone]
    assert all(s is not None and s.num_accepted_tokens > 0 for s in stats)
    assert sum(s.tokens_per_target_call for s in stats if s) / len(stats) > 1.2  # it did speculate
    # a batch of 4 decoding together, rows accepting different lengths in the same steps
    together = engine.generate_batch(PROMPTS[:4], config)
    assert [r.token_ids for r in together] == plain[:4]
    rates = {round(r.speculation.acceptance_rate, 3) for r in together if r.speculation}
    assert len(rates) > 1


def test_a_perturbed_verify_path_breaks_the_equality(target, draft, plain, monkeypatch):
    """The equality test can fail: verify logits that are off by a little more than the verify margin (as
    int8-activation kernels can be), and the argmax taken of them, change the greedy output."""
    engine = load(target, threads=1, max_batch=1, draft=draft)
    extend = engine.backend.extend
    rng = np.random.default_rng(0)

    def noisy(slot, tokens, start):  # type: ignore[no-untyped-def]
        logits = extend(slot, tokens, start)[1]
        logits = logits + rng.normal(0, 0.3, logits.shape).astype(logits.dtype)
        return logits.argmax(axis=1), logits

    monkeypatch.setattr(engine.backend, "extend", noisy)
    out = [engine.generate(p, greedy(num_draft_tokens=4)).token_ids for p in PROMPTS]
    assert out != plain


def test_a_close_call_is_left_to_the_one_token_decode(target, draft, plain, monkeypatch):
    """With every position too close to call, verification keeps nothing and plain decode makes every token."""
    engine = load(target, threads=1, max_batch=1, draft=draft)
    monkeypatch.setattr(engine.scheduler, "verify_margin", np.inf)
    result = engine.generate(PROMPTS[0], greedy(num_draft_tokens=4))
    assert result.token_ids == plain[0]
    stats = result.speculation
    assert stats is not None and stats.num_accepted_tokens == 0 and stats.num_drafts > 0
    assert stats.tokens_per_target_call < 1  # the wasted verify calls are counted as target calls


def test_stop_rules_apply_per_token_inside_an_accepted_draft(target, plain):
    engine = load(target, threads=1, max_batch=1)
    # the token that appears last for the first time, after a run that prompt lookup drafts several at once
    first, i = max((out.index(t), i) for i, out in enumerate(plain) for t in set(out))
    assert first > 10
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=(plain[i][first],), prompt_lookup=True,
                              num_draft_tokens=8)
    chunks = list(engine.stream(PROMPTS[i], config))
    assert [c.token_id for c in chunks] == plain[i][: first + 1]
    result = engine.generate(PROMPTS[i], config)
    assert result.token_ids == plain[i][:first] and result.finish_reason == "stop_token"
    assert result.speculation is not None and result.speculation.num_accepted_tokens > 0


def with_swapped_vocabulary(export: Path, folder: Path) -> Path:
    """A copy of ``export`` whose tokenizer swaps two vocabulary entries: same size, another tokenizer."""
    shutil.copytree(export, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


def test_a_draft_with_another_tokenizer_is_refused_before_loading(target, draft, tmp_path):
    other = with_swapped_vocabulary(draft, tmp_path / "other")
    with pytest.raises(ToolkitError, match="cannot draft for .* tokenizers differ"):
        load(target, threads=1, draft=other)


def test_draft_settings_are_checked():
    with pytest.raises(ToolkitError, match="num_draft_tokens"):
        GenerationConfig(num_draft_tokens=-1)
    with pytest.raises(ToolkitError, match="num_draft_tokens"):
        GenerationConfig(num_draft_tokens=0, prompt_lookup=True)
    with pytest.raises(ToolkitError, match=r"num_draft_tokens must be in \[0, 32\]"):
        GenerationConfig(num_draft_tokens=33)
    assert GenerationConfig(num_draft_tokens=32).num_draft_tokens == 32


def lookup(context: np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, by brute force: up to k tokens after the latest earlier match of the context's last n
    tokens, longest n first."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        windows = sliding_window_view(context[:-1], n)  # [L-n, n]: every earlier n-gram
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return [int(t) for t in context[start : start + k]]
    return []


def _index(tokens: list[int], max_n: int = 3, min_n: int = 1) -> NgramIndex:
    index = NgramIndex(max_n, min_n)
    index.extend(tokens)
    return index


def test_prompt_lookup_continues_the_latest_longest_match():
    assert _index([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2]).propose(3) == [3, 7, 8]  # "1 2" last seen before 3 7 8
    assert _index([1, 2, 3]).propose(2) == []
    # "1 2" continues with 3 1 2 up to the end; the draft's own tail "1 2" then continues with 3 1 again
    assert _index([1, 2, 3, 1, 2]).propose(5) == [3, 1, 2, 3, 1]
    assert _index([4, 1, 2, 3, 1, 2], min_n=2).propose(2) == [3, 1] and _index([7, 8], min_n=2).propose(2) == []
    assert PromptLookup(2, 2).max_ngram == 2
    with pytest.raises(ToolkitError, match="min_ngram"):
        PromptLookup(1, 2)


def test_a_free_guess_for_a_token_new_to_the_sequence_comes_from_earlier_sequences():
    """No match in the sequence: where a guess is free, the token that followed its last token in a released
    sequence; where a draft token costs a verify row, nothing."""
    from types import SimpleNamespace

    lookup_ = PromptLookup(max_ngram=3, min_ngram=1)  # a one-token match of the sequence's own (below)
    first = SimpleNamespace(slot=0, prompt_ids=[5, 6], generated=[7, 8], draft_length=DraftLength(4, 4, free=1))
    lookup_.prefill(first)
    assert lookup_.propose(first, 3).tokens == []  # 8 is new to the sequence, and no sequence came before
    lookup_.release(first)
    second = SimpleNamespace(slot=0, prompt_ids=[1, 2], generated=[7], draft_length=DraftLength(4, 4, free=1))
    lookup_.prefill(second)
    assert lookup_.propose(second, 3).tokens == [8]
    second.draft_length.free = 0
    assert lookup_.propose(second, 3).tokens == []
    second.generated += [3, 7]  # now 7 was followed by 3 in this sequence: its own match wins
    second.draft_length.free = 1
    assert lookup_.propose(second, 3).tokens == [3, 7, 3]


def test_the_ngram_index_read_token_by_token_proposes_what_a_full_search_finds():
    """The index reads only new tokens; its first continuation is the brute-force search's, at every length of
    random contexts over small alphabets (many repeats), in pieces of any size."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        tokens = rng.integers(0, 2 + trial % 7, size=60).tolist()
        max_n, min_n = 1 + trial % 4, 1 + trial % 4 // 2
        index, read = NgramIndex(max_n, min_n), 0
        while read < len(tokens):
            read = min(len(tokens), read + int(rng.integers(1, 4)))
            index.extend(tokens[:read])
            k = int(rng.integers(1, 6))
            want = lookup(np.array(tokens[:read]), k, max_n, min_n)
            got = index.propose(k)
            assert got[: len(want)] == want and len(got) <= k and bool(got) == bool(want)


def test_draft_length_grows_shrinks_pauses_and_turns_down_with_the_batch():
    d = DraftLength(k=2, max_k=8)
    d.update(2, 2)
    assert d.k == 3 and d.allowed(1) == 3 and d.allowed(4) == 2 and d.allowed(9) == 0
    d.update(3, 1)
    assert d.k == 2
    for _ in range(3):
        d.update(d.k, 0)
    assert [d.allowed(1) for _ in range(17)] == [0] * 16 + [1]
    assert d.pause == 32


def test_free_guesses_fill_the_pad_and_never_pause_a_lone_row():
    """A paired target's one-token decode costs a one-token verify: a model-free draft guesses at least one token
    on a lone row (no pause after zero-accept rounds, nor when the cost model would pause), and fills a verify's
    pad (an even draft length becomes odd); batched rows keep the ordinary rule."""
    d = DraftLength(k=2, max_k=8, free=1)
    assert d.allowed(1) == 3 and d.allowed(2) == 3  # 2 drafts + the pending token: 3 tokens, padded to 4
    for _ in range(5):
        d.update(d.k, 0)
    assert d.paused_for == 0 and [d.allowed(1) for _ in range(20)] == [1] * 20
    assert d.allowed(2) == 1 and d.allowed(9) == 0  # k=1 is the draft's own length now; a batch of 9 caps it at 0
    slow = _measured(draft_step=1.0, acceptance=0.1)
    assert slow.allowed(1) == 0  # no free guesses: the cost model pauses
    slow = _measured(draft_step=1.0, acceptance=0.1)
    slow.free = 1
    assert slow.allowed(1) == 1 and slow.paused_for == 0
    assert DraftLength(k=4, max_k=4, free=1).allowed(1) == 5 and DraftLength(k=4, max_k=4).allowed(1) == 4


def test_residual_is_normalized_and_guards_all_zero():
    p = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(residual(p, np.array([0.2, 0.6, 0.2])), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(residual(p, p), p)


# --- lossless sampling -----------------------------------------------------------------------------------
SETTINGS = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9)
V = 12


def _logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, V)


def speculative_first_token(p_logits: np.ndarray, q_logits: np.ndarray, rng: np.random.Generator,
                            rule: str = "right") -> int:
    """One round with one drafted token: the draft samples from q, the target keeps it or resamples."""
    ids, probs = sampling.distribution(q_logits, SETTINGS)
    q = sampling.Choice(0, ids, probs).dense(V)
    token = int(rng.choice(V, p=q))
    if rule == "q_before_top_p":  # the ratio uses q after temperature only, as transformers once did
        q = np.exp(q_logits / 0.7 - (q_logits / 0.7).max())
        q /= q.sum()
    p_ids, p_probs = sampling.distribution(p_logits, SETTINGS)
    p = sampling.Choice(0, p_ids, p_probs).dense(V)
    if rule == "no_residual":
        return token if rng.random() * q[token] < p[token] else int(rng.choice(V, p=q))
    return accept_or_resample(p, q, token, rng)[1]


def chi_square_ok(counts: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson's chi-square goodness of fit at the 1 % level (Wilson-Hilferty quantile: no scipy at run time)."""
    if counts[expected == 0].sum():
        return False  # a token outside the target's support was drawn
    e = expected / expected.sum() * counts.sum()
    small = (e > 0) & (e < 5)  # cells expecting fewer than 5 draws are pooled into one
    e, counts = np.append(e[e >= 5], e[small].sum()), np.append(counts[e >= 5], counts[small].sum())
    keep = e > 0
    stat, df = float((((counts[keep] - e[keep]) ** 2) / e[keep]).sum()), int(keep.sum()) - 1
    z = 2.326  # the standard normal's 99th percentile
    return stat < df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("rule,passes", [("right", True), ("q_before_top_p", False), ("no_residual", False)])
def test_speculative_sampling_draws_the_targets_distribution(rule, passes):
    p_logits, q_logits = _logits(1), _logits(2)
    ids, probs = sampling.distribution(p_logits, SETTINGS)
    expected = sampling.Choice(0, ids, probs).dense(V)
    rng = np.random.default_rng(0)
    counts = np.bincount([speculative_first_token(p_logits, q_logits, rng, rule) for _ in range(20000)],
                         minlength=V)
    assert chi_square_ok(counts, expected) == passes


def _sharp(noise: float) -> torch.nn.Module:
    """The tiny model with 2x larger logits (a peaked distribution a chi-square test can resolve), plus noise."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
        gen = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.dim() == 2 and noise:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model


@pytest.fixture(scope="module")
def sharp_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A target and a draft that often disagrees with it, so that rejections (and the residual) shape the result."""
    root = tmp_path_factory.mktemp("sharp")
    return _export(root / "target", _sharp(0.0)), _export(root / "draft", _sharp(0.01))


def _second_token_distribution(engine, prompt: list[int], config: GenerationConfig) -> tuple[int, np.ndarray]:
    """The target's most likely first token t1 and its exact distribution of the next one, p(t2 | t1)."""
    backend = engine.backend
    backend.allocate(1, 64)
    t1 = int(sampling.distribution(backend.prefill(0, np.array(prompt), 0).copy(), config)[0][0])
    ids, probs = sampling.distribution(backend.prefill(0, np.array([t1]), len(prompt)).copy(), config)
    return t1, sampling.Choice(t1, ids, probs).dense(backend.contract.vocab_size)


@pytest.mark.parametrize("broken", [False, True])
def test_speculative_sampling_on_a_tiny_model_keeps_the_targets_distribution(sharp_pair, monkeypatch, broken):
    """Thousands of seeded requests: the second token comes from one verification round (draft or residual)."""
    from toolkit.runtime import scheduler

    prompt = [72, 105]
    config = GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9, stop_token_ids=(),
                              num_draft_tokens=1)
    engine = load(sharp_pair[0], threads=1, max_batch=1, draft=sharp_pair[1])
    t1, expected = _second_token_distribution(engine, prompt, config)
    if broken:  # on a rejection, draw from p instead of normalize(max(0, p - q))
        def no_residual(p, q, token, rng):  # type: ignore[no-untyped-def]
            return (True, token) if rng.random() * q[token] < p[token] else (False, int(rng.choice(len(p), p=p)))
        monkeypatch.setattr(scheduler, "accept_or_resample", no_residual)
    seconds, rejected = [], 0
    for seed in range(3000):
        result = engine.generate(prompt, GenerationConfig(**{**config.__dict__, "seed": seed}))
        assert result.speculation is not None and result.speculation.num_draft_tokens == 1
        if result.token_ids[0] == t1:  # the second token's distribution given the most likely first one
            seconds.append(result.token_ids[1])
            rejected += result.speculation.num_accepted_tokens == 0
    assert len(seconds) > 500 and rejected > 100  # the residual matters often enough to be seen
    assert chi_square_ok(np.bincount(seconds, minlength=len(expected)), expected) == (not broken)


def test_generate_cli_speculates_and_refuses_bad_draft_options(target, draft, tmp_path, capsys):
    from toolkit.cli import main

    base = ["generate", str(target), "--prompt", "abc", "--no-chat", "--max-new-tokens", "12"]
    assert main([*base, "--prompt-lookup", "--num-draft-tokens", "3"]) == 0
    assert "speculative:" in capsys.readouterr().err
    assert main([*base, "--draft", str(draft)]) == 0
    assert "tokens per target call" in capsys.readouterr().err
    for extra, message in ((["--draft", str(tmp_path)], "not an ONNX export"),
                           (["--draft", str(draft), "--prompt-lookup"], "choose one"),
                           (["--prompt-lookup", "--num-draft-tokens", "0"], "num_draft_tokens")):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@requires_smollm2
def test_smollm2_float32_speculative_greedy_with_an_int4_draft_equals_plain_greedy(tmp_path):
    """The real case: SmolLM2 float32 verifying its own int4 RTN export (accuracy_level 4, the default), and
    prompt lookup on the float32 target, 128 tokens on two prompts, alone and as a batch."""
    from toolkit import models
    from toolkit.passes.rtn import RTNConfig
    from toolkit.passes.rtn import apply as rtn_apply

    torch.set_num_threads(2)
    loaded = models.load("smollm2")
    with atomic_dir(tmp_path / "fp32") as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    rtn_apply(loaded.model, RTNConfig(bits=4, group_size=32, symmetric=True))
    with atomic_dir(tmp_path / "int4") as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    engine = load(tmp_path / "fp32", threads=2, max_batch=2, draft=tmp_path / "int4")
    messages = [[{"role": "user", "content": "Quote this sentence exactly: the quick brown fox jumps over it."}],
                [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]]
    plain = [engine.generate(m, GenerationConfig(max_new_tokens=128, min_new_tokens=128, num_draft_tokens=0))
             for m in messages]
    for extra in ({"num_draft_tokens": 4}, {"num_draft_tokens": 4, "prompt_lookup": True}):
        config = GenerationConfig(max_new_tokens=128, min_new_tokens=128, **extra)  # type: ignore[arg-type]
        spec = engine.generate_batch(messages, config)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        helped = spec if "prompt_lookup" not in extra else spec[:1]  # the story has nothing to copy
        assert all(r.speculation and r.speculation.tokens_per_target_call > 1.0 for r in helped)


@pytest.fixture(scope="module")
def int8_target(tmp_path_factory) -> Path:
    """An int4 export run with int8 activations (accuracy_level 4), block 64: the block length whose MLAS kernel
    sums a one-row tile in another order than a two-row tile."""
    from toolkit.passes.rtn import RTNConfig
    from toolkit.passes.rtn import apply as rtn_apply

    model = tiny_llama(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    rtn_apply(model, RTNConfig(bits=4, group_size=64))
    out = tmp_path_factory.mktemp("spec") / "int4"
    with atomic_dir(out) as tmp:
        export(model, tiny_tokenizer(), ONNXConfig(target="ort", accuracy_level=4), tmp)
    return out


def verify_and_decode(folder: Path, pairs: bool, k: int = 7,
                      call: str = "score") -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Logits [k, V] and cache columns of k tokens after a prompt: one verify call (the batch path's ``score`` or
    the lone row's ``extend``), then k one-token decodes."""
    backend = OrtBackend(folder, BackendOptions(threads=1, paired_decode=pairs))
    assert backend.pairs == pairs
    cache = backend.allocate(1, 64)
    prompt, tokens = np.arange(10, 30), np.arange(40, 40 + k)  # a pending token and k - 1 drafts
    backend.prefill(0, prompt, 0)
    if call == "score":
        verified = backend.score(np.array([0]), tokens[None], np.array([len(prompt)]))[0]
    else:
        verified = backend.extend(0, tokens, len(prompt))[1].copy()
    verified_cache = [b[0, :, : len(prompt) + len(tokens)].copy() for b in cache.buffers]
    backend.prefill(0, prompt, 0)
    decoded = np.stack([backend.decode(tokens[i : i + 1], np.array([len(prompt) + i]))[0].copy()
                        for i in range(len(tokens))])
    decoded_cache = [b[0, :, : len(prompt) + len(tokens)].copy() for b in cache.buffers]
    return verified, decoded, verified_cache, decoded_cache


def test_an_int8_target_scores_and_decodes_bit_identically(int8_target):
    """Verify and one-token decode compute a token identically (logits and cache), so greedy needs no margin;
    without pairing the one-row call takes other kernels and the comparison fails."""
    scored, decoded, scored_cache, decoded_cache = verify_and_decode(int8_target, pairs=True)  # k = 7: odd, so score pads too
    assert np.array_equal(scored, decoded)
    assert all(np.array_equal(a, b) for a, b in zip(scored_cache, decoded_cache, strict=True))
    scored, decoded, _, _ = verify_and_decode(int8_target, pairs=False)
    assert not np.array_equal(scored, decoded)


def test_a_full_row_decodes_and_scores_its_last_column_without_the_pad(int8_target):
    """The pad needs the column after the token; at the row's last column the call runs unpaired, as it must."""
    backend = OrtBackend(int8_target, BackendOptions(threads=1, paired_decode=True))
    backend.allocate(1, 16)
    backend.prefill(0, np.arange(10, 25), 0)  # columns 0..14: column 15 is the last
    assert backend.score(np.array([0]), np.array([[40]]), np.array([15])).shape == (1, 1, 259)
    next_token, logits = backend.decode_next(np.array([40]), np.array([15]), True)
    assert logits is not None and next_token[0] == logits[0].argmax()


def test_verify_margin_follows_the_activation_precision_the_target_runs_at(int8_target, draft):
    """int8 activations: paired one-row calls are exact (no margin; on by default with a draft), unpaired ones
    need the int8 margin; float activations: the float margin."""
    from toolkit.runtime import scheduler

    for kw, margin in (({"paired_decode": True}, 0.0), ({"draft": draft}, 0.0), ({}, scheduler.VERIFY_MARGIN_INT8),
                       ({"paired_decode": True, "accuracy_level": 0}, scheduler.VERIFY_MARGIN)):
        engine = load(int8_target, threads=1, **kw)  # type: ignore[arg-type]
        assert engine.backend.pairs == (margin == 0.0) and engine.scheduler.verify_margin == margin


def test_int8_speculative_greedy_equals_plain_greedy_with_no_margin(int8_target):
    """With no close-call margin every verified position is the target's choice in the verify call itself."""
    engine = load(int8_target, threads=1, max_batch=1, paired_decode=True)
    plain = [engine.generate(p, greedy(num_draft_tokens=0)).token_ids for p in PROMPTS]
    spec = [engine.generate(p, greedy(num_draft_tokens=8, prompt_lookup=True)) for p in PROMPTS]
    assert [r.token_ids for r in spec] == plain
    assert all(r.speculation is not None and r.speculation.num_accepted_tokens > 0 for r in spec)


def test_prompt_lookup_on_the_standard_target_with_a_copied_cache(tmp_path):
    """Past and present as separate tensors: verify copies the k+1 columns back, rolling back is still a length."""
    with atomic_dir(tmp_path / "std") as tmp:
        export(tiny_llama(), tiny_tokenizer(), ONNXConfig(target="standard", accuracy_level=0), tmp)
    engine = load(tmp_path / "std", threads=1, max_batch=2)
    config = GenerationConfig(max_new_tokens=64, min_new_tokens=64, stop_token_ids=(), draft_by_cost=False)
    plain = [engine.generate(p, GenerationConfig(**{**config.__dict__, "num_draft_tokens": 0})).token_ids
             for p in PROMPTS[:2]]
    spec = engine.generate_batch(PROMPTS[:2], GenerationConfig(**{**config.__dict__, "prompt_lookup": True}))
    assert [r.token_ids for r in spec] == plain
    assert all(r.speculation and r.speculation.num_accepted_tokens > 0 for r in spec)


def test_speculated_tokens_record_the_same_logprobs_as_plain_decode(target, plain):
    engine = load(target, threads=1, max_batch=1)
    got = []
    for extra in ({"num_draft_tokens": 0}, {"prompt_lookup": True}):
        config = GenerationConfig(max_new_tokens=48, min_new_tokens=48, stop_token_ids=(), logprobs=2, **extra)  # type: ignore[arg-type]
        handle = engine.submit(PROMPTS[7], config, with_text=False)
        for _ in engine.follow(handle):
            pass
        got.append(handle.seq.logprobs)
    assert len(got[1]) == 48 and [t.token_id for t in got[1]] == plain[7][:48]
    for a, b in zip(*got, strict=True):
        assert [i for i, _ in a.top] == [i for i, _ in b.top] and abs(a.logprob - b.logprob) < 1e-4


def _measured(draft_step: float, acceptance: float, by_cost: bool = True) -> DraftLength:
    """A DraftLength that has seen ten rounds: a plain decode costs 1.0, a verify of j+1 tokens 1 + 0.05 j."""
    d = DraftLength(k=2, max_k=6, by_cost=by_cost)
    d.kept, d.rejected = 10 * acceptance, 10 * (1 - acceptance)
    d.draft_step_s, d.verify_s, d.decode_s = draft_step, {j: 1 + 0.05 * j for j in (1, 2, 4)}, 1.0
    return d


def test_draft_length_by_cost_turns_off_a_draft_as_slow_as_the_target():
    slow = _measured(draft_step=1.0, acceptance=0.9)
    assert [slow.allowed(1) for _ in range(17)] == [0] * 17 and slow.pause == 32  # paused for 16 tokens
    assert slow.allowed(1) == 2 and slow.allowed(1) == 2  # then drafts by acceptance until costs are measured again
    slow.update(2, 1, draft_s=None, verify_s=1.1)  # a round that caught up after the pause measures no draft step
    assert slow.allowed(1) == 2
    slow.update(2, 1, draft_s=2.0, verify_s=1.1)
    assert slow.allowed(1) == 0 and slow.pause == 64  # still too slow: paused twice as long
    assert _measured(draft_step=1.0, acceptance=0.9, by_cost=False).allowed(1) == 2  # acceptance alone: drafts


def test_draft_length_by_cost_takes_the_length_with_most_tokens_per_second():
    cheap = _measured(draft_step=0.3, acceptance=0.76)  # the int4 draft of float32 SmolLM2
    rates = {j: cheap.expected_tokens(j) / cheap.round_s(j) for j in range(1, 7)}
    assert cheap.allowed(1) == max(rates, key=rates.__getitem__) == 3 and rates[3] > 1.35 > rates[1]
    assert cheap.round_s(3) == pytest.approx(3 * 0.3 + 1.1)  # an unmeasured length: the nearest measured verify
    assert _measured(draft_step=0.05, acceptance=0.95).allowed(1) == 6  # cheap and right: the longest draft
    assert _measured(draft_step=0.3, acceptance=0.76).allowed(3) == 2  # the batch still caps it (6 // 3)
    assert cheap.expected_tokens(2) == pytest.approx(1 + 0.76 + 0.76**2)


def test_draft_length_measures_acceptance_and_costs_from_rounds():
    d = DraftLength(k=4, max_k=4)
    d.update(4, 4, draft_s=0.4, verify_s=1.2)
    d.update(4, 1, draft_s=0.8, verify_s=1.0)
    assert d.acceptance() == pytest.approx((0.9 * 4 + 1) / (0.9 * 4 + 1 + 1))  # kept / (kept + first rejections)
    assert d.draft_step_s == pytest.approx(0.7 * 0.1 + 0.3 * 0.2) and d.verify_s == {4: pytest.approx(1.14)}
    d.record_decode(2.0)
    assert d.decode_s == 2.0


def test_extend_in_one_call_writes_the_cache_and_chooses_as_one_token_calls(target):
    """A draft's catch-up: k tokens in one call give the argmax, logits and cache columns of k one-token calls;
    past MAX_EXTEND tokens it prefills, with the same result."""
    backend = OrtBackend(target, BackendOptions(threads=1))
    cache = backend.allocate(2, 64)
    prompt, tokens = np.arange(10, 30), np.arange(40, 60)
    results = []
    for width in (1, 5, len(tokens)):  # a token a call, five a call (kept bindings), all twenty at once (prefill)
        backend.prefill(1, prompt, 0)
        ids, logits = [], []
        for j in range(0, len(tokens), width):
            i, x = backend.extend(1, tokens[j : j + width], len(prompt) + j)  # views until the next call
            ids.append(i.copy())
            logits.append(x.copy())
        columns = [b[1, :, : len(prompt) + len(tokens)].copy() for b in cache.buffers]
        results.append((np.concatenate(ids), np.concatenate(logits), columns))
    ids0, logits0, columns0 = results[0]
    assert np.array_equal(ids0, logits0.argmax(axis=1))
    for ids, logits, columns in results[1:]:
        assert np.array_equal(ids, ids0)
        np.testing.assert_allclose(logits, logits0, atol=1e-4)
        for a, b in zip(columns, columns0, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_greedy_draft_reads_only_the_argmax_and_its_prompt_at_prefill(target, draft, plain, monkeypatch):
    """Greedy drafting without a penalty or masked stop ids never processes logits in Python, and the draft's row
    holds the prompt once the target's does (its first draft reads only the pending token)."""
    from toolkit.runtime.generation import SequenceState

    engine = load(target, threads=1, max_batch=1, draft=draft)
    processed = []
    monkeypatch.setattr(SequenceState, "processed", lambda self, *a: processed.append(a))
    propose, fed = engine.draft.propose, []

    def spy(seq, k):  # type: ignore[no-untyped-def]
        out = propose(seq, k)
        fed.append(out.fed)
        return out

    monkeypatch.setattr(engine.draft, "propose", spy)
    config = GenerationConfig(max_new_tokens=64, stop_token_ids=(), num_draft_tokens=4, draft_by_cost=False)
    assert engine.generate(PROMPTS[1], config).token_ids == plain[1][:64]
    assert processed == [] and fed[0] == 1


def test_a_speculating_target_and_its_draft_stop_spinning_after_each_call(target, draft):
    engine = load(target, threads=1, max_batch=1, draft=draft)
    assert engine.draft is not None
    for backend in (engine.backend, engine.draft.backend):
        assert isinstance(backend, OrtBackend) and not backend.pairs  # a float target pays for no pairs
        assert backend.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    alone = load(target, threads=1, max_batch=1).backend
    assert isinstance(alone, OrtBackend)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # plain decode spins between calls
        alone.session.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_top2_margin_reads_the_gap_to_the_next_largest_logit_at_either_end_and_on_ties():
    assert top2_margin(np.array([1.0, 3.0, 2.5]), 1) == 0.5
    assert top2_margin(np.array([3.0, 1.0, 2.0]), 0) == 1.0 and top2_margin(np.array([1.0, 2.0, 4.0]), 2) == 2.0
    assert top2_margin(np.array([2.0, 2.0, 1.0]), 0) == 0.0  # a tie is too close to call at any margin


def _count_calls(backend: OrtBackend, monkeypatch) -> list[int]:
    """A list whose length is the number of graph calls ``backend`` makes from now on."""
    calls: list[int] = []
    run = backend.session.run_with_iobinding
    monkeypatch.setattr(backend.session, "run_with_iobinding", lambda io, *a: (calls.append(1), run(io, *a))[1])
    return calls


def test_a_paired_batch_decodes_only_its_live_rows_and_in_one_call_when_not_rowwise(int8_target, monkeypatch):
    """Row by row, a row that is not decoding (free, or mid-prefill) costs no call and the live rows' tokens are
    those they have alone; ``rowwise=False`` is one batched call."""
    backend = OrtBackend(int8_target, BackendOptions(threads=1, paired_decode=True))
    backend.allocate(3, 64)
    for row in range(3):
        backend.prefill(row, np.arange(10 + row, 30), 0)
    tokens, lengths = np.array([40, 41, 42]), np.array([20, 19, 18])
    alone = [int(backend.extend(r, tokens[r : r + 1], int(lengths[r]))[0][0]) for r in range(3)]
    calls = _count_calls(backend, monkeypatch)
    ids, _ = backend.decode_next(tokens, lengths, False, live=np.array([True, False, True]))
    assert len(calls) == 2 and [int(ids[0]), int(ids[2])] == [alone[0], alone[2]]
    backend.decode_next(tokens, lengths, False, rowwise=False)
    assert len(calls) == 3


def test_a_server_style_paired_target_batches_concurrent_rows_and_speculates_alone(int8_target, monkeypatch):
    """``batch_exact=False``: no row drafts while several sequences run (they decode in one batched call); the
    sequence left alone speculates. Default (exact): a speculating batch equals each row alone."""
    config = replace(greedy(num_draft_tokens=4, prompt_lookup=True), max_new_tokens=24, min_new_tokens=24)
    prompts = [PROMPTS[2], PROMPTS[0]]
    fast = load(int8_target, threads=1, max_batch=2, paired_decode=True, batch_exact=False)
    busy_when_drafting: list[int] = []
    speculate = fast.scheduler.speculate
    monkeypatch.setattr(fast.scheduler, "speculate",
                        lambda h, k: (busy_when_drafting.append(len(fast.scheduler.running)), speculate(h, k))[1])
    short = replace(config, max_new_tokens=8, min_new_tokens=8)
    handles = [fast.submit(p, c) for p, c in zip(prompts, [short, config], strict=True)]
    for handle in handles:  # the first stops early: the second runs on alone
        for _ in fast.follow(handle):
            pass
    stats = handles[1].seq.spec_stats
    assert stats is not None and stats.num_accepted_tokens > 0
    assert busy_when_drafting and set(busy_when_drafting) == {1}
    exact = load(int8_target, threads=1, max_batch=2, paired_decode=True)
    assert [r.token_ids for r in exact.generate_batch(prompts, config)] == [exact.generate(p, config).token_ids
                                                                              for p in prompts]


def test_a_server_style_paired_target_batches_rows_that_do_not_speculate(int8_target, monkeypatch):
    """``batch_exact=False`` with requests that turned speculation off: two running rows decode in one call, never
    row by row (a lone running row beside one mid-prefill is one pair call either way)."""
    engine = load(int8_target, threads=1, max_batch=2, paired_decode=True, batch_exact=False)
    running_when_rowwise: list[int] = []
    inner = engine.backend._decode_rows
    monkeypatch.setattr(engine.backend, "_decode_rows", lambda *a, **kw: (
        running_when_rowwise.append(len(engine.scheduler.running)), inner(*a, **kw))[1])
    engine.generate_batch(PROMPTS[:2], replace(greedy(num_draft_tokens=0), max_new_tokens=12, min_new_tokens=12))
    assert set(running_when_rowwise) <= {1}
