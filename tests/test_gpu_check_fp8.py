"""benchmarks/gpu_check.py's FP8 section: the CPU half everywhere, torch._scaled_mm where a Hopper/Ada GPU is."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark
from toolkit.quant.arithmetic import fake_quantize_activations
from toolkit.quant.modules import FP8Linear

gpu_check = load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    return gpu_check.fp8_model("tiny-llama", 24)


def test_operands_are_our_fp8_activation_rounding_and_weights(tiny: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, ids = tiny
    name, x = next(iter(gpu_check.fp8_inputs(model, ids).items()))
    module = dict(model.named_modules())[name]
    assert isinstance(module, FP8Linear) and x.shape == (ids.numel(), module.in_features)
    x8, x_scale, w8t, w_scale = gpu_check.fp8_operands(module, x)
    assert x8.dtype == torch.float8_e4m3fn and x_scale.shape == (x.shape[0], 1)
    assert torch.equal(x8.float() * x_scale, fake_quantize_activations(x, "float", "token", None))
    assert w8t.shape == (module.in_features, module.out_features) and w_scale.shape == (1, module.out_features)
    with torch.no_grad():
        ref = module(x)
    assert gpu_check.relative_error(gpu_check.dequantized_product(x8, x_scale, w8t, w_scale), ref) <= 1e-5
    # the measure sees a wrong scale: what a kernel reading the scales the wrong way round would give
    assert gpu_check.relative_error(gpu_check.dequantized_product(x8, x_scale, w8t, w_scale * 1.05), ref) > 1e-2


@pytest.mark.skipif(gpu_check.scaled_mm_skip_reason("cuda") is None, reason="a GPU that runs _scaled_mm is here")
def test_without_a_capable_gpu_the_scaled_mm_half_is_skipped_with_the_reason(
        tiny: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, ids = tiny
    report = gpu_check.fp8_check(model, ids, "cuda")
    linears = sum(isinstance(m, FP8Linear) for m in model.modules())
    assert report["linears"] == linears > 0 and report["ok"] is True
    assert report["cpu_rebuild_max_rel_error"] <= 1e-5  # type: ignore[operator]
    assert "compute capability 8.9" in report["scaled_mm"]["skipped"]  # type: ignore[index]


@pytest.mark.skipif(gpu_check.scaled_mm_skip_reason("cuda") is not None,
                    reason=str(gpu_check.scaled_mm_skip_reason("cuda")))
def test_scaled_mm_on_the_gpu_matches_our_cpu_fp8_linears() -> None:
    model, ids = gpu_check.fp8_model("smollm2", 64)
    report = gpu_check.fp8_check(model, ids, "cuda")
    assert report["ok"] is True, report
    assert report["scaled_mm"]["max_rel_error"] <= gpu_check.FP8_TOLERANCE  # type: ignore[index]
