"""Export an FP8 model as NVIDIA ModelOpt's unified Hugging Face checkpoint (TensorRT-LLM, vLLM ``modelopt``,
``toolkit.interop.modelopt``): ``quant_algo: FP8_PER_CHANNEL_PER_TOKEN`` from a model whose linears hold fp8 e4m3
per-channel weights with fp8 per-token dynamic inputs, ``quant_algo: FP8`` from one with fp8 per-tensor weights and
fp8 static per-tensor inputs (``rtn`` with ``type: float`` and such ``strategy`` / ``input_activations``). The head
and every float linear are written at ``dtype`` and listed in ``exclude_modules``.

The export proves itself: read back by ``toolkit.interop.modelopt.read``, its fp8 codes and scales must equal the
model's bit for bit, and a plain float model dequantized from it, its fp8 linears' inputs quantized as the algorithm
says (per token, or with the stored input scale), must give the model's logits (its float tensors as stored) on two
shapes. Scales of linears a consumer fuses (q/k/v, gate/up) must be equal, as ModelOpt writes them. A model with an
fp8 KV cache (the ``kv_cache`` pass) is written with ``kv_cache_quant_algo: FP8`` and its ``k_scale`` / ``v_scale``,
read back equal to the model's, and the float reload computes with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.evaluation.perplexity import check_reloaded
from toolkit.interop import modelopt
from toolkit.interop.hf_tensors import checkpoint_tensors
from toolkit.models.architectures import layout_of
from toolkit.models.checkpoint import config_dict, float_model
from toolkit.models.shards import SINGLE
from toolkit.passes.base import CheckpointExportConfig, PassConfig
from toolkit.quant import kv_cache
from toolkit.quant.modules import (
    FP8Linear,
    input_quantizer,
    quantized_linears,
    stored_floats,
)
from toolkit.quant.spec import ActivationSpec, KVCacheSpec, QuantScheme, QuantSpec
from toolkit.quant.surgery import check_fused_scales

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCHEMES = {  # quant_algo -> the one scheme it holds
    modelopt.PER_CHANNEL: QuantScheme(QuantSpec(8, -1, type="float"), ActivationSpec("float", 8, "token", dynamic=True)),
    modelopt.PER_TENSOR: QuantScheme(QuantSpec(8, -1, type="float", strategy="tensor"),
                                     ActivationSpec("float", 8, "tensor", dynamic=False)),
}


@dataclass(frozen=True)
class ExportModelOptConfig(CheckpointExportConfig):
    name: ClassVar[str] = "export_modelopt"
    reads_calibration: ClassVar[bool] = False
    holds_kv_cache: ClassVar[bool] = True

    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"  # float tensors; fp8 scales are float32


def algo_of(scheme: QuantScheme) -> str:
    """The ModelOpt algorithm holding ``scheme``; refused otherwise when the recipe is read (and again on the model)."""
    for algo, held in SCHEMES.items():
        if scheme == held:
            return algo
    raise ToolkitError(f"{ExportModelOptConfig.name} writes ModelOpt {modelopt.PER_CHANNEL} (fp8 per-channel weights, "
                       f"fp8 per-token dynamic inputs) or {modelopt.PER_TENSOR} (fp8 per-tensor weights, fp8 static "
                       f"per-tensor inputs), not this {scheme.name} scheme: quantize with rtn type: float, "
                       "group_size: -1 and input_activations {type: float, strategy: token, dynamic: true}, or "
                       "strategy: tensor and input_activations {type: float, strategy: tensor, dynamic: false}")


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    algo_of(scheme)


def _linears(model: PreTrainedModel) -> tuple[str, dict[str, FP8Linear], list[str]]:
    head = layout_of(model).head
    quantized = {n: m for n, m in quantized_linears(model).items() if n != head}
    if not quantized:
        raise ToolkitError("export_modelopt needs an fp8 model; run rtn with type: float before it")
    algos = {algo_of(m.scheme) for m in quantized.values()}
    if len(algos) > 1:
        raise ToolkitError(f"export_modelopt writes one quant_algo; this model mixes {' and '.join(sorted(algos))}: "
                           "quantize every linear with one scheme")
    check_fused_scales(model, quantized, ExportModelOptConfig.name)
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    return algos.pop(), {n: m for n, m in quantized.items() if isinstance(m, FP8Linear)}, floats


def _kv_projections(model: PreTrainedModel) -> dict[str, tuple[str, str]]:
    """Each attention module's key and value projections (full names; a fused qkv_proj for both)."""
    arch = layout_of(model)
    k, v = (arch.k, arch.v) if arch.k and arch.v else (arch.qkv, arch.qkv)
    return {f"{arch.layers}.{i}.{arch.attention}": (f"{arch.layers}.{i}.{k}", f"{arch.layers}.{i}.{v}")
            for i in range(len(kv_cache.attention_modules(model)))}


