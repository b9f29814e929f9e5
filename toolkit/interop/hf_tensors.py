"""The tensors of a Hugging Face checkpoint of a quantized model, for the exporters that write one (compressed-tensors,
ModelOpt): each quantized linear's own tensors as its format writes them, its bias, the head dequantized (written
once, as the embedding, where it is tied) and every other parameter at the checkpoint's float dtype."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.models.architectures import layout_of
from toolkit.quant.modules import QuantEmbedding, QuantLinear

M = TypeVar("M", bound=nn.Module)


def checkpoint_tensors(model: PreTrainedModel, linears: Mapping[str, M], dtype: torch.dtype,
                       linear_tensors: Callable[[str, M], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    layout = layout_of(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in linears.items():
        out.update(linear_tensors(name, m))
        bias = getattr(m, "bias", None)
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().to(dtype)
    head = model.get_submodule(layout.head)
    head_w = head.dequantized_weight() if isinstance(head, QuantLinear) else head.weight.detach()
    tied = isinstance(model.get_input_embeddings(), QuantEmbedding) or bool(model.config.tie_word_embeddings)
    out[f"{layout.embed}.weight" if tied else f"{layout.head}.weight"] = head_w.to(dtype).contiguous()
    for pname, p in model.named_parameters():
        owner = pname.rsplit(".", 1)[0]
        if owner not in linears and owner != layout.head and pname not in out and not (tied and owner == layout.embed):
            out[pname] = p.detach().to(dtype).contiguous()
    return out
