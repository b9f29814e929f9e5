"""Export a quantized model as a compressed-tensors checkpoint (transformers, vLLM, SGLang, TensorRT-LLM):
``pack-quantized`` for integer weights with float activations, ``int-quantized`` for W8A8 int8 and
``float-quantized`` for FP8 (``toolkit.interop.compressed_tensors``).

compressed-tensors holds signed codes ``v = q - 2^(b-1)`` and zero points ``zero - 2^(b-1)`` and packs
``v + 2^(b-1)``, so our unsigned codes are written unchanged (``toolkit.interop.compressed_tensors``);
symmetric specs store no zero point (ours is always ``2^(b-1)``). Every decoder linear of one spec is one
config group; the head (int8 in our models, and a tied embedding) is written dequantized at ``dtype`` and
listed in ``ignore``, as llm-compressor leaves ``lm_head`` unquantized. The export proves itself: the folder
is read back by ``toolkit.interop.compressed_tensors.read`` (no compressed-tensors package needed), its
codes, scales and zero points must equal the model's bit for bit, and a plain float model dequantized from
it (its linears' inputs quantized as the folder's ``input_activations`` and ``input_scale`` say) must give the
source model's logits on two shapes. Static input scales and per-tensor fp8 weight scales of linears a consumer
fuses (q/k/v, gate/up) must be equal, since vLLM runs them as one matmul with one scale of each. A model with an fp8
KV cache (the ``kv_cache`` pass) is written with its ``kv_cache_scheme`` and ``k_scale`` / ``v_scale`` tensors, read
back equal to the model's, and the float reload computes with them.
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
from toolkit.interop import compressed_tensors as ct
from toolkit.interop.hf_tensors import checkpoint_tensors
from toolkit.models.architectures import layout_of
from toolkit.models.checkpoint import config_dict, float_model
from toolkit.models.shards import SINGLE
from toolkit.passes.base import CheckpointExportConfig, PassConfig
from toolkit.quant import kv_cache
from toolkit.quant.modules import (
    FP8Linear,
    QuantizedLinear,
    QuantLinear,
    input_quantizer,
    quantized_linears,
    stored_floats,
)
from toolkit.quant.spec import QuantScheme
from toolkit.quant.surgery import check_fused_scales

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExportCompressedTensorsConfig(CheckpointExportConfig):
    name: ClassVar[str] = "export_compressed_tensors"
    reads_calibration: ClassVar[bool] = False
    holds_kv_cache: ClassVar[bool] = True

    # float tensors and scales; float16 holds our scales exactly (bfloat16 would not)
    dtype: Literal["float16", "float32"] = "float16"


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    """Integer weights with float activations (``pack-quantized``), or 8-bit per-channel symmetric weights with
    quantized activations (W8A8 ``int-quantized``, FP8 ``float-quantized``): the layouts vLLM's compressed-tensors
    schemes load; refused otherwise when the recipe is read (and again on the model)."""
    w, a = scheme.weights, scheme.input_activations
    if a is None and w.type == "int":
        return
    if w.bits == 8 and w.group_size == -1 and w.symmetric:
        return
    raise ToolkitError(f"{ExportCompressedTensorsConfig.name} writes quantized activations with 8-bit per-channel "
                       f"symmetric weights (W8A8 int8, FP8), not this {scheme.name} scheme (bits {w.bits}, group_size "
                       f"{w.group_size}): use bits: 8, group_size: -1, symmetric: true, or drop input_activations")


def _linears(model: PreTrainedModel) -> tuple[dict[str, QuantizedLinear], list[str]]:
    head = layout_of(model).head
    linears = {n: m for n, m in quantized_linears(model).items() if n != head}
    if not linears:
        raise ToolkitError("export_compressed_tensors needs a quantized model; run rtn, gptq or awq before it")
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    for scheme in {m.scheme for m in linears.values()}:
        check_spec(scheme)
    for name, m in linears.items():
        if isinstance(m, QuantLinear) and m.spec.symmetric and bool((m.qzeros != 2 ** (m.spec.bits - 1)).any()):
            raise ToolkitError(f"{name}: symmetric codes must have zero point {2 ** (m.spec.bits - 1)} "
                               "(compressed-tensors stores none for symmetric weights)")
    return linears, floats


def _linear_tensors(name: str, m: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    input_scale = getattr(m, "input_scale", None)
    if isinstance(m, FP8Linear):
        return ct.dense_tensors(name, m.weight, m.weight_scale, input_scale, m.spec.per_tensor)
    if ct.format_of(m.scheme) == "int-quantized":  # signed int8 codes: ours minus the zero point 128
        return ct.dense_tensors(name, (m.codes().to(torch.int16) - 128).to(torch.int8), m.scales, input_scale)
    return ct.linear_tensors(name, m.codes(), m.scales.to(dtype), m.qzeros, m.spec)


def _tensors(model: PreTrainedModel, linears: dict[str, QuantizedLinear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = checkpoint_tensors(model, linears, dtype, lambda name, m: _linear_tensors(name, m, dtype))
    return {**tensors, **ct.kv_tensors(kv_cache.scales(model))} if kv_cache.spec_of(model) else tensors


def _config(model: PreTrainedModel, linears: dict[str, QuantizedLinear], floats: list[str],
            dtype: str) -> dict[str, Any]:
    groups: dict[QuantScheme, list[str]] = {}
    for name, m in linears.items():
        groups.setdefault(m.scheme, []).append(name)
    d = config_dict(model)
    d["dtype"] = dtype
    d["quantization_config"] = ct.quantization_config(groups, [layout_of(model).head, *floats], kv_cache.spec_of(model))
    return d


def _reload_float(folder: Path) -> tuple[PreTrainedModel, dict[str, ct.Packed | ct.Dense]]:
    """A plain float32 model dequantized from the written folder (independent of ``QuantLinear``); the inputs of
    its 8-bit linears are quantized as the folder's config groups and input scales say."""
    config, packed, floats = ct.read(folder)
    state = {k: v.float() for k, v in floats.items()}
    state.update({f"{name}.weight": p.dequantize() for name, p in packed.items()})
    model = float_model(config, state)
    cache = ct.read_kv_cache(folder)
    if cache is not None:
        kv_cache.load(model, *cache, f"{folder}")
    for name, p in packed.items():
        if isinstance(p, ct.Dense) and p.input_activations is not None:
            model.get_submodule(name).register_forward_pre_hook(input_quantizer(p.input_activations, p.input_scale))
    return model, packed


