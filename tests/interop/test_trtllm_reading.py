"""What TensorRT-LLM's PyTorch backend reads from our FP8 exports, pinned from its source (no install here).

Read in the stored public index of github.com/NVIDIA/TensorRT-LLM, one file version each (commit after the path):

- MO: tensorrt_llm/quantization/modelopt_config.py @ 2edf354d4b92161efd50b10b71e8e20fb6c5925a: hf_quant_config.json
  with a ``quantization`` wrapper is the legacy shape, whatever the producer; its ``quant_algo``,
  ``kv_cache_quant_algo``, ``group_size``, ``exclude_modules`` are read. config.json's ``quantization_config`` with
  ``quant_method`` starting ``modelopt`` is the flat shape (``ignore`` -> exclude, ``kv_cache_scheme`` float / 8 bits
  -> FP8); the file wins and a divergence in algo, kv algo, group size or the exclude set is logged as a warning.
- MC: tensorrt_llm/_torch/model_config.py @ 008e0af8980fc560003631ba4ac37828836a91c8: ``QuantAlgo(quant_algo)`` and
  ``QuantAlgo(kv_cache_quant_algo)``; a compressed-tensors ``quantization_config`` goes to QC.
- QC: tensorrt_llm/models/quant_config_utils.py @ 21156a7a57acd21e17feb5c2721c30f035e0f2af: one config group with
  8-bit weights, ``strategy: channel`` and ``input_activations.strategy: token`` is FP8_PER_CHANNEL_PER_TOKEN (the
  weight ``type`` is not looked at); ``strategy: tensor`` and 4-bit integer weights raise; ``kv_cache_scheme``
  float / 8 bits is an FP8 KV cache; ``ignore`` becomes exclude_modules (matched with fnmatch on module names).
- LN: tensorrt_llm/_torch/modules/linear.py @ 00bbf71e796406ea8593a77cbfb828356182db16: FP8 (``FP8QDQLinearMethod``)
  reads ``weight`` e4m3 ``[out, in]``, ``weight_scale`` and ``input_scale`` as ``t[...].reshape([])`` (one element),
  and fused q/k/v, gate/up take the largest scale; FP8_PER_CHANNEL_PER_TOKEN (``FP8RowwiseLinearMethod``) copies
  ``weight_scale`` (or ``weight_scale_inv``) into a ``[out]`` float32 parameter and quantizes inputs per token.
  ``k_scale`` / ``v_scale`` are read from the q/k/v shard dicts of the fused qkv_proj.
- WM: tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py @ 088aa36b002777f37d26241bcba56c86b132e5ee: qkv_proj
  is fed from ``q_proj``, ``k_proj``, ``v_proj`` (each the tensors under ``<layer>.self_attn.<proj>.``, prefix cut),
  so ``self_attn.k_proj.k_scale`` arrives as the k shard's ``k_scale``.
- PR: NVIDIA/TensorRT-LLM pull request #15415 (merged 2026-06-16; its text, the fixed linear.py was not among the
  stored versions): the config parser used to take the group named ``group_0`` only, and FP8RowwiseLinearMethod
  now flattens compressed-tensors' ``[out, 1]`` per-channel ``weight_scale`` (``reshape(-1)``) in the plain, fused
  q/k/v and fused gate/up paths; before it the copy into ``[out]`` failed (LN's version copies it as it is).
- AT: tensorrt_llm/_torch/modules/attention.py @ 00547a25ac61d28d1dabb2e47383a1af605ebb59: the qkv_proj's kv scales
  are handed to the attention kernel only for an NVFP4 KV cache; an FP8 cache runs at scale 1.0 (the backend's
  ``kv_cache_scaling_factor`` of ones): TensorRT-LLM loads our calibrated scales but does not use them for FP8.

Each test below mirrors one of those readings on a tiny Llama (SmolLM2 is a Llama), so renaming a tensor, a key or
an algorithm in our exporters fails here.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fp8_kv_model
from toolkit.models.architectures import layout_of
from toolkit.models.shards import SINGLE
from toolkit.models.tiny import tiny_tokenizer
from toolkit.passes import export_compressed_tensors, export_modelopt

# MC: tensorrt_llm/quantization/mode.py's QuantAlgo members our exports name, and its KV_CACHE_QUANT_ALGO_LIST
QUANT_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN"}
KV_ALGOS = {"FP8", "INT8", "NVFP4"}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # WM
def _modelopt(weights: str, tmp_path: Path, kv: bool) -> tuple[Path, torch.nn.Module]:
    model = fp8_kv_model(tmp_path, weights=weights, kv=kv)
    export_modelopt.export(model, tiny_tokenizer(), export_modelopt.ExportModelOptConfig(), tmp_path / "mo")
    return tmp_path / "mo", model


def _shard(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """WM's filter: the tensors under ``prefix.``, named without it."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _flat(inline: dict) -> tuple[str | None, str | None, object, set[str]]:
    """MO's reading of config.json's flat ModelOpt config: (quant_algo, kv algo, group_size, exclude set)."""
    scheme = inline.get("kv_cache_scheme")
    kv = "FP8" if isinstance(scheme, dict) and (scheme.get("type"), scheme.get("num_bits")) == ("float", 8) else None
    return inline.get("quant_algo"), kv, inline.get("group_size"), set(inline.get("ignore") or [])


