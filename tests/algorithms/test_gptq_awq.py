"""GPTQ and AWQ: the math on small layers, the passes on the tiny model, the HF GPTQ checkpoint format."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.algorithms.awq import clip_weight, output_error, search_clip, search_scales
from toolkit.algorithms.gptq import SingularHessianError, gptq_quantize, inverse_hessian_factor
from toolkit.errors import ToolkitError
from toolkit.interop import hf_gptq
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import awq, export_hf_gptq, gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.quant.arithmetic import (
    FP8,
    FP8_MAX,
    dequantize,
    fake_quantize_weight,
    fp8_dequantize,
    fp8_quantize,
    fp8_weight_scale,
    rtn_quantize,
)
from toolkit.quant.calibration import capture_layer_inputs
from toolkit.quant.formats import GPTQInt32
from toolkit.quant.modules import QuantLinear, quantized_modules
from toolkit.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


SPECS = [QuantSpec(4, 16, True), QuantSpec(4, 16, False), QuantSpec(3, -1, False), QuantSpec(8, 16, True)]


def correlated_inputs(n: int, d: int, seed: int = 0, outliers: tuple[int, ...] = ()) -> torch.Tensor:
    """``[n, d]`` activations with correlated channels and optional outlier channels (x20)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    x[:, list(outliers)] *= 20
    return x


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).t()) ** 2).mean())


# ---------------------------------------------------------------- GPTQ math


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(spec: QuantSpec, act_order: bool) -> None:
    w = torch.randn(5, 32)
    res = gptq_quantize(w, torch.eye(32), spec, act_order=act_order)
    codes, scales, zeros = rtn_quantize(w, spec)
    assert torch.equal(res.codes, codes) and torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(spec: QuantSpec, act_order: bool) -> None:
    w = torch.randn(24, 64)
    x = correlated_inputs(512, 64, outliers=(3, 40))
    h = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize(w, h, spec, block_size=16, act_order=act_order)
    gptq_w = dequantize(res.codes, res.scales, res.zeros, spec.group(64))
    assert layer_error(w, gptq_w, x) < 0.9 * layer_error(w, fake_quantize_weight(w, spec), x)


FP8_WEIGHTS = QuantSpec(8, -1, True, "float")


