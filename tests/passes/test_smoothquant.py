"""SmoothQuant: the factors of paper eq. 4, a fold that leaves every family's float function unchanged, and the
claim it exists for: W8A8 with smoothing beats naive W8A8 on a model with activation outliers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_with_outliers
from toolkit.algorithms.smoothquant import smoothing_scales
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import rtn, smoothquant
from toolkit.passes.context import PassContext
from toolkit.quant.spec import ActivationSpec

CALIB = torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(0))
W8A8 = rtn.RTNConfig(bits=8, group_size=-1, input_activations=ActivationSpec("int", 8, "token", dynamic=True),
                     lm_head_bits=None)


def _ctx(family: str, tmp_path: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), tmp_path / "work")


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=CALIB[:2], use_cache=False).logits


def test_factors_balance_the_activation_and_weight_ranges() -> None:
    act_max = torch.tensor([8.0, 1.0, 0.0, 2.0])
    w = torch.tensor([[0.5, 2.0, 1.0, 0.0], [-1.0, 0.5, 1.0, 0.0]])
    s = smoothing_scales(act_max, w, alpha=0.5)
    assert s[:2].tolist() == pytest.approx([(8 / 1) ** 0.5, (1 / 2) ** 0.5])
    assert s[2:].tolist() == [1.0, 1.0]  # a dead channel (no activation or no weight) is left alone
    assert (act_max[:2] / s[:2]).tolist() == pytest.approx((w.abs().amax(0)[:2] * s[:2]).tolist())  # equal ranges
    assert smoothing_scales(act_max, w, alpha=1.0)[0] == pytest.approx(8.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fold_keeps_every_familys_float_function(family: str, tmp_path: Path) -> None:
    reference = _logits(tiny_model(family))
    smoothed = smoothquant.apply(tiny_model(family), smoothquant.SmoothQuantConfig(alpha=0.5), _ctx(family, tmp_path))
    assert torch.allclose(_logits(smoothed), reference, atol=1e-4 * float(reference.abs().max()))
    report = json.loads((tmp_path / "work" / "smoothquant.json").read_text())
    folded = [r for r in report.values() if "s_max" in r]
    assert folded and any(r["s_max"] != r["s_min"] for r in folded)  # something was actually scaled


def test_w8a8_with_smoothing_is_closer_to_float_than_naive_w8a8(tmp_path: Path) -> None:
    reference = _logits(tiny_llama_with_outliers())
    naive = rtn.apply(tiny_llama_with_outliers(), W8A8)
    smoothed = rtn.apply(smoothquant.apply(tiny_llama_with_outliers(), smoothquant.SmoothQuantConfig(),
                                           _ctx("llama", tmp_path)), W8A8)
    errors = [float((_logits(m) - reference).pow(2).mean()) for m in (naive, smoothed)]
    assert errors[1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_0_1_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smoothquant.SmoothQuantConfig(alpha=alpha)
