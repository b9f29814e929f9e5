"""Per-architecture knowledge as data: one ``Architecture`` record per Hugging Face ``model_type``.

Everything a pass, the calibration walk, distillation, both ONNX targets, ``genai_config.json`` and the GPTQ
checkpoint export need to know about a decoder family is a field of its record; everything a checkpoint
states itself (sizes, rotary theta and scaling, sliding window, soft-capping values) is read from its config
through the helpers below. "Not supported" is raised in one place, ``architecture_of``. Add a family by adding
a row (and a tiny model in ``toolkit.models.tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class ScaleMapping:
    """AWQ: ``prev``'s output is the shared input of ``linears`` (names relative to a decoder layer).

    ``prev`` is a norm (1/s folds into its weight) or a linear (1/s folds into its output rows). A fused
    linear ``prev`` (Phi-3's ``gate_up_proj``) gives only one of ``chunks`` equal row blocks, ``chunk``.
    A linear ``prev`` is used only when those rows are exactly the linears' inputs: with grouped-query
    attention v_proj emits fewer channels than o_proj reads, and that mapping is skipped.
    """

    prev: str
    linears: tuple[str, ...]
    chunk: int = 0
    chunks: int = 1


@dataclass(frozen=True)
class Architecture:
    """Where the modules of one decoder family live and how its math differs from Llama's."""

    model_type: str
    # onnxruntime-genai's model "type" (its builder: architecture name before "For", lowercased); None where
    # onnxruntime-genai has no such model (OLMo 2 in 0.18: "Unsupported model_type"), so no genai_config.json
    genai_type: str | None
    awq: tuple[ScaleMapping, ...]
    layers: str = "model.layers"  # attribute path of the ModuleList of decoder layers
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    rotary: str = "model.rotary_emb"  # module computing (cos, sin), HF rotate_half layout
    # within one decoder layer
    attention: str = "self_attn"  # the attention module (an fp8 KV cache's k_scale / v_scale are its buffers)
    input_norm: str | None = "input_layernorm"  # before attention (None: OLMo 2 norms only the outputs)
    mlp_norm: str | None = "post_attention_layernorm"  # before the MLP (Gemma 2/3: pre_feedforward_layernorm)
    attn_out_norm: str | None = None  # sandwich norm on the attention output, before the residual add
    mlp_out_norm: str | None = None  # sandwich norm on the MLP output
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # fused [q; k; v] rows (Phi-3), instead of q/k/v
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None  # fused [gate; up] rows (Phi-3), instead of gate/up
    down: str = "mlp.down_proj"
    # RMSNorm of queries/keys before rotary: per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    q_norm: str | None = None
    k_norm: str | None = None
    biased: tuple[str, ...] = ()  # linears whose checkpoints carry a bias (Qwen2's q/k/v)
    norm_offset: float = 0.0  # every RMSNorm scales by (offset + w): Gemma stores w - 1
    activation_attr: str = "hidden_act"  # config attribute naming the MLP gate activation
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    embed_multiplier_attr: str | None = None  # embeddings multiplied by config.<attr> (Granite)
    residual_multiplier_attr: str | None = None  # each sublayer's output multiplied by config.<attr> (Granite)
    attn_scale_attr: str | None = None  # scores scaled by config.<attr> ** -0.5 instead of head_dim ** -0.5
    attn_multiplier_attr: str | None = None  # scores scaled by config.<attr> itself (Granite)
    logits_divisor_attr: str | None = None  # logits divided by config.<attr> (Granite)
    attn_softcap_attr: str | None = None  # scores -> c·tanh(scores / c) (Gemma 2)
    final_softcap_attr: str | None = None  # logits -> c·tanh(logits / c) (Gemma 2)
    rotary_by_layer_type: bool = False  # one rotary per layer type (Gemma 3: local layers use another base)
    rope_layers_attr: str | None = None  # config list, per layer 1 = rotary, 0 = none (SmolLM3's NoPE layers)
    rope_types: tuple[str, ...] = ("default", "linear", "llama3", "yarn")  # scalings a static cache reproduces

    def attention_projections(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)  # type: ignore[return-value]

    def clip_exempt(self) -> tuple[str, ...]:
        """Linears AWQ must not clip: the queries' and keys' errors are multiplied together in the attention
        scores (AWQ's reference implementation skips them, fused q/k/v projections included)."""
        return (self.qkv,) if self.qkv else (self.q, self.k)  # type: ignore[return-value]

    def mlp_projections(self) -> tuple[str, ...]:
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)  # type: ignore[return-value]

    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears grouped by the input they read, in execution order (GPTQ true-sequential);
        a fused projection is one linear, quantized as the matrix the checkpoint stores."""
        return (self.attention_projections(), (self.o,), self.mlp_projections(), (self.down,))

    def layer_norms(self) -> tuple[str, ...]:
        names = (self.input_norm, self.attn_out_norm, self.mlp_norm, self.mlp_out_norm, self.q_norm, self.k_norm)
        return tuple(n for n in names if n)


def _llama_mappings() -> tuple[ScaleMapping, ...]:
    return (
        ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
    )


def _gemma_row(model_type: str, **extra: object) -> Architecture:
    return Architecture(
        model_type, model_type, mlp_norm="pre_feedforward_layernorm",
        attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
        awq=(ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
             ScaleMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
             ScaleMapping("mlp.up_proj", ("mlp.down_proj",))),
        norm_offset=1.0, activation_attr="hidden_activation", embed_scale=True,
        attn_scale_attr="query_pre_attn_scalar", **extra)  # type: ignore[arg-type]


# One row per Hugging Face model_type; the order is the order of the "supported:" list.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "llama", _llama_mappings()),
    Architecture("qwen2", "qwen2", _llama_mappings(),
                 biased=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Architecture("qwen3", "qwen3", _llama_mappings(), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    Architecture("mistral", "mistral", _llama_mappings()),
    Architecture("phi3", "phi3", (
        ScaleMapping("input_layernorm", ("self_attn.qkv_proj",)),
        ScaleMapping("self_attn.qkv_proj", ("self_attn.o_proj",), chunk=2, chunks=3),  # v rows, without GQA only
        ScaleMapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ScaleMapping("mlp.gate_up_proj", ("mlp.down_proj",), chunk=1, chunks=2),  # the up rows
    ), q=None, k=None, v=None, qkv="self_attn.qkv_proj", gate=None, up=None, gate_up="mlp.gate_up_proj",
        rope_types=("default", "longrope")),
    _gemma_row("gemma2", attn_softcap_attr="attn_logit_softcapping", final_softcap_attr="final_logit_softcapping"),
    _gemma_row("gemma3_text", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
               final_softcap_attr="final_logit_softcapping", rotary_by_layer_type=True),
    Architecture("smollm3", "smollm3", _llama_mappings(), rope_layers_attr="no_rope_layers"),
    Architecture("olmo2", None, (ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
                                    ScaleMapping("mlp.up_proj", ("mlp.down_proj",))),
                 input_norm=None, mlp_norm=None, attn_out_norm="post_attention_layernorm",
                 mlp_out_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    Architecture("granite", "granite", _llama_mappings(), embed_multiplier_attr="embedding_multiplier",
                 residual_multiplier_attr="residual_multiplier", attn_multiplier_attr="attention_multiplier",
                 logits_divisor_attr="logits_scaling"),
)}


def architecture_of_type(model_type: str) -> Architecture:
    """The record for ``model_type``; the one place an unsupported architecture is refused."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ToolkitError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None


def layout_of(model: PreTrainedModel | PretrainedConfig) -> Architecture:
    config = model if isinstance(model, PretrainedConfig) else model.config
    return architecture_of_type(getattr(config, "model_type", "?"))


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = model.get_submodule(layout_of(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


# ---------------------------------------------------------------- facts the checkpoint's config states

def layer_types(config: PretrainedConfig) -> list[str]:
    """``sliding_attention`` / ``full_attention`` per layer; families without ``layer_types`` (Mistral, Phi-3)
    slide in every layer when ``sliding_window`` is set."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    return ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer: how many keys (the query's own included) a query sees, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" else None for t in layer_types(config)]


def rotary_layers(config: PretrainedConfig) -> list[bool]:
    """Per layer: does attention rotate queries and keys (False in SmolLM3's NoPE layers)?"""
    attr = layout_of(config).rope_layers_attr
    flags = getattr(config, attr) if attr else None
    return [bool(f) for f in flags] if flags else [True] * config.num_hidden_layers


def per_layer_attrs(config: PretrainedConfig) -> tuple[str, ...]:
    """Config lists with one entry per decoder layer (kept in step when layers are dropped)."""
    attr = layout_of(config).rope_layers_attr
    return tuple(a for a in ("layer_types", attr) if a and getattr(config, a, None))


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    return params


def check_rope(config: PretrainedConfig) -> None:
    """Refuse rotary scalings a static cos/sin cache cannot reproduce (dynamic NTK recomputes per length)."""
    arch = layout_of(config)
    for lt in sorted(set(layer_types(config))) if arch.rotary_by_layer_type else [None]:
        kind = rope_parameters(config, lt).get("rope_type", "default")
        if kind not in arch.rope_types:
            raise ToolkitError(f"{arch.model_type}: rotary scaling '{kind}' cannot be exported as a cos/sin cache; "
                               f"supported for this family: {', '.join(arch.rope_types)}")


def final_softcap(config: PretrainedConfig) -> float | None:
    attr = layout_of(config).final_softcap_attr
    return getattr(config, attr, None) if attr else None


def attention_softcap(config: PretrainedConfig) -> float | None:
    attr = layout_of(config).attn_softcap_attr
    return getattr(config, attr, None) if attr else None


def attention_scale(config: PretrainedConfig, head_dim: int) -> float:
    arch = layout_of(config)
    if arch.attn_multiplier_attr:
        return float(getattr(config, arch.attn_multiplier_attr))
    return float(getattr(config, arch.attn_scale_attr) if arch.attn_scale_attr else head_dim) ** -0.5


def _config_value(config: PretrainedConfig, attr: str | None) -> float | None:
    value = getattr(config, attr, None) if attr else None
    return None if value is None or float(value) == 1.0 else float(value)


def embed_multiplier(config: PretrainedConfig) -> float | None:
    """What the embedding rows are multiplied by (Gemma: sqrt(hidden); Granite: its config), or None."""
    arch = layout_of(config)
    return config.hidden_size ** 0.5 if arch.embed_scale else _config_value(config, arch.embed_multiplier_attr)


def residual_multiplier(config: PretrainedConfig) -> float | None:
    return _config_value(config, layout_of(config).residual_multiplier_attr)


def logits_divisor(config: PretrainedConfig) -> float | None:
    return _config_value(config, layout_of(config).logits_divisor_attr)


def activation(config: PretrainedConfig) -> str:
    return str(getattr(config, layout_of(config).activation_attr))