@pytest.mark.parametrize("config, algo", [("dynamic", "FP8_PER_CHANNEL_PER_TOKEN"), ("static", "FP8")])
def test_modelopt_configs_read_as_tensorrt_llm_reads_them(tmp_path: Path, config: str, algo: str) -> None:
    folder, model = _modelopt(config, tmp_path, kv=True)
    hf = json.loads((folder / "hf_quant_config.json").read_text())
    q = hf["quantization"]  # MO: the legacy shape, read whatever the producer's name
    assert q["quant_algo"] == algo and q["quant_algo"] in QUANT_ALGOS
    assert q["kv_cache_quant_algo"] == "FP8" and q["kv_cache_quant_algo"] in KV_ALGOS
    assert q.get("group_size") is None  # FP8 algorithms take none (only FP8_BLOCK_SCALES defaults one)
    head = layout_of(model).head
    assert any(fnmatch.fnmatchcase(head, p) for p in q["exclude_modules"])  # QuantConfig.is_module_excluded...
    assert not any(fnmatch.fnmatchcase(f"model.layers.0.self_attn.{p}", x)
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj") for x in q["exclude_modules"])
    inline = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert str(inline["quant_method"]).startswith("modelopt")
    # MO: no "diverges" warning: the inline config reads as the file does
    assert _flat(inline) == (q["quant_algo"], q["kv_cache_quant_algo"], q.get("group_size"), set(q["exclude_modules"]))


def test_per_channel_tensors_fit_the_rowwise_linear(tmp_path: Path) -> None:
    folder, model = _modelopt("dynamic", tmp_path, kv=False)
    state = load_file(str(folder / SINGLE))
    for fused, parts in FUSED.items():
        owner = "self_attn" if fused == "qkv_proj" else "mlp"
        for part in parts:
            shard = _shard(state, f"model.layers.0.{owner}.{part}")
            out = shard["weight"].shape[0]
            assert shard["weight"].dtype == torch.float8_e4m3fn and shard["weight"].dim() == 2
            parameter = torch.empty(out, dtype=torch.float32)  # LN: FP8RowwiseLinearMethod's weight_scale
            parameter.copy_(shard["weight_scale"])  # a [out, 1] scale would not broadcast into it
            assert "input_scale" not in shard  # inputs quantized per token at run time
    o_proj = _shard(state, "model.layers.0.self_attn.o_proj")
    assert o_proj["weight_scale"].shape == (o_proj["weight"].shape[0],)
    with pytest.raises(RuntimeError):
        torch.empty(4).copy_(torch.ones(4, 1))  # the broadcast rule the line above relies on


def test_per_tensor_tensors_fit_the_qdq_linear_and_fused_scales_agree(tmp_path: Path) -> None:
    folder, _ = _modelopt("static", tmp_path, kv=False)
    state = load_file(str(folder / SINGLE))
    for fused, parts in FUSED.items():
        owner = "self_attn" if fused == "qkv_proj" else "mlp"
        shards = [_shard(state, f"model.layers.1.{owner}.{p}") for p in parts]
        for shard in shards:  # LN: t[...].reshape([]) for both scales
            assert shard["weight_scale"].numel() == 1 and shard["input_scale"].numel() == 1
            assert shard["weight_scale"].dtype == shard["input_scale"].dtype == torch.float32
        # LN takes the largest weight and input scale of a fused group and requantizes to it: equal ones lose nothing
        assert len({float(s["weight_scale"]) for s in shards}) == 1
        assert len({float(s["input_scale"]) for s in shards}) == 1


def test_modelopt_kv_scales_reach_the_fused_qkv_proj(tmp_path: Path) -> None:
    folder, model = _modelopt("dynamic", tmp_path, kv=True)
    state = load_file(str(folder / SINGLE))
    for i in range(model.config.num_hidden_layers):
        q, k, v = (_shard(state, f"model.layers.{i}.self_attn.{p}") for p in FUSED["qkv_proj"])
        assert "k_scale" in k and "v_scale" in v and not {"k_scale", "v_scale"} & set(q)  # WM -> LN's shard dicts
        assert k["k_scale"].numel() == 1 and v["v_scale"].numel() == 1  # LN: reshape([])
        attention = model.model.layers[i].self_attn
        assert torch.equal(k["k_scale"].reshape(1), attention.k_scale)
        assert torch.equal(v["v_scale"].reshape(1), attention.v_scale)
    assert not any(name.endswith(("self_attn.k_scale", "self_attn.v_scale")) for name in state)


def test_compressed_tensors_fp8_dynamic_config_reads_as_per_channel_per_token(tmp_path: Path) -> None:
    model = fp8_kv_model(tmp_path)
    export_compressed_tensors.export(model, tiny_tokenizer(), export_compressed_tensors.ExportCompressedTensorsConfig(),
                                     tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"  # MC routes it to QC
    (group,) = qc["config_groups"].values()  # QC: one group is one global quant_algo
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["strategy"] == "token"  # -> FP8_PER_CHANNEL_PER_TOKEN
    assert (qc["kv_cache_scheme"]["num_bits"], qc["kv_cache_scheme"]["type"]) == (8, "float")  # -> FP8 KV cache
    assert any(fnmatch.fnmatchcase(layout_of(model).head, p) for p in qc["ignore"])


def test_compressed_tensors_per_channel_scales_load_once_flattened(tmp_path: Path) -> None:
    model = fp8_kv_model(tmp_path, kv=False)
    export_compressed_tensors.export(model, tiny_tokenizer(), export_compressed_tensors.ExportCompressedTensorsConfig(),
                                     tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert list(qc["config_groups"]) == ["group_0"]  # PR: the name the parser before #15415 looked up
    state = load_file(str(tmp_path / "ct" / SINGLE))
    for fused, parts in FUSED.items():
        owner = "self_attn" if fused == "qkv_proj" else "mlp"
        shards = [_shard(state, f"model.layers.0.{owner}.{part}") for part in parts]
        assert all(s["weight_scale"].shape == (s["weight"].shape[0], 1) for s in shards)  # compressed-tensors' channel
        parameter = torch.empty(sum(s["weight"].shape[0] for s in shards), dtype=torch.float32)  # LN: [out]
        with pytest.raises(RuntimeError):  # LN as stored: the [out, 1] scales copied as they are
            parameter.copy_(torch.cat([s["weight_scale"] for s in shards]))
        parameter.copy_(torch.cat([s["weight_scale"].reshape(-1) for s in shards]))  # PR: flattened first
        assert torch.equal(parameter, torch.cat([s["weight_scale"].float().flatten() for s in shards]))