def _same(p: ct.Packed | ct.Dense, m: QuantizedLinear) -> bool:
    """The exported codes and scales are the model's, bit for bit."""
    if isinstance(p, ct.Packed):
        return (isinstance(m, QuantLinear) and torch.equal(p.codes, m.codes()) and torch.equal(p.zeros, m.qzeros)
                and torch.equal(p.scales.to(torch.float32), m.scales.to(torch.float32)))
    if isinstance(m, FP8Linear):
        codes, scales = m.weight.view(torch.uint8), m.weight_scale
        same = p.weight.dtype == m.weight.dtype and torch.equal(p.weight.view(torch.uint8), codes)
    else:
        codes, scales = m.codes().to(torch.int16) - 128, m.scales.to(torch.float32)
        same = p.weight.dtype == torch.int8 and torch.equal(p.weight.to(torch.int16), codes)
    ours = getattr(m, "input_scale", None)
    inputs = (ours is None) == (p.input_scale is None) and (ours is None or torch.equal(p.input_scale, ours))
    same_scales = torch.equal(p.scales.reshape(-1), scales.to(torch.float32).reshape(-1))
    return same and same_scales and inputs and p.input_activations == m.act


def _check_codes(linears: dict[str, QuantizedLinear], packed: dict[str, ct.Packed | ct.Dense]) -> None:
    if set(packed) != set(linears):
        raise ToolkitError(f"the export holds packed weights for {len(packed)} linears, the model has {len(linears)}")
    for name, m in linears.items():
        same = _same(packed[name], m)
        if not same:
            raise ToolkitError(f"{name}: the exported codes, scales or zero points differ from the model's; "
                               "this is a bug in the exporter, please report it")


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ExportCompressedTensorsConfig,
           folder: Path, *, history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write the checkpoint into ``folder`` (made atomic by the caller), validate it, return its metrics.
    Its ``quantization_config`` states the format only (no quantizer settings): ``history`` is unused."""
    folder = Path(folder)
    linears, floats = _linears(model)
    check_fused_scales(model, linears, ExportCompressedTensorsConfig.name)
    tensors = _tensors(model, linears, DTYPES[config.dtype])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config(model, linears, floats, config.dtype), indent=2, sort_keys=True))
    tokenizer.save_pretrained(folder)
    exported, packed = _reload_float(folder)
    _check_codes(linears, packed)
    kv_cache.check_same(model, exported)
    quantized_inputs = any(m.act is not None for m in linears.values()) or kv_cache.spec_of(model) is not None
    if quantized_inputs:  # another attention kernel's last-bit differences would flip activation codes
        exported.set_attn_implementation(model.config._attn_implementation)
    reference = stored_floats(model, DTYPES[config.dtype]) if quantized_inputs else model
    error = check_reloaded(reference, exported, config.tolerance, "compressed-tensors checkpoint")
    return {"relative_logit_error": error, "bytes": (folder / SINGLE).stat().st_size,
            "quantized_linears": len(linears), "bit_exact_codes": True,
            "kv_cache": None if kv_cache.spec_of(model) is None else "fp8 e4m3 per-tensor"}
