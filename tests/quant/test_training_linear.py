"""Quantization-aware training's arithmetic (``fake_quantize_ste``) and module (``TrainingLinear``): forward values
exactly the stored codes' dequantization, straight-through gradients, and freezing back to packed codes."""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama
from toolkit.passes import rtn
from toolkit.quant.arithmetic import (
    FP8_MAX,
    dequantize,
    fake_quantize_ste,
    fp8_codes,
    fp8_dequantize,
    quantize,
    rtn_quantize,
)
from toolkit.quant.modules import FP8Linear, QuantLinear, TrainingLinear, quantized_linears, set_module
from toolkit.quant.spec import ActivationSpec, QuantSpec

FP8_CHANNEL = QuantSpec(8, -1, True, type="float")
INT4_G8 = QuantSpec(4, 8, False)
FP8_DYNAMIC = ActivationSpec("float", 8, "token", dynamic=True)


def weights(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed))


def test_fp8_forward_is_the_codes_dequantization_and_the_gradient_passes_straight_through() -> None:
    w = weights()
    scale = w.abs().amax(1, keepdim=True) / FP8_MAX * 0.5  # half the range: the largest weights clamp at 448
    wp = w.clone().requires_grad_(True)
    sp = scale.clone().requires_grad_(True)
    out = fake_quantize_ste(wp, sp, None, FP8_CHANNEL)
    assert torch.equal(out.detach(), fp8_dequantize(fp8_codes(w, scale), scale))
    out.sum().backward()
    v = w / scale
    inside = v.abs() < FP8_MAX + 16  # rounds to a code; beyond, it clamps at 448
    assert not inside.all() and inside.any()
    assert torch.equal(wp.grad, inside.float())
    lsq = (fp8_codes(w, scale).float() - torch.where(inside, v, 0.0)).sum(1, keepdim=True)
    assert torch.allclose(sp.grad, lsq, atol=1e-4)  # LSQ's round(w/s) - w/s inside, the end code outside


def test_integer_forward_is_dequantize_of_quantize_with_the_zero_points() -> None:
    w = weights(1)
    codes, scale, zero = rtn_quantize(w, INT4_G8)
    wp = w.clone().requires_grad_(True)
    out = fake_quantize_ste(wp, scale, zero, INT4_G8)
    assert torch.equal(out.detach(), dequantize(quantize(w, scale, zero, INT4_G8), scale, zero, 8))
    out.sum().backward()
    assert torch.equal(wp.grad, torch.ones_like(w))  # min/max scales: the ends round to the end codes, no clamp
    wp.grad = None
    fake_quantize_ste(wp, scale / 2, zero, INT4_G8).sum().backward()  # half the step: the outer weights clamp
    v = w / scale.repeat_interleave(8, 1) * 2 + zero.float().repeat_interleave(8, 1)
    assert torch.equal(wp.grad, ((v > -0.5) & (v < 15.5)).float()) and 0 < wp.grad.sum() < w.numel()
    with pytest.raises(ToolkitError, match="zero points"):
        fake_quantize_ste(w, scale, None, INT4_G8)


@pytest.mark.parametrize("config", [
    rtn.RTNConfig(bits=4, group_size=32),
    rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC, lm_head_bits=None),
    rtn.RTNConfig(bits=8, group_size=-1, type="float", strategy="tensor", lm_head_bits=None),
], ids=["int4", "fp8-dynamic", "fp8-tensor"])
def test_a_training_linear_computes_what_its_layer_does_and_freezes_back_to_it(config: rtn.RTNConfig) -> None:
    model = rtn.apply(tiny_llama(0), config)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    name, layer = next((n, m) for n, m in quantized_linears(model).items() if n != "lm_head")
    training = TrainingLinear(layer)
    assert (training.theta is None) == (config.strategy == "tensor")  # a shared per-tensor fp8 scale stays
    set_module(model, name, training)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
        training.weight.add_(0.05 * torch.randn_like(training.weight))  # what training would move
        if training.theta is not None:
            training.theta.add_(0.1)
        moved = model(input_ids=ids).logits
    frozen = training.freeze()
    assert type(frozen) is type(layer) and frozen.act == layer.act and frozen.spec == layer.spec
    set_module(model, name, frozen)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, moved)  # exactly what the last forward computed
    if isinstance(frozen, FP8Linear):
        assert not torch.equal(frozen.weight.view(torch.uint8), layer.weight.view(torch.uint8))
    else:
        assert isinstance(frozen, QuantLinear) and frozen.scales.dtype == torch.float16
        assert torch.equal(frozen.qzeros, layer.qzeros) and not torch.equal(frozen.qweight, layer.qweight)