@pytest.mark.parametrize("act_order", [False, True])
def test_fp8_gptq_with_identity_hessian_is_fp8_rtn(act_order: bool) -> None:
    w = torch.randn(5, 32) * torch.logspace(-2, 1, 5).view(-1, 1)
    res = gptq_quantize(w, torch.eye(32), FP8_WEIGHTS, act_order=act_order)
    w8, scale = fp8_quantize(w)
    assert res.codes.dtype == FP8 and torch.equal(res.codes.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(res.scales, scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_fp8_gptq_lands_on_the_e4m3_grid_and_beats_fp8_rtn_with_outliers(act_order: bool) -> None:
    w = torch.randn(24, 64)
    x = correlated_inputs(512, 64, outliers=(3, 40))
    res = gptq_quantize(w, 2 * x.t() @ x / x.shape[0], FP8_WEIGHTS, block_size=16, act_order=act_order)
    assert res.codes.dtype == FP8 and torch.equal(res.scales, fp8_weight_scale(w))  # same scales: same format
    assert float(res.codes.float().abs().max()) <= FP8_MAX and not torch.equal(res.codes, fp8_quantize(w)[0])
    assert layer_error(w, fp8_dequantize(res.codes, res.scales), x) < 0.8 * layer_error(
        w, fp8_dequantize(*fp8_quantize(w)), x)


def test_fp8_gptq_refuses_groups() -> None:
    with pytest.raises(ToolkitError, match="fp8 weights have one scale per output channel: use group_size -1"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), QuantSpec(8, 16, True, "float"))


def test_gptq_handles_dead_and_duplicated_columns() -> None:
    x = correlated_inputs(256, 16)
    x[:, 5] = 0  # never activated
    x[:, 7] = x[:, 6]  # duplicated: H is singular without dampening
    w = torch.randn(4, 16)
    res = gptq_quantize(w, 2 * x.t() @ x / 256, QuantSpec(4, 8, True))
    assert res.dead_columns == 1
    deq = dequantize(res.codes, res.scales, res.zeros, 8)
    assert torch.all(deq[:, 5] == 0)


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse() -> None:
    x = correlated_inputs(256, 48)
    h = 2 * x.t() @ x / 256
    u, used = inverse_hessian_factor(h, damp=0.01)
    assert used == 0.01 and torch.equal(u, u.triu())
    damped = h.double() + 0.01 * float(torch.diagonal(h.double()).mean()) * torch.eye(48, dtype=torch.float64)
    assert torch.allclose(u.double().t() @ u.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)
    # the memory-lean order of operations gives the plain formula's floats exactly (P L⁻¹ P, P the reversal)
    rev = torch.arange(47, -1, -1)
    lower = torch.linalg.cholesky(damped[rev][:, rev])
    plain = torch.linalg.solve_triangular(lower, torch.eye(48, dtype=torch.float64), upper=False)[rev][:, rev].float()
    assert torch.equal(u, plain)


def test_gptq_raises_dampening_until_cholesky_succeeds() -> None:
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalue -0.05: 0.01 x mean diag is not enough
    _, used = inverse_hessian_factor(h, damp=0.01)
    assert used == pytest.approx(0.1)
    res = gptq_quantize(torch.randn(3, 2), h, QuantSpec(4, -1, True), damp=0.01)
    assert res.damp == pytest.approx(0.1)


def test_gptq_refuses_hessian_singular_at_max_dampening() -> None:
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalue -2: no dampening up to 1.0 x mean diag fixes it
    with pytest.raises(SingularHessianError, match="not positive definite"):
        gptq_quantize(torch.randn(3, 2), h, QuantSpec(4, -1, True))


def test_gptq_refuses_nan_weights() -> None:
    w = torch.randn(3, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ToolkitError, match="NaN"):
        gptq_quantize(w, torch.eye(8), QuantSpec(4, 8, True))


# ---------------------------------------------------------------- AWQ math


@pytest.mark.parametrize("spec", [QuantSpec(4, 16, True), QuantSpec(3, 16, False)], ids=str)
def test_awq_scales_and_clipping_beat_rtn_with_outliers(spec: QuantSpec) -> None:
    w = torch.randn(24, 64)
    x = correlated_inputs(512, 64, outliers=(3, 40, 41))
    c = x.t() @ x / x.shape[0]
    res = search_scales(w, x.abs().mean(0), c, spec)
    rtn_err = output_error(w - fake_quantize_weight(w, spec), c)
    assert res.baseline == pytest.approx(rtn_err, rel=1e-4)
    assert res.alpha > 0 and res.error < 0.9 * rtn_err
    # the objective is the real output error on the activations
    awq_w = fake_quantize_weight(w * res.scales, spec) / res.scales
    assert layer_error(w, awq_w, x) == pytest.approx(res.error, rel=1e-3)
    ws = w * res.scales
    cs = c / torch.outer(res.scales, res.scales)
    clipped = clip_weight(ws, search_clip(ws, cs, spec), spec)
    assert output_error(ws - fake_quantize_weight(clipped, spec), cs) <= res.error * (1 + 1e-5)


# ---------------------------------------------------------------- passes on the tiny model


def tiny_ctx(tmp_path: Path, windows: torch.Tensor) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: windows, lambda: tiny_llama(), tmp_path / "work")


@pytest.fixture(scope="module")
def outlier_model() -> torch.nn.Module:
    """The tiny Llama with a few norm channels x20: activation outliers as in real LLMs."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 50, 77]] *= 20
    return model


def first_layer_error(reference: torch.nn.Module, candidate: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean squared error of decoder layer 0's output, both layers fed the float model's inputs."""
    inputs = capture_layer_inputs(reference, windows, batch_size=4)
    total = 0.0
    with torch.no_grad():
        for hidden, kw in inputs.batches():
            ref = reference.model.layers[0](hidden, **kw)
            got = candidate.model.layers[0](hidden, **kw)
            total += float(((ref - got) ** 2).mean())
    return total


