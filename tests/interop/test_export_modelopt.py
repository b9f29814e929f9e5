"""ModelOpt unified HF checkpoint, FP8_PER_CHANNEL_PER_TOKEN: the two config files vLLM's modelopt loader and
TensorRT-LLM read, the tensors they load (fp8 weight, float32 weight_scale [out], no input_scale), bit-exact codes,
every family, and refusals of what it does not hold."""

from __future__ import annotations

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
from toolkit.passes.export_modelopt import ExportModelOptConfig, check_spec, export
from toolkit.paths import atomic_dir
from toolkit.quant.modules import FP8Linear, quantized_linears
from toolkit.quant.spec import ActivationSpec

FP8_DYNAMIC = rtn.RTNConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                            input_activations=ActivationSpec("float", 8, "token", dynamic=True))


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


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports(tmp_path: Path, family: str) -> None:
    metrics = run_export(rtn.apply(tiny_model(family), FP8_DYNAMIC), tmp_path / "out")
    assert metrics["bit_exact_codes"] and metrics["relative_logit_error"] <= 1e-5, family


def test_other_schemes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    w8a8 = rtn.apply(tiny_model("llama"), rtn.RTNConfig(bits=8, group_size=-1, lm_head_bits=None,
                                                        input_activations=ActivationSpec()))
    with pytest.raises(ToolkitError, match="^export_modelopt writes ModelOpt FP8_PER_CHANNEL_PER_TOKEN .* not this "
                       "W8A8 scheme"):
        run_export(w8a8, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    static = rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=ActivationSpec(
        "float", 8, "tensor", dynamic=False))
    with pytest.raises(ToolkitError, match="not this WFP8AFP8 scheme"):
        check_spec(static.scheme)


def test_a_folder_whose_configs_disagree_is_refused(tmp_path: Path) -> None:
    run_export(rtn.apply(tiny_model("llama"), FP8_DYNAMIC), tmp_path / "out")
    path = tmp_path / "out" / "hf_quant_config.json"
    hf = json.loads(path.read_text())
    hf["quantization"]["quant_algo"] = "NVFP4"
    path.write_text(json.dumps(hf))
    with pytest.raises(ToolkitError, match="quant_algo 'FP8_PER_CHANNEL_PER_TOKEN' \\(config.json\\) / 'NVFP4'"):
        modelopt.read(tmp_path / "out")
