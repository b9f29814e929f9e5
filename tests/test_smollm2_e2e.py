"""End-to-end on the real SmolLM2 (bundled GGUF): the README's default recipe and generation."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2
from toolkit.cli import main

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@requires_smollm2
def test_default_recipe_on_smollm2(tmp_path, monkeypatch, isolated_cache):
    # A fresh cache, so the pass and both evaluations really run; only the GGUF conversion is reused.
    from toolkit.models import sources

    sources.cached_gguf_checkpoint(sources.smollm2_gguf_path())
    fresh = tmp_path / "cache"
    fresh.mkdir()
    (fresh / "models").symlink_to(isolated_cache / "models")
    monkeypatch.setenv("TOOLKIT_CACHE", str(fresh))
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "smollm2-int4-rtn.yaml"), "--output", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["perplexity"] == pytest.approx(14.80, abs=0.05)  # ../shared/REFERENCE.md
    assert 18.5 < after["perplexity"] < 21.5  # reference RTN int4 g32 sym: 19.85
    assert after["bytes"] <= 0.25 * before["bytes"]
    assert after["top1_agreement"] > 0.6
    assert (out / "model" / "quantization.json").is_file()
    assert not any(step["cache_hit"] for step in json.loads((out / "manifest.json").read_text())["steps"])
    shutil.rmtree(out)


@pytest.mark.slow
@requires_smollm2
def test_smollm2_answers_with_its_chat_template():
    from toolkit.evaluation.torch_generate import generate_text

    text = "".join(generate_text("smollm2", "What is the capital of France?", max_new_tokens=12))
    assert "Paris" in text
