"""ModelOpt unified HF checkpoint, FP8_PER_CHANNEL_PER_TOKEN and FP8 (per tensor, static inputs): the two config
files vLLM's modelopt loader and TensorRT-LLM read, the tensors they load (fp8 weight, float32 weight_scale [out] and
no input_scale, or float32 scalar weight_scale and input_scale, equal across fused linears), bit-exact codes, every
family, and refusals of what it does not hold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.errors import ToolkitError
from toolkit.interop import modelopt
from toolkit.models.shards import SINGLE
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import rtn
from toolkit.passes.context import PassContext
from toolkit.passes.export_modelopt import ExportModelOptConfig, check_spec, export
from toolkit.paths import atomic_dir
from toolkit.quant.modules import FP8Linear, quantized_linears
from toolkit.quant.spec import ActivationSpec

FP8_DYNAMIC = rtn.RTNConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                            input_activations=ActivationSpec("float", 8, "token", dynamic=True))
FP8_STATIC = rtn.RTNConfig(bits=8, group_size=-1, type="float", strategy="tensor", lm_head_bits=None,
                           input_activations=ActivationSpec("float", 8, "tensor", dynamic=False))
CALIB = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def fp8_static(family: str) -> torch.nn.Module:
    ctx = PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), Path("/nonexistent"))
    return rtn.apply(tiny_model(family), FP8_STATIC, ctx)


def run_export(model: torch.nn.Module, folder: Path) -> dict:
    with atomic_dir(folder) as tmp:
        return export(model, tiny_tokenizer(), ExportModelOptConfig(), tmp)  # type: ignore[arg-type]


def test_the_checkpoint_is_what_the_modelopt_loaders_read(tmp_path: Path) -> None:
    model = rtn.apply(tiny_model("llama"), FP8_DYNAMIC)
    metrics = run_export(model, tmp_path / "out")
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5
    hf = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hf["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None,
                                  "exclude_modules": ["lm_head"]}
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert qc["ignore"] == ["lm_head"]
    state = load_file(str(tmp_path / "out" / SINGLE))
    for name, m in quantized_linears(model).items():
        assert isinstance(m, FP8Linear)
        assert state[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert state[f"{name}.weight_scale"].dtype == torch.float32
        assert state[f"{name}.weight_scale"].shape == (m.out_features,)
        assert f"{name}.input_scale" not in state
    assert not any(k.endswith("input_scale") for k in state)


def test_the_static_checkpoint_is_quant_algo_fp8_with_scalar_scales_as_modelopt_writes(tmp_path: Path) -> None:
    model = fp8_static("llama")
    metrics = run_export(model, tmp_path / "out")
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5 and metrics["quant_algo"] == "FP8"
    hf = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hf["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    state = load_file(str(tmp_path / "out" / SINGLE))
    for name, m in quantized_linears(model).items():
        assert state[f"{name}.weight"].dtype == torch.float8_e4m3fn
        for key, ours in (("weight_scale", m.weight_scale), ("input_scale", m.input_scale)):
            t = state[f"{name}.{key}"]  # ModelOpt's amax / 448: a float32 scalar
            assert t.dtype == torch.float32 and t.shape == () and float(t) == float(ours), (name, key)
    for i in range(2):  # one weight scale and one input scale per fused group, as ModelOpt's export equalizes them
        for group in FUSED:
            for key in ("weight_scale", "input_scale"):
                assert len({float(state[f"model.layers.{i}.{n}.{key}"]) for n in group}) == 1, (i, group, key)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports(tmp_path: Path, family: str) -> None:
    metrics = run_export(rtn.apply(tiny_model(family), FP8_DYNAMIC), tmp_path / "dynamic")
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5, family
    metrics = run_export(fp8_static(family), tmp_path / "static")
    assert metrics["quant_algo"] == "FP8" and metrics["relative_logit_error"] <= 1e-5, family


def test_unequal_scales_across_fused_linears_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = fp8_static("llama")
    model.model.layers[1].self_attn.v_proj.weight_scale.mul_(2)
    with pytest.raises(ToolkitError, match=r"^layer 1: the per-tensor weight scales of self_attn.q_proj, "
                       "self_attn.k_proj, self_attn.v_proj differ .*export_modelopt's consumers fuse"):
        run_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_skip_list_splitting_fused_linears_is_refused_and_a_whole_group_exports(tmp_path: Path) -> None:
    """Keeping k_proj alone float gives vLLM a fused qkv_proj with two schemes: refused. Keeping all of q/k/v float
    (and a down_proj) exports them at the checkpoint dtype (bfloat16), listed in exclude_modules."""
    split = rtn.apply(tiny_model("llama"), dataclasses.replace(FP8_DYNAMIC, skip=("model.layers.1.self_attn.k_proj",)))
    with pytest.raises(ToolkitError, match=r"^layer 1: self_attn.q_proj, self_attn.k_proj, self_attn.v_proj are "
                       "partly quantized, partly float .*skip all or none"):
        run_export(split, tmp_path / "split")
    assert not (tmp_path / "split").exists()
    skip = ("model.layers.1.self_attn.[qkv]_proj", "model.layers.0.mlp.down_proj")
    whole = rtn.apply(tiny_model("llama"), dataclasses.replace(FP8_DYNAMIC, skip=skip))
    assert run_export(whole, tmp_path / "whole")["relative_logit_error"] <= 1e-3
    excluded = json.loads((tmp_path / "whole" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    floats = {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
              "model.layers.0.mlp.down_proj"}
    assert floats <= set(excluded)
    tensors = load_file(tmp_path / "whole" / SINGLE)
    assert all(tensors[f"{n}.weight"].dtype == torch.bfloat16 and f"{n}.weight_scale" not in tensors for n in floats)


def test_a_skip_pattern_matching_nothing_is_refused() -> None:
    with pytest.raises(ToolkitError, match=r"skip pattern\(s\) \['model.layer.1.\*'\] match no linear"):
        rtn.apply(tiny_model("llama"), dataclasses.replace(FP8_DYNAMIC, skip=("model.layer.1.*",)))


def test_a_model_mixing_the_two_algorithms_is_refused(tmp_path: Path) -> None:
    model = fp8_static("llama")
    dynamic = rtn.apply(tiny_model("llama"), FP8_DYNAMIC)
    model.model.layers[0].mlp.down_proj = dynamic.model.layers[0].mlp.down_proj
    with pytest.raises(ToolkitError, match="^export_modelopt writes one quant_algo; this model mixes FP8 and "
                       "FP8_PER_CHANNEL_PER_TOKEN"):
        run_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_static_checkpoint_without_its_input_scales_is_refused_by_the_reader(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run_export(fp8_static("llama"), tmp_path / "out")
    path = tmp_path / "out" / SINGLE
    state = {k: v for k, v in load_file(str(path)).items() if k != "model.layers.0.mlp.down_proj.input_scale"}
    save_file(state, str(path))
    with pytest.raises(ToolkitError, match=r"down_proj: input_scale is missing, FP8 needs a scalar \[\]"):
        modelopt.read(tmp_path / "out")


def test_other_schemes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    w8a8 = rtn.apply(tiny_model("llama"), rtn.RTNConfig(bits=8, group_size=-1, lm_head_bits=None,
                                                        input_activations=ActivationSpec()))
    with pytest.raises(ToolkitError, match="^export_modelopt writes ModelOpt FP8_PER_CHANNEL_PER_TOKEN .* not this "
                       "W8A8 scheme"):
        run_export(w8a8, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    static = rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=ActivationSpec(
        "float", 8, "tensor", dynamic=False))  # per-channel weights with a static input scale: neither algorithm
    with pytest.raises(ToolkitError, match="not this WFP8AFP8 scheme"):
        check_spec(static.scheme)
    check_spec(FP8_STATIC.scheme)
    check_spec(FP8_DYNAMIC.scheme)


def test_a_folder_whose_configs_disagree_is_refused(tmp_path: Path) -> None:
    run_export(rtn.apply(tiny_model("llama"), FP8_DYNAMIC), tmp_path / "out")
    path = tmp_path / "out" / "hf_quant_config.json"
    hf = json.loads(path.read_text())
    hf["quantization"]["quant_algo"] = "NVFP4"
    path.write_text(json.dumps(hf))
    with pytest.raises(ToolkitError, match="quant_algo 'FP8_PER_CHANNEL_PER_TOKEN' \\(config.json\\) / 'NVFP4'"):
        modelopt.read(tmp_path / "out")
