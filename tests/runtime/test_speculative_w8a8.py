"""Speculation with a W8A8 target (per-token int8 activations into MatMulInteger) and an int4 draft: a k-token verify
computes every token bit for bit as a one-token decode does, alone and in a batch, so greedy speculative output is
plain greedy output token for token; without the paired calls the comparisons fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import requires_smollm2
from tests.runtime.test_speculative import PROMPTS, greedy, verify_and_decode
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import rtn
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.quant.spec import ActivationSpec
from toolkit.runtime import GenerationConfig, load
from toolkit.runtime.backend import BackendOptions, OrtBackend

W8A8 = rtn.RTNConfig(bits=8, group_size=-1, input_activations=ActivationSpec("int", 8, "token", dynamic=True))
SIZES = {"hidden_size": 128, "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2}


def _export(out: Path, config: rtn.RTNConfig, level: int = 4) -> Path:
    model = rtn.apply(tiny_llama(**SIZES), config)  # type: ignore[arg-type]
    with atomic_dir(out) as tmp:
        export(model, tiny_tokenizer(), ONNXConfig(target="ort", accuracy_level=level), tmp)
    return out


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("w8a8") / "target", W8A8)


@pytest.fixture(scope="module")
def int4_draft(tmp_path_factory) -> Path:
    """The same tiny model at int4 (group 32, int8 activations): the SmolLM2 pair's shape, a draft that mostly agrees."""
    return _export(tmp_path_factory.mktemp("w8a8") / "draft", rtn.RTNConfig(bits=4, group_size=32))


