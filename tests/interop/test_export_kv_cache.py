"""The fp8 KV cache in the compressed-tensors and ModelOpt exports: the names and shapes vLLM's loaders read, the
scales read back equal to the model's, and the self-check computing with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import fp8_kv_model
from toolkit.errors import ToolkitError
from toolkit.interop import compressed_tensors as ct
from toolkit.interop import modelopt
from toolkit.models.architectures import layout_of
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import export_compressed_tensors, export_modelopt, rtn
from toolkit.quant import kv_cache
from toolkit.quant.spec import ActivationSpec


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_writes_the_kv_cache_scheme_and_scales(tmp_path, family):
    model = fp8_kv_model(tmp_path, family)
    metrics = export_compressed_tensors.export(model, tiny_tokenizer(), export_compressed_tensors.ExportCompressedTensorsConfig(),
                                               tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {k: qc["kv_cache_scheme"][k] for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")} == {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    arch = layout_of(model)
    for i, (k, v) in enumerate(kv_cache.scales(model).values()):
        stored = state[f"{arch.layers}.{i}.self_attn.k_scale"], state[f"{arch.layers}.{i}.self_attn.v_scale"]
        assert all(s.dtype == torch.float32 and s.shape == (1,) for s in stored)
        assert torch.equal(stored[0], k) and torch.equal(stored[1], v)
    assert metrics["kv_cache"] and metrics["relative_logit_error"] < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_modelopt_writes_kv_cache_quant_algo_and_projection_scales(tmp_path, family):
    model = fp8_kv_model(tmp_path, family)
    metrics = export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp_path / "out")
    hf = json.loads((tmp_path / "out" / modelopt.HF_QUANT_CONFIG).read_text())["quantization"]
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert hf["kv_cache_quant_algo"] == "FP8" and qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float",
                                                                          "dynamic": False}
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    arch = layout_of(model)
    k_proj, v_proj = (arch.k, arch.v) if arch.k else (arch.qkv, arch.qkv)  # Phi-3: the fused qkv_proj holds both
    for i, (k, v) in enumerate(kv_cache.scales(model).values()):
        stored = state[f"{arch.layers}.{i}.{k_proj}.k_scale"], state[f"{arch.layers}.{i}.{v_proj}.v_scale"]
        assert all(s.dtype == torch.float32 and s.shape == () for s in stored)
        assert torch.equal(stored[0].reshape(1), k) and torch.equal(stored[1].reshape(1), v)
    assert metrics["kv_cache_quant_algo"] == "FP8" and metrics["relative_logit_error"] < 1e-3


def test_exports_without_a_kv_cache_write_none(tmp_path):
    model = tiny_model("llama").eval()
    rtn.apply(model, rtn.RTNConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                                   input_activations=ActivationSpec("float", 8, "token", True)))
    export_compressed_tensors.export(model, tiny_tokenizer(), export_compressed_tensors.ExportCompressedTensorsConfig(),
                                     tmp_path / "ct")
    export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp_path / "mo")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] is None
    assert ct.read_kv_cache(tmp_path / "ct") is None and modelopt.read_kv_cache(tmp_path / "mo") is None


def _drop(folder: Path, suffix: str) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    first = next(k for k in state if k.endswith(suffix))
    del state[first]
    save_file(state, str(path))


def test_readers_refuse_a_kv_cache_missing_a_scale(tmp_path):
    model = fp8_kv_model(tmp_path)
    export_compressed_tensors.export(model, tiny_tokenizer(), export_compressed_tensors.ExportCompressedTensorsConfig(),
                                     tmp_path / "ct")
    export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp_path / "mo")
    _drop(tmp_path / "ct", ".v_scale")
    _drop(tmp_path / "mo", ".v_scale")
    with pytest.raises(ToolkitError, match="k_scale and v_scale must both be float32"):
        ct.read_kv_cache(tmp_path / "ct")
    with pytest.raises(ToolkitError, match="needs a k_scale and a v_scale per attention layer"):
        modelopt.read_kv_cache(tmp_path / "mo")


def test_the_self_check_fails_when_the_export_loses_the_rounding(tmp_path, monkeypatch):
    """The float reload must compute with the exported cache: without it the check sees the cache's rounding error."""
    model = fp8_kv_model(tmp_path)
    with torch.no_grad():  # scales 8x too coarse: the rounding error the check must see is large
        for k, v in kv_cache.scales(model).values():
            k.mul_(8)
            v.mul_(8)
    monkeypatch.setattr(ct, "read_kv_cache", lambda folder: None)
    with pytest.raises(ToolkitError, match="KV cache"):
        export_compressed_tensors.export(model, tiny_tokenizer(),
                                         export_compressed_tensors.ExportCompressedTensorsConfig(), tmp_path / "out")


def test_the_scales_one_control_copy_sets_only_the_kv_scales(tmp_path):
    """benchmarks/kv_scales_one.py: every k_scale / v_scale at 1.0, every other tensor and file unchanged; a folder
    without KV scales is refused and leaves nothing."""
    from tests.conftest import load_benchmark

    control = load_benchmark("kv_scales_one")
    model = fp8_kv_model(tmp_path)
    export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp_path / "out")
    assert control.scales_one(tmp_path / "out", tmp_path / "ones") == 2 * model.config.num_hidden_layers
    before, after = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "ones" / "model.safetensors"))
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        if key.endswith(("k_scale", "v_scale")):
            assert after[key].dtype == tensor.dtype and torch.equal(after[key], torch.ones_like(tensor))
            assert not torch.equal(tensor, torch.ones_like(tensor))
        else:
            assert torch.equal(after[key], tensor), key
    assert (tmp_path / "ones" / "config.json").read_bytes() == (tmp_path / "out" / "config.json").read_bytes()
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"w": torch.zeros(2)}, str(plain / "model.safetensors"))
    with pytest.raises(SystemExit, match="no k_scale / v_scale"):
        control.scales_one(plain, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / ".nothing.tmp").exists()
