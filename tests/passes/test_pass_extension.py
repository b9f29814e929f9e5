"""Adding a pass touches one file: a config and its function, here in the test, plus the registry line.

The recipe reader, the memory budget, the runner's dispatch and the manifest all find it through the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import yaml
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.shape import ModelShape
from toolkit.passes import PASSES, Pass
from toolkit.passes.base import PassConfig
from toolkit.passes.context import PassContext
from toolkit.pipeline import recipes, runner


@dataclass(frozen=True)
class RoundNormsConfig(PassConfig):
    """Round every norm weight to ``decimals`` (floor or nearest): a model pass with a choice setting."""

    name: ClassVar[str] = "round_norms"
    reads_calibration: ClassVar[bool] = False

    decimals: int = 1
    mode: Literal["nearest", "floor"] = "nearest"
    claimed_gb: float = 0.0  # extra memory this pass says it needs (the budget must ask it)

    def in_memory_bytes(self, shape: ModelShape, calibration_tokens: int) -> float:
        return super().in_memory_bytes(shape, calibration_tokens) + self.claimed_gb * 1e9


@torch.no_grad()
def round_norms(model: PreTrainedModel, config: RoundNormsConfig, ctx: PassContext) -> PreTrainedModel:
    step = 10.0 ** -config.decimals
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_((torch.floor if config.mode == "floor" else torch.round)(p / step) * step)
    return model


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PASSES, RoundNormsConfig, Pass(round_norms))


def recipe(tmp_path: Path, **settings: object) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "tiny-llama", "evaluation": {"count": 2, "length": 32, "baseline": False},
        "passes": [{"round_norms": settings}], "output": str(tmp_path / "out"),
    }))
    return path


def test_a_registered_pass_runs_through_the_runner(tmp_path, registered):
    result = runner.run(recipes.load(recipe(tmp_path, decimals=1, mode="floor")), progress=False, log=lambda m: None)
    assert [s.name for s in result.steps] == ["round_norms"]
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["recipe"]["passes"] == [{"round_norms": {"decimals": 1, "mode": "floor", "claimed_gb": 0.0}}]
    from safetensors.torch import load_file

    state = {}
    for shard in (result.output / "model").glob("*.safetensors"):
        state.update(load_file(str(shard)))
    norms = [v for k, v in state.items() if "norm" in k]
    assert norms and all(torch.allclose(v * 10, (v * 10).round(), atol=1e-4) for v in norms)


def test_the_recipe_reader_refuses_a_bad_choice_of_a_registered_pass(tmp_path, registered):
    with pytest.raises(ToolkitError, match=r"passes\[0\]\.round_norms\.mode: 'ceil' is not one of \['nearest', 'floor'\]"):
        recipes.load(recipe(tmp_path, mode="ceil"))
    with pytest.raises(ValueError, match="mode must be one of 'nearest', 'floor', got 'ceil'"):
        RoundNormsConfig(mode="ceil")  # type: ignore[arg-type]


def test_the_budget_asks_the_registered_pass(tmp_path, registered):
    with pytest.raises(ToolkitError, match=r"pass round_norms is the largest.*above the memory budget"):
        runner.run(recipes.load(recipe(tmp_path, claimed_gb=1000.0)), progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_an_unregistered_pass_is_unknown(tmp_path):
    with pytest.raises(ToolkitError, match="unknown pass 'round_norms'; available: awq, distill"):
        recipes.load(recipe(tmp_path))
