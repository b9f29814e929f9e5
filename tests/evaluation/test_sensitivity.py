"""Mixed precision chosen by measurement (``toolkit.evaluation.sensitivity``, GPTQ's ``keep_float``): the scorer's shortcut
(layers before the changed one bypassed) computes what a whole forward computes on every family, the layer-first
search keeps what scoring every group would keep, and the pass leaves the chosen groups float through the exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.conftest import tiny_llama_with_outliers
from toolkit.errors import ToolkitError
from toolkit.evaluation.sensitivity import (
    GroupCost,
    GroupScorer,
    KeepFloat,
    choose,
    keep_float_groups,
    layer_groups,
)
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import export_compressed_tensors, gptq
from toolkit.passes.context import PassContext
from toolkit.paths import atomic_dir
from toolkit.pipeline import recipes, runner
from toolkit.quant.arithmetic import fake_quantize_activations, fake_quantize_weight
from toolkit.quant.modules import FP8Linear, quantized_linears
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec
from toolkit.quant.surgery import target_linears
from toolkit.schema import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
FP8_DYNAMIC = QuantScheme(QuantSpec(8, -1, True, "float"), ActivationSpec("float", 8, "token", dynamic=True))
W4 = QuantScheme(QuantSpec(4, 16, True))


@torch.no_grad()
def _whole_forward_kl(model: nn.Module, names: list[str], scheme: QuantScheme, windows: torch.Tensor) -> float:
    """The scorer's figure computed the long way: a copy with the group quantized, whole forwards."""
    ref = F.log_softmax(model(input_ids=windows, use_cache=False).logits.float(), -1)
    changed = copy.deepcopy(model)
    act = scheme.input_activations
    for n in names:
        m = changed.get_submodule(n)
        m.weight.copy_(fake_quantize_weight(m.weight.float(), scheme.weights))
        if act is not None:
            m.register_forward_pre_hook(lambda _, a: (fake_quantize_activations(a[0], act.type, act.strategy, None),))
    logp = F.log_softmax(changed(input_ids=windows, use_cache=False).logits.float(), -1)
    return float((ref.exp() * (ref - logp)).sum()) / windows.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scorer_equals_whole_forwards_on_every_family(family: str) -> None:
    """Layers before the changed one are bypassed with their float outputs kept: the KL must be the one a whole
    forward of a quantized copy gives, for a group in the last layer (bypass) and in the first (none), on every
    family (sliding-window masks, per-type rotary, fused projections, sandwich norms, logit scaling)."""
    model = tiny_model(family)
    scorer = GroupScorer(model, CALIB, FP8_DYNAMIC, batch_size=4)  # two batches, the second one short
    groups = layer_groups(model, set(target_linears(model, ())))
    last = max(groups)
    for names in (groups[last][-1], groups[0][0]):
        got, want = scorer.kl(list(names)), _whole_forward_kl(model, list(names), FP8_DYNAMIC, CALIB)
        assert want > 0
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9), names
    names = list(groups[last][0])  # integer weights, float inputs
    got = GroupScorer(model, CALIB, W4, batch_size=6).kl(names)
    assert got == pytest.approx(_whole_forward_kl(model, names, W4, CALIB), rel=1e-4) and got > 0
    state = {k: v.clone() for k, v in tiny_model(family).state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # every weight put back


def test_costliest_groups_first_each_if_it_fits() -> None:
    def g(kl: float, weights: int) -> GroupCost:
        return GroupCost(0, (f"g{kl}",), weights, kl)

    groups = [g(1.0, 10), g(5.0, 60), g(3.0, 50), g(2.0, 30)]
    assert [x.kl for x in choose(groups, 100)] == [5.0, 2.0, 1.0]  # 3.0 no longer fits after 5.0
    assert choose(groups, 9) == []


def test_the_layer_first_search_keeps_what_scoring_every_group_keeps() -> None:
    """On a model with outlier channels (whose fp8 inputs cost unevenly), the search that stops once no layer can
    beat the kept groups returns what scoring every group and choosing would."""
    model = tiny_llama_with_outliers()
    targets = target_linears(model, ())
    for share in (0.1, 0.3):
        chosen = keep_float_groups(model, CALIB, FP8_DYNAMIC, targets, KeepFloat(share, windows=6), batch_size=6)
        scorer = GroupScorer(model, CALIB, FP8_DYNAMIC, batch_size=6)
        every = [GroupCost(i, g, sum(targets[n].weight.numel() for n in g), scorer.kl(list(g)))
                 for i, gs in layer_groups(model, set(targets)).items() for g in gs]
        assert [g.names for g in chosen.kept] == [g.names for g in choose(every, chosen.budget)]
        assert 0 < sum(g.weights for g in chosen.kept) <= share * chosen.total


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, tiny_llama_with_outliers, tmp_path / "work")


