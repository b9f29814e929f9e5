"""Export a GPTQ/AWQ/RTN-quantized model as a Hugging Face GPTQ checkpoint (``quant_method: gptq``).

Layout per quantized linear: ``<name>.qweight/.qzeros/.scales/.g_idx`` (``toolkit.interop.hf_gptq``),
every other tensor float16. The lm_head (int8 in our models) is written dequantized in float16, as
GPTQ checkpoints keep the head in float; with tied embeddings only ``model.embed_tokens.weight`` is
stored. ``quantization_config`` states what ran (``provenance``). The export proves itself: the written file is dequantized independently of ``QuantLinear``
into a plain float model whose logits must match the source model on two input shapes.
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
from toolkit.interop import hf_gptq
from toolkit.models.architectures import layout_of
from toolkit.models.checkpoint import config_dict, float_model
from toolkit.models.shards import SINGLE
from toolkit.passes.base import CheckpointExportConfig, PassConfig, QuantPassConfig
from toolkit.passes.gptq import GPTQConfig
from toolkit.quant.modules import QuantEmbedding, QuantLinear, check_weight_only, quantized_modules
from toolkit.quant.spec import QuantScheme, QuantSpec
from toolkit.schema import record


@dataclass(frozen=True)
class ExportHFGPTQConfig(CheckpointExportConfig):
    name: ClassVar[str] = "export_hf_gptq"
    reads_calibration: ClassVar[bool] = False

    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq"  # v1 (zeros stored minus one; widest support) or v2


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    """Refuse a quantization the GPTQ int32 layout cannot hold (recipes call it before any pass runs)."""
    spec = scheme.weight_only(ExportHFGPTQConfig.name)
    if spec.bits not in hf_gptq.BITS:
        raise ToolkitError(f"export_hf_gptq holds {', '.join(map(str, hf_gptq.BITS))} bits (the GPTQ int32 layout), "
                           f"not {spec.bits}; quantize with bits: 4 (or 2, 8), or export with export_compressed_tensors")


def _decoder_spec(model: PreTrainedModel) -> tuple[dict[str, QuantLinear], QuantSpec]:
    head = layout_of(model).head
    linears = {n: m for n, m in quantized_modules(model).items() if n != head}
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    if not linears or floats:
        raise ToolkitError("the GPTQ export needs every decoder linear quantized (no skip); "
                           f"float linears: {floats[:3]}; run a rtn/gptq/awq pass before export_hf_gptq")
    specs = {m.spec for m in linears.values()}
    if len(specs) != 1:
        raise ToolkitError(f"the GPTQ format holds one bits/group setting, the model mixes {sorted(map(str, specs))}")
    spec = specs.pop()
    check_spec(QuantScheme(spec))
    return linears, spec


def _tensors(model: PreTrainedModel, linears: dict[str, QuantLinear], checkpoint_format: str) -> dict[str, torch.Tensor]:
    layout = layout_of(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in linears.items():
        try:
            out.update(hf_gptq.linear_tensors(name, m.codes(), m.scales, m.qzeros, m.spec, checkpoint_format))
        except ValueError as exc:
            raise ToolkitError(f"{name}: {exc}") from None
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().half()
    head = model.get_submodule(layout.head)
    head_w = head.dequantized_weight() if isinstance(head, QuantLinear) else head.weight.detach()
    tied = isinstance(model.get_input_embeddings(), QuantEmbedding) or bool(model.config.tie_word_embeddings)
    out[f"{layout.embed}.weight" if tied else f"{layout.head}.weight"] = head_w.half().contiguous()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in linears and owner != layout.head and name not in out and not (tied and owner == layout.embed):
            out[name] = p.detach().half().contiguous()
    return out


def provenance(history: tuple[PassConfig, ...]) -> dict[str, Any]:
    """What ``quantization_config`` can truly say about how the codes were made: GPTQ's settings only when the last
    quantizing pass was GPTQ (act-order with static groups keeps the ordinary layout, so ``desc_act`` stays false),
    and every model pass with its settings under ``meta``; nothing when the passes are not known."""
    quantizers = [c for c in history if isinstance(c, QuantPassConfig)]
    if not quantizers:
        return {}
    found: dict[str, Any] = {"meta": {"quantizer": ["llm-toolkit"], "passes": [{c.name: record(c)} for c in history]}}
    last = quantizers[-1]
    if isinstance(last, GPTQConfig):
        found.update(true_sequential=last.true_sequential, static_groups=last.act_order, damp_percent=last.damp)
    return found


def _config(model: PreTrainedModel, spec: QuantSpec, config: ExportHFGPTQConfig,
            history: tuple[PassConfig, ...]) -> dict[str, Any]:
    d = config_dict(model)
    d["dtype"] = d["torch_dtype"] = "float16"  # transformers 5 reads dtype, older readers torch_dtype
    d["quantization_config"] = {**hf_gptq.quantization_config(spec, config.checkpoint_format), **provenance(history)}
    return d


def reload_float(folder: Path) -> PreTrainedModel:
    """A plain float32 model dequantized from the written checkpoint (independent of ``QuantLinear``)."""
    d, floats = hf_gptq.read(folder)
    return float_model(d, floats)


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ExportHFGPTQConfig, folder: Path, *,
           history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write the checkpoint into ``folder`` (made atomic by the caller) and return its metrics; ``history``: the
    model passes that made ``model`` (``provenance``)."""
    check_weight_only(model, ExportHFGPTQConfig.name)
    folder = Path(folder)
    linears, spec = _decoder_spec(model)
    tensors = _tensors(model, linears, config.checkpoint_format)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config(model, spec, config, history), indent=2, sort_keys=True))
    tokenizer.save_pretrained(folder)
    error = check_reloaded(model, reload_float(folder), config.tolerance, "GPTQ checkpoint")
    return {"relative_logit_error": error, "bytes": (folder / SINGLE).stat().st_size,
            "quantized_linears": len(linears), "checkpoint_format": config.checkpoint_format}
