"""compressed-tensors export of W8A8 int8 (``int-quantized``) and FP8 (``float-quantized``): the config groups vLLM
and TensorRT-LLM read (compressed-tensors' own presets, field for field), the tensors their schemes load
(``weight`` int8 / fp8, ``weight_scale`` [out, 1], ``input_scale`` [1]), bit-exact codes and scales, every family,
and transformers with compressed-tensors' decompressor computing the quantized model's logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.errors import ToolkitError
from toolkit.models.shards import SINGLE
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import rtn
from toolkit.passes.context import PassContext
from toolkit.passes.export_compressed_tensors import (
    ExportCompressedTensorsConfig,
    check_spec,
    export,
)
from toolkit.paths import atomic_dir
from toolkit.quant.modules import quantized_linears, stored_floats
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

requires_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                 reason="compressed-tensors is not installed (pip install compressed-tensors)")
CALIB = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
INT8 = dict(bits=8, group_size=-1)
FP8 = dict(bits=8, group_size=-1, type="float")
SCHEMES = {  # name -> (rtn settings, compressed-tensors preset, format)
    "W8A8": ({**INT8, "input_activations": ActivationSpec("int", 8, "token", dynamic=True)}, "W8A8", "int-quantized"),
    "W8A8-static": ({**INT8, "input_activations": ActivationSpec("int", 8, "tensor", dynamic=False)}, None,
                    "int-quantized"),
    "FP8_DYNAMIC": ({**FP8, "input_activations": ActivationSpec("float", 8, "token", dynamic=True)}, "FP8_DYNAMIC",
                    "float-quantized"),
    "FP8-static": ({**FP8, "input_activations": ActivationSpec("float", 8, "tensor", dynamic=False)}, None,
                   "float-quantized"),
    "FP8": ({**FP8, "strategy": "tensor", "input_activations": ActivationSpec("float", 8, "tensor", dynamic=False)},
            "FP8", "float-quantized"),  # per-tensor weights and inputs: compressed-tensors' FP8 preset
}


def quantized(family: str, name: str) -> torch.nn.Module:
    model = tiny_model(family)
    ctx = PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), Path("/nonexistent"))
    return rtn.apply(model, rtn.RTNConfig(**SCHEMES[name][0], lm_head_bits=None), ctx)  # type: ignore[arg-type]


def run_export(model: torch.nn.Module, folder: Path, dtype: str = "float16") -> dict:
    with atomic_dir(folder) as tmp:
        return export(model, tiny_tokenizer(), ExportCompressedTensorsConfig(dtype=dtype), tmp)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_the_tensors_are_what_vllms_w8a8_schemes_load(tmp_path: Path, name: str) -> None:
    model = quantized("llama", name)
    metrics = run_export(model, tmp_path / "out")
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5
    state = load_file(str(tmp_path / "out" / SINGLE))
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == SCHEMES[name][2] and qc["config_groups"]["group_0"]["format"] == SCHEMES[name][2]
    assert qc["ignore"] == ["lm_head"]
    static = "static" in name
    for module_name, m in quantized_linears(model).items():
        w = state[f"{module_name}.weight"]
        assert w.dtype == (torch.float8_e4m3fn if "FP8" in name else torch.int8) and w.shape == (m.out_features,
                                                                                                 m.in_features)
        assert state[f"{module_name}.weight_scale"].shape == ((1,) if name == "FP8" else (m.out_features, 1))
        assert state[f"{module_name}.weight_scale"].dtype == torch.float32
        assert (f"{module_name}.input_scale" in state) == (static or name == "FP8")
        if static or name == "FP8":
            assert state[f"{module_name}.input_scale"].shape == (1,)
    if name == "FP8":  # vLLM fuses q/k/v and gate/up: one weight scale and one input scale each
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for key in ("weight_scale", "input_scale"):
                assert len({float(state[f"model.layers.1.{n}.{key}"]) for n in group}) == 1, (group, key)
    if "W8A8" in name:  # symmetric int8: codes in [-127, 127], the full range used per row
        w = state["model.layers.0.mlp.down_proj.weight"]
        assert int(w.abs().max()) == 127 and bool((w.abs().amax(1) == 127).all())


@requires_ct
@pytest.mark.parametrize("name", [n for n in SCHEMES if SCHEMES[n][1]])
def test_the_config_group_is_compressed_tensors_preset(tmp_path: Path, name: str) -> None:
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    run_export(quantized("llama", name), tmp_path / "out")
    group = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    ours = QuantizationScheme.model_validate(group)
    theirs = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[SCHEMES[name][1]])  # type: ignore[arg-type]
    loader_keys = {"observer", "observer_kwargs"}  # how a quantizer calibrates: no loader reads them
    for part in ("weights", "input_activations"):
        a, b = getattr(ours, part), getattr(theirs, part)
        assert a.model_dump(exclude=loader_keys) == b.model_dump(exclude=loader_keys), part


@requires_ct
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_transformers_decompresses_codes_and_scales_exactly_and_computes_the_logits(tmp_path: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    model = quantized("llama", name)
    run_export(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for module_name, m in quantized_linears(model).items():  # the decompressor's weight is ours, bit for bit
        got = hf.get_submodule(module_name)
        if got.weight.element_size() == 1:  # left compressed (run_compressed): codes and scales as stored
            codes = m.weight.view(torch.uint8) if "FP8" in name else (m.codes().to(torch.int16) - 128).to(torch.int8)
            assert torch.equal(got.weight.data.view(codes.dtype), codes), module_name
            scales = m.weight_scale if "FP8" in name else m.scales
            assert torch.equal(got.weight_scale.data.float().reshape(-1), scales.float().reshape(-1)), module_name
        else:
            assert torch.equal(got.weight.data, m.dequantized_weight().float()), module_name
    with torch.no_grad():
        ref, got = stored_floats(model, torch.float16)(IDS).logits, hf(IDS).logits
    error = float((ref - got).abs().max() / ref.abs().max())
    # compressed-tensors' own dynamic int8 scale is absmax / 127.5 (vLLM's kernel, and ours: absmax / 127), so
    # a few activation codes differ there; static scales and fp8 compute the same numbers
    assert error <= (5e-2 if name == "W8A8" else 1e-5), error


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_w8a8_and_fp8(tmp_path: Path, family: str) -> None:
    for name in ("W8A8-static", "FP8_DYNAMIC", "FP8"):
        metrics = run_export(quantized(family, name), tmp_path / name)
        assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5, (family, name)


def test_schemes_vllm_does_not_load_this_way_are_refused() -> None:
    w4a8 = QuantScheme(QuantSpec(4, 32), ActivationSpec("int", 8, "token", dynamic=True))
    with pytest.raises(ToolkitError, match="^export_compressed_tensors writes quantized activations with 8-bit "
                       "per-channel symmetric weights .* not this W4A8 scheme"):
        check_spec(w4a8)
    check_spec(QuantScheme(QuantSpec(8, -1), ActivationSpec("int", 8, "token", dynamic=True)))  # W8A8 passes


def test_unequal_per_tensor_weight_scales_across_fused_linears_are_refused(tmp_path: Path) -> None:
    model = quantized("llama", "FP8")
    model.model.layers[0].mlp.up_proj.weight_scale.mul_(2)
    with pytest.raises(ToolkitError, match=r"^layer 0: the per-tensor weight scales of mlp.gate_proj, mlp.up_proj "
                       "differ .*quantize them with one shared scale"):
        run_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_per_tensor_scale_of_the_wrong_shape_is_refused_by_the_reader(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from toolkit.interop import compressed_tensors as ct

    run_export(quantized("llama", "FP8"), tmp_path / "out")
    path = tmp_path / "out" / SINGLE
    state = load_file(str(path))
    key = "model.layers.0.self_attn.o_proj.weight_scale"
    state[key] = state[key].expand(96, 1).contiguous()  # a per-channel scale under a tensor-strategy group
    save_file(state, str(path))
    with pytest.raises(ToolkitError, match=r"o_proj: inconsistent checkpoint: weight_scale is \[96, 1\], a \[96, 96\] "
                       r"weight of strategy tensor needs \[1\]"):
        ct.read(tmp_path / "out")


def test_unequal_static_scales_across_fused_inputs_are_refused(tmp_path: Path) -> None:
    model = quantized("llama", "W8A8-static")
    model.model.layers[1].self_attn.k_proj.input_scale.mul_(2)
    with pytest.raises(ToolkitError, match=r"^layer 1: the static input scales of self_attn.q_proj, self_attn.k_proj, "
                       "self_attn.v_proj differ"):
        run_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
