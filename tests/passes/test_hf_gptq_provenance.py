"""The HF-GPTQ checkpoint's quantization_config states what ran, never GPTQ settings for RTN or AWQ codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from toolkit.passes import awq, distill, gptq, rtn
from toolkit.passes.export_hf_gptq import provenance
from toolkit.pipeline import recipes, runner


def test_gptq_settings_are_claimed_only_when_gptq_made_the_codes():
    made = provenance((gptq.GPTQConfig(damp=0.05, true_sequential=False, act_order=True),))
    assert (made["damp_percent"], made["true_sequential"], made["static_groups"]) == (0.05, False, True)
    assert made["meta"]["passes"][0]["gptq"]["damp"] == 0.05
    for history in [(rtn.RTNConfig(),), (awq.AWQConfig(),), (gptq.GPTQConfig(), rtn.RTNConfig())]:
        made = provenance(history)
        assert not {"damp_percent", "true_sequential", "static_groups"} & set(made), history
        assert [next(iter(p)) for p in made["meta"]["passes"]] == [c.name for c in history]
    awq_gptq = provenance((awq.AWQConfig(quantize=False), gptq.GPTQConfig(act_order=False)))
    assert awq_gptq["static_groups"] is False and [next(iter(p)) for p in awq_gptq["meta"]["passes"]] == ["awq", "gptq"]
    assert provenance(()) == {} and provenance((distill.DistillConfig(),)) == {}  # not known: nothing claimed


@pytest.mark.parametrize("quantizer, claims", [
    ({"gptq": {"damp": 0.02, "true_sequential": False}}, {"damp_percent": 0.02, "true_sequential": False}),
    ({"rtn": {}}, {}),
])
def test_the_runner_hands_the_export_its_passes(tmp_path: Path, quantizer: dict, claims: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": "tiny-llama", "calibration": {"count": 4, "length": 32},
        "evaluation": {"count": 2, "length": 32, "baseline": False},
        "passes": [quantizer, {"export_hf_gptq": {}}], "output": str(tmp_path / "out"),
    }))
    result = runner.run(recipes.load(path), progress=False, log=lambda m: None)
    written = json.loads((result.output / "export" / "config.json").read_text())["quantization_config"]
    assert {k: written[k] for k in claims} == claims
    if not claims:
        assert "damp_percent" not in written and "true_sequential" not in written
    name = next(iter(quantizer))
    assert written["meta"]["passes"][0][name]["bits"] == 4 and written["desc_act"] is False