def test_a_w8a8_graph_rounds_activations_at_any_accuracy_level(w8a8, tmp_path):
    """The W8A8 linears quantize activations in the graph itself; MatMulNBits' level (here 0) does not change that."""
    level0 = _export(tmp_path / "level0", W8A8, level=0)
    for folder in (w8a8, level0):
        backend = OrtBackend(folder, BackendOptions(threads=1, paired_decode=True))
        assert backend.int8_activations and backend.pairs
        assert load(folder, threads=1, max_batch=1, paired_decode=False).scheduler.verify_margin > 1.0
    float_target = tmp_path / "float"
    with atomic_dir(float_target) as tmp:
        export(tiny_llama(**SIZES), tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    assert not OrtBackend(float_target, BackendOptions(threads=1)).int8_activations


def test_a_w8a8_target_verifies_and_decodes_bit_identically(w8a8):
    """Per-token scales and int32 sums are row-independent, but the float ops around them are not: a lone token
    takes GroupQueryAttention's one-row kernels. Paired, logits and cache agree to the bit; unpaired they do not."""
    verified, decoded, verified_cache, decoded_cache = verify_and_decode(w8a8, pairs=True, k=5, call="extend")
    assert np.array_equal(verified, decoded)
    assert all(np.array_equal(a, b) for a, b in zip(verified_cache, decoded_cache, strict=True))
    verified, decoded, _, _ = verify_and_decode(w8a8, pairs=False, k=5, call="extend")
    assert not np.array_equal(verified, decoded)


def _batch_and_alone(folder: Path, rowwise: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of different lengths decoded in one ``decode`` call, and each row's token verified alone."""
    backend = OrtBackend(folder, BackendOptions(threads=1, paired_decode=True))
    if not rowwise:
        monkeypatch.setattr(backend, "_rowwise", lambda lengths: False)
    cache = backend.allocate(3, 64)
    prompts = [np.arange(10, 30), np.arange(50, 63), np.arange(70, 95)]
    for slot, prompt in enumerate(prompts):
        backend.prefill(slot, prompt, 0)
    snapshot = [b.copy() for b in cache.buffers]
    tokens, lengths = np.array([40, 41, 42]), np.array([len(p) for p in prompts])
    together = backend.decode(tokens, lengths).copy()
    for b, s in zip(cache.buffers, snapshot, strict=True):
        b[:] = s
    alone = np.stack([backend.extend(r, tokens[r : r + 1], int(lengths[r]))[1][0].copy() for r in range(3)])
    return together, alone


def test_rows_decoded_together_compute_each_token_as_alone(w8a8, monkeypatch):
    """GroupQueryAttention takes two new tokens after a past only for a batch of one, so a paired target decodes
    a batch row by row; one batched call of single tokens computes other bits."""
    together, alone = _batch_and_alone(w8a8, rowwise=True, monkeypatch=monkeypatch)
    assert np.array_equal(together, alone)
    together, alone = _batch_and_alone(w8a8, rowwise=False, monkeypatch=monkeypatch)
    assert not np.array_equal(together, alone)


@pytest.fixture(scope="module")
def plain(w8a8) -> list[list[int]]:
    engine = load(w8a8, threads=1, max_batch=1, paired_decode=True)
    return [engine.generate(p, greedy(num_draft_tokens=0)).token_ids for p in PROMPTS]


@pytest.mark.parametrize("source", ["draft", "prompt_lookup"])
def test_w8a8_speculative_greedy_equals_plain_greedy_alone_and_in_a_batch(w8a8, int4_draft, plain, source):
    engine = load(w8a8, threads=1, max_batch=4, draft=int4_draft if source == "draft" else None,
                  paired_decode=True)
    assert engine.scheduler.verify_margin == 0.0  # every position is decided in the verify call itself
    config = greedy(num_draft_tokens=4, prompt_lookup=source == "prompt_lookup")
    alone = [engine.generate(p, config) for p in PROMPTS]
    assert [r.token_ids for r in alone] == plain
    stats = [r.speculation for r in alone]
    assert all(s is not None and s.num_accepted_tokens > 0 for s in stats)
    assert sum(s.tokens_per_target_call for s in stats if s) / len(stats) > 1.2
    together = engine.generate_batch(PROMPTS[:4], config)
    assert [r.token_ids for r in together] == plain[:4]


def test_a_w8a8_target_speculating_without_pairs_changes_the_output(w8a8, int4_draft, plain, monkeypatch):
    """The equality can fail: the same engine with one-token decodes unpaired (and no close-call margin) computes
    some tokens with other kernels than the plain run, and int8 re-quantization turns that into other tokens."""
    engine = load(w8a8, threads=1, max_batch=1, draft=int4_draft)
    monkeypatch.setattr(engine.backend, "_paired", lambda lengths: False)
    out = [engine.generate(p, greedy(num_draft_tokens=4)).token_ids for p in PROMPTS]
    assert out != plain


@pytest.mark.slow
@requires_smollm2
def test_smollm2_w8a8_speculative_greedy_with_an_int4_draft_equals_plain_greedy(tmp_path):
    """The real case: SmolLM2 W8A8 (RTN, per-token activations; SmoothQuant only moves scales) verifying its own int4
    RTN export, and prompt lookup on it, 128 tokens on three prompts, alone and as a batch."""
    from toolkit import models

    torch.set_num_threads(2)
    loaded = models.load("smollm2")
    w8a8 = rtn.apply(loaded.model, W8A8)
    with atomic_dir(tmp_path / "w8a8") as tmp:
        export(w8a8, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    loaded = models.load("smollm2")
    int4 = rtn.apply(loaded.model, rtn.RTNConfig(bits=4, group_size=32, symmetric=True))
    with atomic_dir(tmp_path / "int4") as tmp:
        export(int4, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    engine = load(tmp_path / "w8a8", threads=2, max_batch=3, draft=tmp_path / "int4")
    messages = [[{"role": "user", "content": "Quote this sentence exactly: the quick brown fox jumps over it."}],
                [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                [{"role": "user", "content": "List the planets of the solar system with one fact each."}]]
    plain = [engine.generate(m, GenerationConfig(max_new_tokens=128, min_new_tokens=128, num_draft_tokens=0)).token_ids
             for m in messages]
    for extra in ({"num_draft_tokens": 4}, {"num_draft_tokens": 4, "prompt_lookup": True}):
        config = GenerationConfig(max_new_tokens=128, min_new_tokens=128, **extra)  # type: ignore[arg-type]
        assert [engine.generate(m, config).token_ids for m in messages] == plain
        assert [r.token_ids for r in engine.generate_batch(messages, config)] == plain