def _tensors(model: PreTrainedModel, algo: str, linears: dict[str, FP8Linear],
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = checkpoint_tensors(model, linears, dtype, lambda name, m: modelopt.linear_tensors(
        name, algo, m.weight, m.weight_scale, getattr(m, "input_scale", None)))
    if kv_cache.spec_of(model) is None:
        return tensors
    return {**tensors, **modelopt.kv_tensors(_kv_projections(model), kv_cache.scales(model))}


def _reload_float(folder: Path) -> tuple[PreTrainedModel, dict[str, modelopt.FP8Weight]]:
    """A plain float32 model dequantized from the folder, its fp8 linears' inputs quantized as its algorithm says."""
    config, algo, linears, floats = modelopt.read(folder)
    state = {k: v.float() for k, v in floats.items()}
    state.update({f"{name}.weight": w.dequantize() for name, w in linears.items()})
    model = float_model(config, state)
    cache = modelopt.read_kv_cache(folder)
    if cache is not None:
        kv_cache.load(model, KVCacheSpec(), cache, f"{folder}")
    act = SCHEMES[algo].input_activations
    assert act is not None  # both algorithms quantize their inputs
    for name, w in linears.items():
        scale = None if w.input_scale is None else w.input_scale.reshape(1)
        model.get_submodule(name).register_forward_pre_hook(input_quantizer(act, scale))
    return model, linears


def _check_codes(linears: dict[str, FP8Linear], read: dict[str, modelopt.FP8Weight]) -> None:
    if set(read) != set(linears):
        raise ToolkitError(f"the export holds fp8 weights for {len(read)} linears, the model has {len(linears)}")
    for name, m in linears.items():
        w, ours = read[name], getattr(m, "input_scale", None)
        theirs = None if w.input_scale is None else w.input_scale.reshape(1)
        inputs = theirs is None if ours is None else theirs is not None and torch.equal(theirs, ours)
        if not (torch.equal(w.weight.view(torch.uint8), m.weight.view(torch.uint8))
                and torch.equal(w.scale.reshape(-1), m.weight_scale.reshape(-1)) and inputs):
            raise ToolkitError(f"{name}: the exported fp8 weights or scales differ from the model's; "
                               "this is a bug in the exporter, please report it")


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ExportModelOptConfig,
           folder: Path, *, history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write the checkpoint into ``folder`` (made atomic by the caller), validate it, return its metrics."""
    folder = Path(folder)
    algo, linears, floats = _linears(model)
    exclude = [layout_of(model).head, *floats]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model, algo, linears, DTYPES[config.dtype]), str(folder / SINGLE), metadata={"format": "pt"})
    d = config_dict(model)
    d["dtype"] = config.dtype
    fp8_kv = kv_cache.spec_of(model) is not None
    d["quantization_config"] = modelopt.quantization_config(algo, exclude, fp8_kv)
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    (folder / modelopt.HF_QUANT_CONFIG).write_text(json.dumps(modelopt.hf_quant_config(algo, exclude, fp8_kv), indent=2))
    tokenizer.save_pretrained(folder)
    exported, read = _reload_float(folder)
    _check_codes(linears, read)
    kv_cache.check_same(model, exported)
    exported.set_attn_implementation(model.config._attn_implementation)  # last-bit differences flip fp8 codes
    reference = stored_floats(model, DTYPES[config.dtype])
    error = check_reloaded(reference, exported, config.tolerance, "ModelOpt checkpoint")
    return {"relative_logit_error": error, "bytes": (folder / SINGLE).stat().st_size,
            "quantized_linears": len(linears), "bit_exact_codes": True, "quant_algo": algo,
            "kv_cache_quant_algo": modelopt.KV_FP8 if fp8_kv else None}
