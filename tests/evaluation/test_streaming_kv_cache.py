"""A model with an fp8 KV cache evaluated layer by layer: the streamed perplexity equals the in-memory one, with the
keys and values rounded as in memory (the scales are loaded with each layer).

A KV-cache model is always a packed checkpoint (``quantization.json`` records the cache even when every weight is
float), and ``evaluation: {streaming: true}`` streams float folders only, so the run evaluates such a model in memory;
these tests pin both that routing and the streaming machinery (``open_streaming`` + ``stream_perplexity``) for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import fp8_kv_model
from toolkit import models
from toolkit.evaluation import perplexity
from toolkit.evaluation.streaming import stream_perplexity
from toolkit.models.tiny import tiny_tokenizer
from toolkit.pipeline import runner
from toolkit.pipeline.recipes import EvaluationSpec
from toolkit.quant import checkpoint
from toolkit.quant.streaming import StreamOptions

WINDOWS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))


def _kv_folder(tmp_path: Path, fp8_weights: bool) -> Path:
    model = fp8_kv_model(tmp_path, weights="dynamic" if fp8_weights else None)
    folder = tmp_path / "kv"
    folder.mkdir()
    checkpoint.save_model(model, tiny_tokenizer(), folder)
    return folder


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_a_kv_cache_model_streams_with_the_in_memory_perplexity(tmp_path: Path, fp8_weights: bool) -> None:
    folder = _kv_folder(tmp_path, fp8_weights)
    assert checkpoint.is_packed(folder)  # float weights too: the record holds the cache
    in_memory = perplexity.evaluate(checkpoint.load_model(folder), WINDOWS, batch_size=2)["perplexity"]
    streamed = stream_perplexity(checkpoint.open_streaming(folder), WINDOWS, 2,
                                 StreamOptions(activation_budget_bytes=0))["perplexity"]
    assert streamed == pytest.approx(in_memory, rel=1e-6)
    # the rounding is in both: the same model without it (plain sdpa) is further off than the tolerance above
    unrounded = checkpoint.load_model(folder)
    unrounded.set_attn_implementation("sdpa")
    plain = perplexity.evaluate(unrounded, WINDOWS, batch_size=2)["perplexity"]
    assert abs(plain - streamed) > 1e-4 * streamed


def test_streaming_requested_on_a_kv_cache_model_evaluates_it_in_memory(tmp_path: Path) -> None:
    folder = _kv_folder(tmp_path, fp8_weights=True)
    spec = EvaluationSpec(count=2, length=16, streaming=True, kl=False)
    ref = models.ModelRef(str(folder), "key", folder)
    windows = runner.data.token_windows(tiny_tokenizer(), spec.windows())
    expected = perplexity.evaluate(checkpoint.load_model(folder), windows)["perplexity"]
    metrics = runner.measure(spec, ref, tiny_tokenizer(), None, progress=False)
    assert "streamed" not in metrics
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-9)