def test_gptq_keeps_the_chosen_groups_float_and_the_export_ignores_them(tmp_path: Path) -> None:
    config = gptq.GPTQConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                             input_activations=ActivationSpec("float", 8, "token", dynamic=True),
                             keep_float=KeepFloat(0.2, windows=4))
    assert not config.streams()  # it scores whole forwards: in memory
    ctx = _ctx(tmp_path)
    model = gptq.apply(tiny_llama_with_outliers(), config, ctx)
    report = json.loads((tmp_path / "work" / "gptq.json").read_text())["keep_float"]
    assert ctx.findings["keep_float"]["kept_float"] == report["kept_float"]  # what the run's manifest records
    kept = [n for g in report["kept_float"] for n in g["names"]]
    assert kept and 0 < report["share_kept"] <= 0.2
    linears = quantized_linears(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            assert (name in kept) == (name not in linears)
            assert name in kept or isinstance(linears[name], FP8Linear)
    out = tmp_path / "export"
    with atomic_dir(out) as staging:
        export_compressed_tensors.export(model, tiny_tokenizer(),
                                         export_compressed_tensors.ExportCompressedTensorsConfig(), staging)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(kept) <= set(ignore)


def test_keep_float_needs_a_share_and_is_a_gptq_setting() -> None:
    for bad in ({"share": 0}, {"share": 1.5}, {"share": 0.03, "windows": 0}, {"windows": 4}):
        with pytest.raises(ToolkitError, match="keep_float"):
            build(gptq.GPTQConfig, {"keep_float": bad}, "recipe.yaml")
    assert build(gptq.GPTQConfig, {"keep_float": {"share": 0.03}}, "r").keep_float == KeepFloat(0.03, 4)
    with pytest.raises(ValueError, match="share"):
        KeepFloat(0.0)
    model = tiny_model("llama")
    with pytest.raises(ToolkitError, match="no linear"):  # the skip list is checked before any scoring
        gptq.apply(model, gptq.GPTQConfig(bits=4, group_size=16, skip=("nothing.*",), keep_float=KeepFloat(0.1)),
                   PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model("llama"), Path("/nonexistent")))


def test_a_recipe_records_the_choice_in_the_manifest_and_its_cache(tmp_path: Path) -> None:
    recipe = {"model": "tiny-llama", "calibration": {"count": 4, "length": 32}, "evaluation": {"count": 2, "length": 32},
              "passes": [{"gptq": {"bits": 4, "group_size": 32, "keep_float": {"share": 0.2, "windows": 2}}}],
              "output": str(tmp_path / "out")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = runner.run(recipes.load(path), progress=False, log=lambda m: None)
    step = json.loads((first.output / "manifest.json").read_text())["steps"][0]
    kept = step["metrics"]["keep_float"]
    assert kept["kept_float"] and 0 < kept["share_kept"] <= 0.2
    again = runner.run(recipes.load(path), progress=False, log=lambda m: None, overwrite=True)
    assert again.steps[0].cache_hit and again.steps[0].metrics == step["metrics"]
