"""Per-architecture knowledge as data: where the layers, norms and linears of a decoder live.

One entry per Hugging Face ``model_type``. Passes and exporters read these tables instead of testing
class names. Add an architecture by adding a row (and a test on a tiny model of that type).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class DecoderLayout:
    layers: str  # attribute path of the ModuleList of decoder layers
    embed: str
    final_norm: str
    head: str
    # within one decoder layer, in execution order (true-sequential groups for GPTQ)
    input_norm: str
    post_attention_norm: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str

    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears grouped by the input they read, in execution order (GPTQ true-sequential)."""
        return ((self.q, self.k, self.v), (self.o,), (self.gate, self.up), (self.down,))


LLAMA = DecoderLayout(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)

LAYOUTS: dict[str, DecoderLayout] = {
    "llama": LLAMA,
}


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names the architecture (``general.architecture``) and whether it wants the q/k rows
    in its interleaved rope order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""

    arch: str
    permute_rope: bool


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_rope=True),
}


@dataclass(frozen=True)
class ScaleMapping:
    """AWQ: ``prev``'s output is the shared input of ``linears`` (names relative to a decoder layer).

    ``prev`` is a norm (1/s folds into its weight) or a linear (1/s folds into its output rows).
    A linear ``prev`` is used only when its outputs are exactly the linears' inputs: with grouped-query
    attention v_proj emits fewer channels than o_proj reads, and that mapping is skipped.
    """

    prev: str
    linears: tuple[str, ...]


AWQ_MAPPINGS: dict[str, tuple[ScaleMapping, ...]] = {
    "llama": (
        ScaleMapping(LLAMA.input_norm, (LLAMA.q, LLAMA.k, LLAMA.v)),
        ScaleMapping(LLAMA.v, (LLAMA.o,)),
        ScaleMapping(LLAMA.post_attention_norm, (LLAMA.gate, LLAMA.up)),
        ScaleMapping(LLAMA.up, (LLAMA.down,)),
    ),
}


def layout_of(model: PreTrainedModel) -> DecoderLayout:
    model_type = getattr(model.config, "model_type", "?")
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise ToolkitError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(LAYOUTS))}"
        ) from None


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = model.get_submodule(layout_of(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers
