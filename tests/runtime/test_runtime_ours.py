"""The runtime on graphs made by our own exporter (the other runtime tests use onnxruntime-genai's builder)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_smollm2
from toolkit import models
from toolkit.passes import rtn
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime import GenerationConfig, load

PROMPTS = ["Hello tiny world, this is a prompt", "a", "The quick brown fox jumps over"]


def _export(loaded: models.LoadedModel, folder, **config: object) -> None:
    with atomic_dir(folder) as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(**config), tmp)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_our_tiny_export_greedy_equals_transformers_and_batches_ragged_rows(tmp_path):
    loaded = models.load("tiny-llama")
    _export(loaded, tmp_path / "fp32", target="ort")
    engine = load(tmp_path / "fp32", threads=1)
    assert engine.max_batch > 1  # ragged rows decode together on our graphs
    config = GenerationConfig(max_new_tokens=16, stop_token_ids=())
    alone = [engine.generate(p, config) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, alone, strict=True):
        assert result.token_ids == _hf_greedy(loaded.model, engine.encode(prompt), 16)
    together = engine.generate_batch(PROMPTS, config)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_loading_and_generating_imports_no_torch(tmp_path):
    from tests.runtime.test_runtime_light import loaded_heavy_modules

    _export(models.load("tiny-llama"), tmp_path / "fp32", target="ort")
    code = ("from toolkit.runtime import GenerationConfig, load\n"
            f"engine = load({str(tmp_path / 'fp32')!r}, threads=1)\n"
            "assert len(engine.generate('abc', GenerationConfig(max_new_tokens=3, stop_token_ids=())).token_ids) == 3")
    assert loaded_heavy_modules(code) == []


@pytest.mark.parametrize("group", [None, 32])
def test_standard_target_export_runs_in_the_runtime(tmp_path, group):
    """Its cache is fixed-capacity, written by TensorScatter: the backend binds one buffer as past and present, as
    for GroupQueryAttention, and rows of different lengths decode together."""
    loaded = models.load("tiny-llama")
    if group:
        rtn.apply(loaded.model, rtn.RTNConfig(bits=4, group_size=group))
    _export(loaded, tmp_path / "std", target="standard", accuracy_level=0)
    engine = load(tmp_path / "std", threads=1)
    assert engine.backend.can_share_buffer and engine.backend.whole_cache and engine.max_batch > 1
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    alone = [engine.generate(p, config) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, alone, strict=True):
        assert result.token_ids == _hf_greedy(loaded.model, engine.encode(prompt), 12)
    assert [r.token_ids for r in engine.generate_batch(PROMPTS, config)] == [r.token_ids for r in alone]
    chunked = load(tmp_path / "std", threads=1, prefill_chunk=5).generate(PROMPTS[2], config).token_ids
    assert chunked == alone[2].token_ids


def test_our_int4_export_runs_in_the_runtime(tmp_path):
    loaded = models.load("tiny-llama")
    rtn.apply(loaded.model, rtn.RTNConfig(bits=4, group_size=32))
    _export(loaded, tmp_path / "int4", target="ort", accuracy_level=0)
    engine = load(tmp_path / "int4", threads=1)
    result = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=12, stop_token_ids=()))
    assert result.token_ids == _hf_greedy(loaded.model, engine.encode(PROMPTS[0]), 12)


@pytest.mark.slow
@requires_smollm2
def test_smollm2_float32_export_greedy_equals_transformers_over_128_tokens(tmp_path):
    torch.set_num_threads(2)
    loaded = models.load("smollm2")
    _export(loaded, tmp_path / "fp32", target="ort")
    engine = load(tmp_path / "fp32", threads=2)
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ours = engine.generate(messages, GenerationConfig(max_new_tokens=128, stop_token_ids=()))
    assert len(ours.token_ids) == 128
    assert ours.token_ids == _hf_greedy(loaded.model, engine.encode(messages), 128)
