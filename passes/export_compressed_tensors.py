"""Export a quantized model as a compressed-tensors ``pack-quantized`` checkpoint (transformers, vLLM, SGLang).

compressed-tensors holds signed codes ``v = q - 2^(b-1)`` and zero points ``zero - 2^(b-1)`` and packs
``v + 2^(b-1)``, so our unsigned codes are written unchanged (``toolkit.interop.compressed_tensors``);
symmetric specs store no zero point (ours is always ``2^(b-1)``). Every decoder linear of one spec is one
config group; the head (int8 in our models, and a tied embedding) is written dequantized at ``dtype`` and
listed in ``ignore``, as llm-compressor leaves ``lm_head`` unquantized. The export proves itself: the folder
is read back by ``toolkit.interop.compressed_tensors.read`` (no compressed-tensors package needed), its
codes, scales and zero points must equal the model's bit for bit, and a plain float model dequantized from
it must give the source model's logits on two shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from toolkit.errors import ToolkitError
from toolkit.evaluation.perplexity import check_reloaded
from toolkit.interop import compressed_tensors as ct
from toolkit.models.architectures import layout_of
from toolkit.models.checkpoint import config_dict
from toolkit.models.shards import SINGLE
from toolkit.passes.base import ExportConfig, PassConfig
from toolkit.quant.modules import QuantEmbedding, QuantLinear, quantized_modules
from toolkit.quant.spec import QuantScheme

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExportCompressedTensorsConfig(ExportConfig):
    name: ClassVar[str] = "export_compressed_tensors"
    reads_calibration: ClassVar[bool] = False

    # float tensors and scales; float16 holds our scales exactly (bfloat16 would not)
    dtype: Literal["float16", "float32"] = "float16"
    tolerance: float = 2e-2  # max |Δlogit| / max |logit| between the export and the source model

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    """``ct.quantization_config`` maps input activations too, but this export proves itself against a model that
    computes with float activations, so a scheme that quantizes them is refused when the recipe is read."""
    scheme.weight_only(ExportCompressedTensorsConfig.name)


def _linears(model: PreTrainedModel) -> tuple[dict[str, QuantLinear], list[str]]:
    head = layout_of(model).head
    linears = {n: m for n, m in quantized_modules(model).items() if n != head}
    if not linears:
        raise ToolkitError("export_compressed_tensors needs a quantized model; run rtn, gptq or awq before it")
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    for name, m in linears.items():
        if m.spec.symmetric and bool((m.qzeros != 2 ** (m.spec.bits - 1)).any()):
            raise ToolkitError(f"{name}: symmetric codes must have zero point {2 ** (m.spec.bits - 1)} "
                               "(compressed-tensors stores none for symmetric weights)")
    return linears, floats


def _tensors(model: PreTrainedModel, linears: dict[str, QuantLinear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    layout = layout_of(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in linears.items():
        out.update(ct.linear_tensors(name, m.codes(), m.scales.to(dtype), m.qzeros, m.spec))
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to(dtype)
    head = model.get_submodule(layout.head)
    head_w = head.dequantized_weight() if isinstance(head, QuantLinear) else head.weight.detach()
    tied = isinstance(model.get_input_embeddings(), QuantEmbedding) or bool(model.config.tie_word_embeddings)
    out[f"{layout.embed}.weight" if tied else f"{layout.head}.weight"] = head_w.to(dtype).contiguous()
    for pname, p in model.named_parameters():
        owner = pname.rsplit(".", 1)[0]
        if owner not in linears and owner != layout.head and pname not in out and not (tied and owner == layout.embed):
            out[pname] = p.detach().to(dtype).contiguous()
    return out


def _config(model: PreTrainedModel, linears: dict[str, QuantLinear], floats: list[str], dtype: str) -> dict[str, Any]:
    groups: dict[QuantScheme, list[str]] = {}
    for name, m in linears.items():
        groups.setdefault(QuantScheme(m.spec), []).append(name)
    d = config_dict(model)
    d["dtype"] = dtype
    d["quantization_config"] = ct.quantization_config(groups, [layout_of(model).head, *floats])
    return d


def _reload_float(folder: Path) -> tuple[PreTrainedModel, dict[str, ct.Packed]]:
    """A plain float32 model dequantized from the written folder (independent of ``QuantLinear``)."""
    config, packed, floats = ct.read(folder)
    config.pop("quantization_config")
    state = {k: v.float() for k, v in floats.items()}
    state.update({f"{name}.weight": p.dequantize() for name, p in packed.items()})
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                 dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ToolkitError(f"the exported checkpoint is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval(), packed


def _check_codes(linears: dict[str, QuantLinear], packed: dict[str, ct.Packed]) -> None:
    if set(packed) != set(linears):
        raise ToolkitError(f"the export holds packed weights for {len(packed)} linears, the model has {len(linears)}")
    for name, m in linears.items():
        p = packed[name]
        same = (torch.equal(p.codes, m.codes()) and torch.equal(p.zeros, m.qzeros)
                and torch.equal(p.scales.to(torch.float32), m.scales.to(torch.float32)))
        if not same:
            raise ToolkitError(f"{name}: the exported codes, scales or zero points differ from the model's; "
                               "this is a bug in the exporter, please report it")


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ExportCompressedTensorsConfig,
           folder: Path, *, history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write the checkpoint into ``folder`` (made atomic by the caller), validate it, return its metrics.
    Its ``quantization_config`` states the format only (no quantizer settings): ``history`` is unused."""
    folder = Path(folder)
    linears, floats = _linears(model)
    tensors = _tensors(model, linears, DTYPES[config.dtype])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config(model, linears, floats, config.dtype), indent=2, sort_keys=True))
    tokenizer.save_pretrained(folder)
    exported, packed = _reload_float(folder)
    _check_codes(linears, packed)
    error = check_reloaded(model, exported, config.tolerance, "compressed-tensors checkpoint")
    return {"relative_logit_error": error, "bytes": (folder / SINGLE).stat().st_size,
            "quantized_linears": len(linears), "bit_exact_codes": True}
