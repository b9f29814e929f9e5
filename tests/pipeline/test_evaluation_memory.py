"""Evaluation settings that fit the model: a float baseline too large for the budget streams by itself."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig

from tests.quant.test_streaming import write_sharded
from toolkit.models.shape import ModelShape
from toolkit.models.tiny import tiny_llama
from toolkit.pipeline import budget, recipes, runner

# Llama-3.2-1B's shape (untied here; the rule does not depend on tying) and SmolLM2-135M's
LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def test_a_1b_float_baseline_streams_on_this_machines_budget_and_smollm2_does_not() -> None:
    budget_20gb = 20 * 10**9  # about what a 24 GB machine has available
    one_b, smollm2 = ModelShape.of_config(LLAMA_1B), ModelShape.of_config(SMOLLM2)
    assert budget.evaluation_streams(one_b, 512, 1, budget_20gb)
    assert not budget.evaluation_streams(smollm2, 512, 1, budget_20gb)
    assert budget.evaluation_streams(smollm2, 512, 1, 2 * 10**9)  # a small budget streams SmolLM2 too


def test_the_1b_recipe_with_default_evaluation_is_estimated_with_the_streamed_evaluation() -> None:
    """With the defaults the resolved evaluation streams and drops KL, so no phase holds the float model."""
    shape = ModelShape.of_config(LLAMA_1B)
    recipe = recipes.parse({"model": "x", "output": "o", "passes": [{"rtn": {}}]}, "r")
    ref = runner.models.ModelRef("x", "k", Path("/nonexistent-float-folder"))
    spec = runner.resolve_evaluation(recipe.evaluation, ref, shape, 20 * 10**9, lambda _: None)
    assert spec.streaming is True and spec.kl is False
    phases = budget.estimate_run(replace(recipe, evaluation=spec), shape, [True], 512 * 2**20, 2**30).phases
    assert max(phases.values()) < 4e9, phases
    in_memory = replace(recipe, evaluation=replace(spec, streaming=False, kl=True))
    assert budget.estimate_run(in_memory, shape, [True], 512 * 2**20, 2**30).phases["baseline evaluation"] > 5e9


def _recipe(tmp_path: Path, model: str, evaluation: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model, "evaluation": {"count": 2, "length": 32, **evaluation},
                                    "passes": [{"rtn": {"group_size": 32}}], "output": str(tmp_path / "out")}))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_sharded(tiny_llama(seed=5), tmp_path / "src", torch.bfloat16)


def test_evaluation_streams_by_itself_and_says_so(folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a budget the float model takes a large share of, the run streams the baseline (perplexity equal to
    the in-memory one), drops KL, says so once, and records the settings it used."""
    in_memory = runner.run(recipes.load(_recipe(tmp_path, str(folder), {})), progress=False, log=lambda _: None)
    assert in_memory.after.get("kl_divergence") is not None
    monkeypatch.setattr(budget, "EVALUATION_SHARE", 1e-9)  # the tiny model is then "a large share"
    lines: list[str] = []
    (tmp_path / "out2").mkdir()
    recipe = recipes.load(_recipe(tmp_path / "out2", str(folder), {}))
    result = runner.run(recipe, progress=False, log=lines.append)
    said = [line for line in lines if line.startswith("evaluation: ")]
    assert len(said) == 1 and "one decoder layer at a time" in said[0] and "KL is off" in said[0]
    assert result.before["perplexity"] == pytest.approx(in_memory.before["perplexity"], rel=1e-4)
    assert "kl_divergence" not in result.after
    recorded = json.loads((result.output / "manifest.json").read_text())["recipe"]["evaluation"]
    assert recorded["streaming"] is True and recorded["kl"] is False


@pytest.mark.parametrize("evaluation", [{"streaming": False}, {"kl": True}])
def test_an_explicit_setting_is_kept(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     evaluation: dict) -> None:
    monkeypatch.setattr(budget, "EVALUATION_SHARE", 1e-9)
    lines: list[str] = []
    result = runner.run(recipes.load(_recipe(tmp_path, str(folder), evaluation)), progress=False,
                        log=lines.append)
    assert not any(line.startswith("evaluation: ") for line in lines)
    assert result.after.get("kl_divergence") is not None
    recorded = json.loads((result.output / "manifest.json").read_text())["recipe"]["evaluation"]
    assert recorded["streaming"] is False and recorded["kl"] is True