@pytest.fixture(scope="module")
def windows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"calib": torch.randint(0, 256, (8, 48), generator=g), "eval": torch.randint(0, 256, (4, 48), generator=g)}


def test_gptq_and_awq_layers_beat_rtn_on_outliers(outlier_model, windows, tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, windows["calib"])
    errors = {}
    for name, (run, config) in {
        "rtn": (rtn.apply, rtn.RTNConfig(lm_head_bits=None)),
        "gptq": (gptq.apply, gptq.GPTQConfig(lm_head_bits=None)),
        "awq": (awq.apply, awq.AWQConfig(lm_head_bits=None)),
    }.items():
        model = run(copy.deepcopy(outlier_model), config, ctx)
        assert len(quantized_modules(model)) == 14
        errors[name] = first_layer_error(outlier_model, model, windows["eval"])
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors
    assert json.loads((ctx.workdir / "gptq.json").read_text())["model.layers.0.self_attn.q_proj"]["damp"] == 0.01


def test_awq_folding_keeps_float_logits(outlier_model, windows, tmp_path: Path) -> None:
    model = awq.apply(copy.deepcopy(outlier_model), awq.AWQConfig(quantize=False, clip=False), tiny_ctx(tmp_path, windows["calib"]))
    assert not quantized_modules(model)
    ln = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(ln, outlier_model.model.layers[0].input_layernorm.weight)  # scales were folded
    with torch.no_grad():
        ref = outlier_model(input_ids=windows["eval"]).logits
        got = model(input_ids=windows["eval"]).logits
    assert (ref - got).abs().max() < 1e-4
    report = json.loads((tmp_path / "work" / "awq.json").read_text())
    assert "grouped-query" in report["model.layers.0.self_attn.v_proj"]["skipped"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-phi3"])
def test_awq_never_clips_query_and_key_projections(family: str, windows, tmp_path: Path) -> None:
    """Clipping changes the clipped linears and leaves q/k (Phi-3: the fused qkv_proj) as scaling alone made them."""
    from toolkit import models
    from toolkit.models.architectures import layout_of

    base = models.load(family).model
    arch = layout_of(base)
    weights = {}
    for clip in (False, True):
        model = awq.apply(copy.deepcopy(base), awq.AWQConfig(quantize=False, clip=clip),
                          tiny_ctx(tmp_path / str(clip), windows["calib"]))
        layer = model.get_submodule(f"{arch.layers}.0")
        weights[clip] = {n: layer.get_submodule(n).weight.detach().clone()
                         for n in (*arch.attention_projections(), *arch.mlp_projections(), arch.down)}
    exempt = arch.clip_exempt()
    assert exempt == (("self_attn.qkv_proj",) if family == "tiny-phi3" else ("self_attn.q_proj", "self_attn.k_proj"))
    for name in exempt:
        assert torch.equal(weights[False][name], weights[True][name]), name
    assert any(not torch.equal(weights[False][n], weights[True][n]) for n in weights[True] if n not in exempt)


def test_awq_then_gptq_composes(outlier_model, windows, tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, windows["calib"])
    model = awq.apply(copy.deepcopy(outlier_model), awq.AWQConfig(quantize=False), ctx)
    model = gptq.apply(model, gptq.GPTQConfig(), ctx)
    assert len(quantized_modules(model)) == 15  # 14 decoder linears + the int8 head
    rtn_model = rtn.apply(copy.deepcopy(outlier_model), rtn.RTNConfig(), ctx)
    assert first_layer_error(outlier_model, model, windows["eval"]) < first_layer_error(outlier_model, rtn_model, windows["eval"])


def head_output_error(reference: torch.nn.Module, candidate: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean squared logit error of the candidate's head on the reference's final hidden states."""
    with torch.no_grad():
        hidden = reference.model(input_ids=windows).last_hidden_state
        return float(((reference.lm_head(hidden) - candidate.lm_head(hidden)) ** 2).mean())


def test_gptq_head_beats_rtn_head_and_stays_tied(outlier_model, windows, tmp_path: Path) -> None:
    ctx = tiny_ctx(tmp_path, windows["calib"])
    errors = {}
    for method in ("rtn", "gptq"):
        config = gptq.GPTQConfig(group_size=16, symmetric=False, lm_head_bits=4, lm_head_method=method)
        model = gptq.apply(copy.deepcopy(outlier_model), config, ctx)
        head = model.lm_head
        assert isinstance(head, QuantLinear) and head.spec.bits == 4
        assert model.get_input_embeddings().weight_source is head  # the tied embedding reads the same codes
        errors[method] = head_output_error(outlier_model, model, windows["eval"])
    assert errors["gptq"] < errors["rtn"], errors
    assert json.loads((ctx.workdir / "gptq.json").read_text())["lm_head"]["damp"] == 0.01


def test_nan_weight_is_reported_with_its_layer(windows, tmp_path: Path) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ToolkitError, match=r"model\.layers\.1\.mlp\.up_proj"):
        gptq.apply(model, gptq.GPTQConfig(), tiny_ctx(tmp_path, windows["calib"]))


def test_nan_activation_is_reported_with_its_layer(windows, tmp_path: Path) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[4] = float("inf")
    with pytest.raises(ToolkitError, match=r"model\.layers\.1\.mlp\.gate_proj.*NaN or Inf"):
        awq.apply(model, awq.AWQConfig(), tiny_ctx(tmp_path, windows["calib"]))


def test_group_size_not_dividing_is_refused(windows, tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="valid choices"):
        gptq.apply(tiny_llama(), gptq.GPTQConfig(group_size=64), tiny_ctx(tmp_path, windows["calib"]))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("config", [gptq.GPTQConfig(bits=3, group_size=-1, skip=("*.down_proj",)),
                                    awq.AWQConfig(group_size=64, quantize=False), export_hf_gptq.ExportHFGPTQConfig("gptq_v2")])
def test_config_round_trip(config: object) -> None:
    assert type(config)(**dataclasses.asdict(config)) == config  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda: gptq.GPTQConfig(bits=5), lambda: gptq.GPTQConfig(damp=0), lambda: gptq.GPTQConfig(damp=2.0),
    lambda: gptq.GPTQConfig(block_size=0), lambda: gptq.GPTQConfig(group_size=7), lambda: gptq.GPTQConfig(lm_head_bits=3),
    lambda: gptq.GPTQConfig(lm_head_method="awq"), lambda: gptq.GPTQConfig(lm_head_bits=None, lm_head_method="gptq"),
    lambda: awq.AWQConfig(grid=0), lambda: awq.AWQConfig(bits=1), lambda: export_hf_gptq.ExportHFGPTQConfig("awq"),
])
def test_invalid_config_values_are_refused(make) -> None:
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- HF GPTQ checkpoint


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_int32_round_trip_is_bit_exact(bits: int, checkpoint_format: str, symmetric: bool) -> None:
    spec = QuantSpec(bits, 16, symmetric)
    codes, scales, zeros = rtn_quantize(torch.randn(32, 64), spec)
    if checkpoint_format == "gptq":
        zeros = zeros.clamp(min=1)  # v1 cannot store a zero point of 0 (tested below)
    fmt = hf_gptq.LAYOUTS[checkpoint_format]
    packed = fmt.pack(codes, scales, zeros, spec)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (64 * bits // 32, 32)
    assert packed["qzeros"].shape == (4, 32 * bits // 32) and packed["scales"].shape == (4, 32)
    assert torch.equal(packed["g_idx"], torch.arange(64, dtype=torch.int32) // 16)
    back = fmt.unpack(packed, spec, (32, 64))
    assert torch.equal(back[0], codes) and torch.equal(back[1], scales.half()) and torch.equal(back[2], zeros)
    assert torch.equal(fmt.dequantize(packed, bits), dequantize(codes, scales.half().float(), zeros, 16))


def test_gptq_v1_symmetric_int4_zeros_are_stored_minus_one() -> None:
    spec = QuantSpec(4, 16, True)
    codes, scales, zeros = rtn_quantize(torch.randn(8, 16), spec)
    assert int(GPTQInt32.pack(codes, scales, zeros, spec)["qzeros"][0, 0]) == 0x77777777
    with pytest.raises(ValueError, match="gptq_v2"):
        GPTQInt32.pack(codes, scales, torch.zeros_like(zeros), spec)


def test_export_hf_gptq_checkpoint(windows, tmp_path: Path) -> None:
    model = gptq.apply(tiny_llama(), gptq.GPTQConfig(), tiny_ctx(tmp_path, windows["calib"]))
    folder = tmp_path / "export"
    metrics = export_hf_gptq.export(model, tiny_tokenizer(), export_hf_gptq.ExportHFGPTQConfig(), folder)
    assert metrics["relative_logit_error"] < 2e-2 and metrics["quantized_linears"] == 14
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                  "checkpoint_format": "gptq"}
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    assert isinstance(layer, QuantLinear)
    codes, scales, zeros = GPTQInt32.unpack({k: state[f"{name}.{k}"] for k in hf_gptq.SUFFIXES}, layer.spec,
                                           (layer.out_features, layer.in_features))
    assert torch.equal(codes, layer.codes()) and torch.equal(scales, layer.scales) and torch.equal(zeros, layer.qzeros)
    assert "lm_head.weight" not in state and state["model.embed_tokens.weight"].dtype == torch.float16


def test_export_refuses_a_float_model(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="every decoder linear quantized"):
        export_hf_gptq.export(tiny_llama(), tiny_tokenizer(), export_hf_gptq.ExportHFGPTQConfig(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_gptq_and_awq_beat_rtn_on_smollm2(tmp_path: Path) -> None:
    """Small calibration (16 x 256) and evaluation (4 x 512) so the test stays around two minutes."""
    from toolkit.data import WindowSpec, token_windows
    from toolkit.evaluation.perplexity import evaluate
    from toolkit.models import load

    torch.set_num_threads(2)
    lm = load("smollm2")
    evaluation = token_windows(lm.tokenizer, WindowSpec(count=4))
    calib = token_windows(lm.tokenizer, WindowSpec(split="calibration", count=16, length=256, sampling="random"))
    ctx = PassContext(lm.tokenizer, lambda: calib, lambda: load("smollm2").model, tmp_path)
    ppl = {}
    for name, (run, config) in {
        "rtn": (rtn.apply, rtn.RTNConfig()),
        "gptq": (gptq.apply, gptq.GPTQConfig()),
        "awq": (awq.apply, awq.AWQConfig()),
    }.items():
        ppl[name] = evaluate(run(load("smollm2").model, config, ctx), evaluation)["perplexity"]
    assert ppl["gptq"] < ppl["rtn"] and ppl["awq"] < ppl["rtn"], ppl


def test_input_moments_match_direct_statistics():
    from toolkit.quant.moments import InputMoments

    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 7), torch.randn(3, 7)]
    moments = InputMoments(7, track_abs=True)
    for x in xs:
        moments.add(x)
    flat = torch.cat([x.reshape(-1, 7) for x in xs])
    assert moments.count == 13
    torch.testing.assert_close(moments.hessian(), 2 * flat.t() @ flat / 13)
    torch.testing.assert_close(moments.abs_mean(), flat.abs().mean(0))
    with pytest.raises(ValueError, match="track_abs"):
        InputMoments(7).abs_mean()
