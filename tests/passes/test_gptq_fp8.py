"""GPTQ on the fp8 e4m3 grid (FP8_DYNAMIC written by ``gptq``): every family gets fp8 weights with per-channel
scales that the FP8 exporters write and prove as they do RTN's, and the claim it exists for: a smaller error than
RTN FP8 on a model with activation outliers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_with_outliers
from toolkit.algorithms.gptq import float_target, gptq_quantize
from toolkit.errors import ToolkitError
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import export_compressed_tensors, export_modelopt, gptq, rtn, smoothquant
from toolkit.passes.context import PassContext
from toolkit.paths import atomic_dir
from toolkit.quant.arithmetic import (
    FP8_MAX,
    fake_quantize_activations,
    fp8_codes,
    fp8_dequantize,
    fp8_searched_scale,
    fp8_weight_scale,
)
from toolkit.quant.modules import FP8Linear, quantized_linears
from toolkit.quant.moments import PairedMoments
from toolkit.quant.spec import ActivationSpec

CALIB = torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(1))
FP8_DYNAMIC = ActivationSpec("float", 8, "token", dynamic=True)
SETTINGS = dict(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None)
GPTQ_FP8 = gptq.GPTQConfig(**SETTINGS)  # type: ignore[arg-type]
RTN_FP8 = rtn.RTNConfig(**SETTINGS)  # type: ignore[arg-type]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ctx(family: str, tmp_path: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), tmp_path / "work")


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_fp8_weights_the_fp8_exports_prove(family: str, tmp_path: Path) -> None:
    model = gptq.apply(tiny_model(family), GPTQ_FP8, _ctx(family, tmp_path))
    plain = rtn.apply(tiny_model(family), RTN_FP8)
    body = {n: m for n, m in quantized_linears(model).items() if n != "lm_head"}
    assert body and all(isinstance(m, FP8Linear) and m.scheme == GPTQ_FP8.scheme for m in body.values())
    moved = 0
    for name, m in body.items():
        ref = quantized_linears(plain)[name]
        assert isinstance(ref, FP8Linear)
        assert torch.equal(m.weight_scale, ref.weight_scale)  # the same scales (absmax / 448): the same format
        assert float(m.weight.float().abs().max()) <= FP8_MAX
        moved += int((m.weight.view(torch.uint8) != ref.weight.view(torch.uint8)).sum())
    assert moved > 0  # the error feedback changed codes, not only the bookkeeping
    with atomic_dir(tmp_path / "ct") as tmp:
        ct = export_compressed_tensors.export(model, tiny_tokenizer(),
                                              export_compressed_tensors.ExportCompressedTensorsConfig(), tmp)
    with atomic_dir(tmp_path / "modelopt") as tmp:
        mo = export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp)
    for metrics in (ct, mo):
        assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5, (family, metrics)


def test_the_scale_is_the_rtn_one_even_when_columns_are_dead() -> None:
    w = torch.randn(6, 16)
    h = torch.eye(16)
    h[4, 4] = 0  # an input never activated: its weights are zeroed, the row scale comes from the rest
    res = gptq_quantize(w, h, GPTQ_FP8.spec)
    w[:, 4] = 0
    assert torch.equal(res.scales, fp8_weight_scale(w)) and torch.all(res.codes[:, 4].float() == 0)


@torch.no_grad()
def test_gptq_fp8_is_closer_to_float_than_rtn_fp8_with_outliers(tmp_path: Path) -> None:
    reference = tiny_llama_with_outliers()(HELD_OUT).logits  # windows the calibration did not see

    def error(model: torch.nn.Module) -> float:
        return float((model(HELD_OUT).logits - reference).pow(2).mean())

    plain = error(rtn.apply(tiny_llama_with_outliers(), RTN_FP8))
    ctx = _ctx("llama", tmp_path)
    found = error(gptq.apply(tiny_llama_with_outliers(), GPTQ_FP8, ctx))
    smoothed = error(gptq.apply(smoothquant.apply(tiny_llama_with_outliers(), smoothquant.SmoothQuantConfig(), ctx), GPTQ_FP8, ctx))
    assert found < 0.85 * plain and smoothed < 0.85 * plain, (plain, found, smoothed)  # fp8 inputs: a floor


def test_per_tensor_fp8_is_refused_by_gptq_in_one_line() -> None:
    """GPTQ's fp8 grid has one scale per output channel; a per-tensor scheme is rtn's (refused before any work)."""
    config = gptq.GPTQConfig(bits=8, group_size=-1, type="float", strategy="tensor", lm_head_bits=None,
                             input_activations=ActivationSpec("float", 8, "tensor", dynamic=False))
    with pytest.raises(ToolkitError, match=r"one scale per tensor \(strategy: tensor\) is rounded by rtn: use rtn"):
        _ = config.spec


# ---------------------------------------------------------------- asymmetric calibration (GPTAQ)

def _upstream_error_inputs(n: int = 512, d: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs ``x: [n, d]`` (correlated channels) and what a quantized model delivers instead: a systematic
    upstream error (a small linear distortion) and then fp8 per-token rounding, as the kernel reads them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64)
                                                               + torch.randn(d, d, generator=g, dtype=torch.float64) / d)
    distorted = x @ (torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64))
    return x, fake_quantize_activations(distorted, "float", "token", None)


def _moments(x: torch.Tensor, x_quantized: torch.Tensor) -> PairedMoments:
    m = PairedMoments(x.shape[1])
    for rows in range(0, len(x), 128):  # in batches, as calibration adds them
        m.add(x_quantized[rows : rows + 128], x[rows : rows + 128])
    return m


def test_paired_moments_are_the_gram_and_the_input_error_cross_term() -> None:
    x, xq = _upstream_error_inputs()
    m = _moments(x, xq)
    n = len(x)
    assert torch.allclose(m.hessian().double(), 2 * xq.t() @ xq / n, rtol=1e-4, atol=1e-4)
    assert torch.allclose(m.cross().double(), 2 * (x - xq).t() @ xq / n, rtol=1e-4, atol=1e-4)
    assert torch.equal(_moments(x, x).cross(), torch.zeros(x.shape[1], x.shape[1]))  # no input error: no cross term


def test_float_target_is_the_least_squares_weight_on_the_quantized_inputs() -> None:
    x, xq = _upstream_error_inputs()
    w = torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = _moments(x, xq)
    target = float_target(w, m.hessian().double(), m.cross().double(), damp=1e-9)
    exact = torch.linalg.lstsq(xq, x @ w.t()).solution.t()  # min ‖X̃ W*ᵀ − X Wᵀ‖
    assert torch.allclose(target, exact, atol=1e-4), float((target - exact).abs().max())
    assert torch.equal(float_target(w, m.hessian().double(), torch.zeros_like(m.cross()).double(), damp=0.01), w)


def test_gptq_on_the_float_target_matches_the_float_output_better() -> None:
    """GPTAQ's objective ``‖Ŵ X̃ − W X‖²``: GPTQ on the target beats GPTQ on ``W`` itself, both on the fp8 grid."""
    x, xq = _upstream_error_inputs()
    w = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(2))
    m = _moments(x, xq)
    h = m.hessian()

    def objective(w_hat: torch.Tensor) -> float:
        return float((xq.float() @ w_hat.t() - x.float() @ w.t()).pow(2).mean())

    def gptq_fp8(target: torch.Tensor) -> torch.Tensor:
        res = gptq_quantize(target, h, GPTQ_FP8.spec)
        return fp8_dequantize(res.codes, res.scales)

    plain, asymmetric = objective(gptq_fp8(w)), objective(gptq_fp8(float_target(w, h, m.cross(), 0.01)))
    assert asymmetric < 0.5 * plain, (plain, asymmetric)


@torch.no_grad()
def test_asymmetric_gptq_fits_the_float_model_on_its_calibration_windows(tmp_path: Path) -> None:
    """What asymmetric calibration optimises: the quantized model's output against the float model's on the
    calibration windows; the result is the same FP8 format (the exports prove it), and a report per group."""
    def error(model: torch.nn.Module) -> float:
        return float((model(CALIB).logits - tiny_model("llama")(CALIB).logits).pow(2).mean())

    ctx = _ctx("llama", tmp_path)
    plain = error(gptq.apply(tiny_model("llama"), GPTQ_FP8, ctx))
    config = dataclasses.replace(GPTQ_FP8, asymmetric=True)
    model = gptq.apply(tiny_model("llama"), config, ctx)
    assert error(model) < 0.5 * plain, (plain, error(model))
    report = json.loads((ctx.workdir / "gptq.json").read_text())
    assert len(report) == 4 * len(model.model.layers) and all(r["target_shift"] > 0 for r in report.values())
    body = {n: m for n, m in quantized_linears(model).items() if n != "lm_head"}
    assert len(body) == 7 * len(model.model.layers)
    assert all(isinstance(m, FP8Linear) and m.scheme == GPTQ_FP8.scheme for m in body.values())
    with atomic_dir(tmp_path / "ct") as tmp:
        metrics = export_compressed_tensors.export(model, tiny_tokenizer(),
                                                   export_compressed_tensors.ExportCompressedTensorsConfig(), tmp)
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5, metrics


def test_asymmetric_gptq_runs_in_memory_only() -> None:
    """The float model's hidden states travel beside the quantized ones: never the layer-by-layer form."""
    weight_only = gptq.GPTQConfig(bits=4, group_size=32, lm_head_bits=None)
    assert weight_only.streams() and not dataclasses.replace(weight_only, asymmetric=True).streams()


# ---------------------------------------------------------------- fp8 scale search

def test_searched_scale_never_rounds_worse_than_absmax_and_usually_better() -> None:
    g = torch.Generator().manual_seed(3)
    w, importance = torch.randn(64, 48, generator=g), torch.rand(48, generator=g) + 0.1

    def error(scale: torch.Tensor) -> torch.Tensor:  # per row
        return ((w - fp8_dequantize(fp8_codes(w, scale), scale)) ** 2 * importance).sum(1)

    searched, absmax = fp8_searched_scale(w, importance), fp8_weight_scale(w)
    assert searched.shape == absmax.shape == (64, 1)
    assert torch.all(error(searched) <= error(absmax)) and float(error(searched).sum()) < 0.9 * float(error(absmax).sum())
    ratio = searched / absmax
    assert float(ratio.min()) >= 0.8 - 1e-6 and float(ratio.max()) <= 1.25 + 1e-6


def test_gptq_with_scale_search_keeps_the_format_and_lowers_the_layer_error() -> None:
    x, _ = _upstream_error_inputs(d=48)
    x = x.float()
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    h = 2 * x.t() @ x / len(x)

    def error(scale_search: bool) -> float:
        res = gptq_quantize(w, h, GPTQ_FP8.spec, scale_search=scale_search)
        assert res.scales.shape == (32, 1) and res.codes.dtype == torch.float8_e4m3fn
        return float((x @ (fp8_dequantize(res.codes, res.scales) - w).t()).pow(2).mean())

    assert error(True) < 0.95 * error(False)


def test_scale_search_is_refused_for_integer_weights() -> None:
    with pytest.raises(ValueError, match="scale_search picks fp8 per-channel weight scales: use it with type: float"):
        gptq.GPTQConfig(bits=4, group_size=32, scale_search=True)
