"""Quantized input activations (W8A8 int8, FP8): the arithmetic, the modules computing with them, rtn and gptq
writing them, and the packed record saving and loading them exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.paths import atomic_dir
from toolkit.quant import checkpoint
from toolkit.quant.arithmetic import FP8, FP8_MAX, fake_quantize_activations, fp8_quantize
from toolkit.quant.checkpoint import FORMAT, PackedCheckpoint
from toolkit.quant.modules import FP8Linear, QuantLinear, quantized_linears
from toolkit.quant.spec import ActivationSpec

INT8_DYNAMIC = ActivationSpec("int", 8, "token", dynamic=True)
INT8_STATIC = ActivationSpec("int", 8, "tensor", dynamic=False)
FP8_DYNAMIC = ActivationSpec("float", 8, "token", dynamic=True)
FP8_STATIC = ActivationSpec("float", 8, "tensor", dynamic=False)
CONFIGS = {
    "w8a8-dynamic": rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_DYNAMIC),
    "w8a8-static": rtn.RTNConfig(bits=8, group_size=-1, input_activations=INT8_STATIC),
    "fp8-dynamic": rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=FP8_DYNAMIC,
                                 lm_head_bits=None),
    "fp8-static": rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=FP8_STATIC, lm_head_bits=None),
    "fp8-static-tensor": rtn.RTNConfig(bits=8, group_size=-1, type="float", strategy="tensor",
                                       input_activations=FP8_STATIC, lm_head_bits=None),
}
WINDOWS = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(tokenizer=tiny_tokenizer(), calibration_loader=lambda: WINDOWS, original_loader=tiny_llama,
                       workdir=tmp_path / "work")


def test_int8_per_token_activations_are_rounded_to_127_steps_of_each_rows_absmax() -> None:
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 5).view(1, 5, 1)
    xq = fake_quantize_activations(x, "int", "token", None)
    scale = x.abs().amax(-1, keepdim=True) / 127
    codes = xq / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and float(codes.abs().max()) <= 127 + 1e-3
    assert bool(((xq - x).abs() <= scale / 2 + 1e-6).all())
    assert not torch.equal(xq, x)


def test_static_scales_saturate_and_fp8_inputs_land_on_the_e4m3_grid() -> None:
    x = torch.tensor([[-4.0, 0.3, 1.0, 9.0]])
    xq = fake_quantize_activations(x, "int", "tensor", torch.tensor([1 / 127]))  # range ±1: -4 and 9 saturate
    assert xq[0].tolist() == pytest.approx([-128 / 127, round(0.3 * 127) / 127, 1.0, 1.0])
    xq = fake_quantize_activations(x, "float", "tensor", torch.tensor([0.5]))
    assert torch.equal((xq / 0.5).to(FP8).float(), xq / 0.5)  # exactly representable
    assert float(xq.max()) == 9.0 and float(fake_quantize_activations(x * 100, "float", "tensor",
                                                                      torch.tensor([1.0])).max()) == FP8_MAX


def test_fp8_weights_keep_one_scale_per_row_and_a_small_error() -> None:
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16).view(-1, 1)
    w8, scale = fp8_quantize(w)
    assert w8.dtype == FP8 and scale.shape == (16, 1)
    assert torch.allclose(w8.float().abs().amax(1), torch.full((16,), FP8_MAX))
    assert float(((w8.float() * scale - w).abs() / w.abs().amax(1, keepdim=True)).max()) <= 2 ** -4


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rtn_writes_the_scheme_and_the_packed_folder_reloads_it_exactly(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    ref = tiny_llama()(WINDOWS).logits
    model = rtn.apply(tiny_llama(), config, _ctx(tmp_path))
    body = {n: m for n, m in quantized_linears(model).items() if n != "lm_head"}
    kind = FP8Linear if config.type == "float" else QuantLinear
    assert body and all(isinstance(m, kind) and m.scheme == config.scheme for m in body.values())
    logits = model(WINDOWS).logits
    error = float((logits - ref).abs().max() / ref.abs().max())
    assert 0 < error < 0.3  # quantized weights and inputs (fp8 e4m3: 3 mantissa bits): not the float model, near it
    with atomic_dir(tmp_path / "art") as tmp:
        checkpoint.save_model(model, tiny_tokenizer(), tmp)
    record = PackedCheckpoint.read(tmp_path / "art")
    assert record.format == FORMAT and record == PackedCheckpoint.of_model(model)
    assert all(m.scheme == config.scheme for n, m in record.modules.items() if n != "lm_head")
    loaded = checkpoint.load_model(tmp_path / "art")
    assert torch.equal(loaded(WINDOWS).logits, logits)
    for n, m in quantized_linears(loaded).items():
        for key, t in m.state_dict().items():
            assert torch.equal(t, quantized_linears(model)[n].state_dict()[key]), (n, key)


@torch.no_grad()
def test_per_tensor_fp8_weights_share_one_scale_across_the_linears_a_consumer_fuses(tmp_path: Path) -> None:
    model = rtn.apply(tiny_llama(), CONFIGS["fp8-static-tensor"], _ctx(tmp_path))
    source = tiny_llama()
    for i, layer in enumerate(model.model.layers):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            absmax = max(float(source.model.layers[i].get_submodule(n).weight.abs().max()) for n in group)
            for n in group:
                m = layer.get_submodule(n)
                assert isinstance(m, FP8Linear) and m.weight_scale.shape == (1, 1)
                assert float(m.weight_scale) == pytest.approx(absmax / FP8_MAX, rel=1e-6), (i, n)
                own = float(source.model.layers[i].get_submodule(n).weight.abs().max()) / float(m.weight_scale)
                assert float(m.weight.float().abs().max()) == pytest.approx(own, rel=2 ** -3)  # its own max, on that scale
        down = layer.mlp.down_proj  # alone: its own max lands on 448
        assert float(down.weight.float().abs().max()) == FP8_MAX
    scales = {float(layer.self_attn.q_proj.weight_scale) for layer in model.model.layers}
    assert len(scales) == len(model.model.layers)  # one per layer and group, not one for the model


@torch.no_grad()
def test_static_scales_come_from_the_calibration_maxima_and_are_equal_across_fused_inputs(tmp_path: Path) -> None:
    model = rtn.apply(tiny_llama(), CONFIGS["w8a8-static"], _ctx(tmp_path))
    layer = model.model.layers[0]
    float_model = tiny_llama()
    seen: list[torch.Tensor] = []
    hook = float_model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    float_model(WINDOWS)
    hook.remove()
    expected = float(torch.cat([s.reshape(-1) for s in seen]).abs().max()) / 127
    scales = [float(layer.get_submodule(p).input_scale) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert scales == pytest.approx([expected] * 3, rel=1e-6)
    assert float(layer.mlp.gate_proj.input_scale) == float(layer.mlp.up_proj.input_scale) != scales[0]


def test_gptq_runs_int8_w8a8_with_static_scales(tmp_path: Path) -> None:
    config = gptq.GPTQConfig(bits=8, group_size=-1, input_activations=INT8_STATIC)
    model = gptq.apply(tiny_llama(), config, _ctx(tmp_path))
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.act == INT8_STATIC and float(q.input_scale) != 1.0


@pytest.mark.parametrize("make,match", [
    (lambda ctx: rtn.apply(tiny_llama(), rtn.RTNConfig(bits=8, group_size=-1, input_activations=ActivationSpec(
        "int", 8, "tensor", dynamic=False, symmetric=False)), ctx), "use symmetric: true in input_activations"),
    (lambda ctx: rtn.apply(tiny_llama(), rtn.RTNConfig(bits=8, group_size=32, type="float"), ctx),
     "fp8 weights have one scale per output channel: use group_size: -1"),
    (lambda ctx: gptq.apply(tiny_llama(), gptq.GPTQConfig(bits=8, group_size=32, type="float"), ctx),
     "fp8 weights have one scale per output channel: use group_size: -1"),
    (lambda ctx: rtn.apply(tiny_llama(), CONFIGS["w8a8-static"], None),
     "static activation scales calibrates them: give it calibration data"),
])
def test_what_the_modules_do_not_compute_is_refused_before_any_work(tmp_path: Path, make, match: str) -> None:
    def no_calibration() -> torch.Tensor:
        raise AssertionError("read calibration data before refusing")

    ctx = PassContext(tokenizer=tiny_tokenizer(), calibration_loader=no_calibration, original_loader=tiny_llama,
                      workdir=tmp_path / "work")
    with pytest.raises(ToolkitError, match=match) as info:
        make(ctx)
    assert "\n" not in str(info.value) and not (tmp_path / "work").exists()


@pytest.mark.parametrize("export", ["onnx", "export_gguf", "export_hf_gptq"])
def test_weight_only_exports_refuse_a_model_computing_with_quantized_inputs(tmp_path: Path, export: str) -> None:
    from toolkit.passes import PASSES

    cls = next(c for c in PASSES if c.name == export)
    model = rtn.apply(tiny_llama(), rtn.RTNConfig(bits=8, group_size=-1, type="float"))  # fp8 weights, float inputs
    with pytest.raises(ToolkitError, match=f"^{export} writes integer codes; this scheme holds fp8 weights"):
        PASSES[cls].run(model, tiny_tokenizer(), cls(), tmp_path / "out")
    if export != "onnx":  # onnx runs W8A8 int8 (tests/onnx/test_export_w8a8.py)
        model = rtn.apply(tiny_llama(), CONFIGS["w8a8-dynamic"])
        with pytest.raises(ToolkitError, match=f"^{export} quantizes weights only; this W8A8 scheme"):
            PASSES[cls].run(model, tiny_tokenizer(), cls(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
