"""GGUF for llama.cpp through the ``gguf`` library: tensor names, the tokenizer metadata, the hyperparameters.

What is written mirrors llama.cpp's ``convert_hf_to_gguf.py`` for the families in ``ARCHS`` (one ``GGUFArch``
row per Hugging Face ``model_type``: what llama.cpp calls the family and what it does its own way): the
hyperparameters and rope scaling of ``TextModel.set_gguf_parameters`` plus the family's own keys
(``GGUFArch.config_keys``), the vocabulary of ``_set_vocab_gpt2`` (tokens, token types, merges, special token
ids, chat template through ``gguf.SpecialVocab``), tensor names through gguf's own tensor mapping, and, where
``GGUFArch.permute_rope``, the q/k row permutation of ``LlamaModel.permute`` (llama.cpp's llama rope pairs
dimensions ``(i, i + 1)`` where Hugging Face pairs ``(i, i + d/2)``).
Llama 3.1's rope scaling is written as the converter writes it: no scaling type, a ``rope_freqs`` tensor of
per-pair divisors (``toolkit.interop.rope_factors``). Gemma's norm weights get the converter's +1 (llama.cpp
scales by w where Gemma scales by 1 + w); its embedding scale is implicit in llama.cpp. What llama.cpp would
compute differently (a sliding window its architecture ignores or places by its own constant pattern,
longrope, a rope tensor its architecture does not load, NoPE layers other than its own constant, an
attention scale other than the one it derives) is refused in ``check_supported``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import gguf
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.interop import rope_factors
from toolkit.models.architectures import (
    attention_scale,
    attention_softcap,
    final_softcap,
    layout_of,
    rope_parameters,
    rotary_layers,
    sliding_windows,
)
from toolkit.quant.formats import GGUFQ4_0, GGUFQ4_1, GGUFQ8_0, PackedFormat
from toolkit.quant.spec import QuantSpec


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names the architecture (``general.architecture``), whether it wants the q/k rows
    in its interleaved rope order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; Qwen's and Phi-3's NeoX
    order needs none, so fused [q; k; v] rows go as stored) and whether it applies the config's
    ``sliding_window`` (llama.cpp's ``llama`` does not; its ``phi3`` reads the key and disables it)."""

    arch: str
    permute_rope: bool
    sliding_window: bool = False
    # (config attribute, gguf.GGUFWriter method) written when the checkpoint sets it (Granite's multipliers)
    config_keys: tuple[tuple[str, str], ...] = ()
    # llama.cpp's smollm3 skips rotary in every n-th layer by a constant of its own (not read from the file)
    nope_every: int | None = None
    # llama.cpp's architecture loads a rope_freqs tensor (Llama 3.1's rope scaling); others refuse the file
    rope_freqs: bool = False
    # llama.cpp's gemma2/3 fix which layers slide by a constant: every n-th layer attends to all keys
    full_every: int | None = None
    # llama.cpp's gemma2/3 derive the attention scale: head_dim ** -0.5, (hidden / heads) ** -0.5 for their
    # 27B (recognised by this layer count), whatever query_pre_attn_scalar says
    scale_by_hidden_at_layers: int | None = None
    # llama.cpp's gemma3 rotates sliding layers with this base of its own, unscaled
    sliding_rope_theta: float | None = None


# One row per Hugging Face model_type this exporter writes; the order is the order of the "supported:" list.
ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_rope=True, rope_freqs=True),
    "qwen2": GGUFArch("qwen2", permute_rope=False),
    "qwen3": GGUFArch("qwen3", permute_rope=False),
    "mistral": GGUFArch("llama", permute_rope=True, rope_freqs=True),
    "phi3": GGUFArch("phi3", permute_rope=False),
    "gemma2": GGUFArch("gemma2", permute_rope=False, sliding_window=True, full_every=2, scale_by_hidden_at_layers=46,
                       config_keys=(("attn_logit_softcapping", "add_attn_logit_softcapping"),
                                    ("final_logit_softcapping", "add_final_logit_softcapping"))),
    "gemma3_text": GGUFArch("gemma3", permute_rope=False, sliding_window=True, full_every=6,
                            scale_by_hidden_at_layers=62, sliding_rope_theta=10000.0),
    "smollm3": GGUFArch("smollm3", permute_rope=True, nope_every=4),
    "olmo2": GGUFArch("olmo2", permute_rope=False),
    "granite": GGUFArch("granite", permute_rope=True, rope_freqs=True, config_keys=(
        ("attention_multiplier", "add_attention_scale"), ("embedding_multiplier", "add_embedding_scale"),
        ("residual_multiplier", "add_residual_scale"), ("logits_scaling", "add_logit_scale"))),
}

# convert_hf_to_gguf.py identifies the pre-tokenizer by hashing the encoding of this text
# (``get_vocab_base_pre``); the table keeps the entries for the tokenizers this toolkit meets.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
FLOAT_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}
# (bits, group size, symmetric) -> the GGUF block type holding those codes exactly, and its packed format
BLOCK_TYPES: dict[tuple[int, int, bool], tuple[gguf.GGMLQuantizationType, type[PackedFormat]]] = {
    (4, 32, True): (gguf.GGMLQuantizationType.Q4_0, GGUFQ4_0),
    (4, 32, False): (gguf.GGMLQuantizationType.Q4_1, GGUFQ4_1),
    (8, 32, True): (gguf.GGMLQuantizationType.Q8_0, GGUFQ8_0),
}
SUPPORTED = ("int4 group 32 symmetric (Q4_0), int4 group 32 asymmetric (Q4_1), int8 group 32 symmetric (Q8_0), "
             "float (F16/F32)")
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


class Writer(gguf.GGUFWriter):
    """gguf's writer, able to write an empty array: a BPE vocabulary without merges (every byte a token) needs
    an empty ``tokenizer.ggml.merges``, since llama.cpp refuses a gpt2 vocabulary without the key, and any
    placeholder merge names a token the vocabulary lacks, which transformers' tokenizer rebuild refuses. The
    format allows a zero-length array; only gguf-py's packer refuses one."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def block_type(spec: QuantSpec, group: int, where: str = "") -> tuple[gguf.GGMLQuantizationType, type[PackedFormat]]:
    """The block type of ``spec`` in groups of ``group`` (a whole-row group is the row's width)."""
    key = (spec.bits, group, spec.symmetric)
    if key not in BLOCK_TYPES:
        sym = "symmetric" if spec.symmetric else "asymmetric"
        raise ToolkitError(f"{where}int{spec.bits} group {spec.group_size} {sym} has no GGUF block type; GGUF holds "
                           f"{SUPPORTED}; quantize with one of those")
    return BLOCK_TYPES[key]


def arch_of(model: PreTrainedModel) -> GGUFArch:
    layout_of(model)  # an unsupported family is refused as everywhere else
    if model.config.model_type not in ARCHS:
        raise ToolkitError(f"no GGUF architecture for model type '{model.config.model_type}'; "
                           f"supported: {', '.join(ARCHS)}")
    return ARCHS[model.config.model_type]


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), blocks)  # ~30 ms to build


def tensor_name(model: PreTrainedModel, hf_name: str) -> str:
    """The GGUF name of a Hugging Face parameter (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    names = _name_map(arch_of(model).arch, model.config.num_hidden_layers)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ToolkitError(f"gguf's tensor mapping has no name for '{hf_name}'; this exporter covers {arch_of(model).arch} only")
    return name


def rope_heads(model: PreTrainedModel, module_name: str) -> int | None:
    """Heads whose rows llama.cpp wants permuted (q: attention heads, k: KV heads), None for other linears."""
    arch, layout = arch_of(model), layout_of(model)
    if not arch.permute_rope:
        return None
    if layout.q and module_name.endswith("." + layout.q):
        return int(model.config.num_attention_heads)
    if layout.k and module_name.endswith("." + layout.k):
        return int(model.config.num_key_value_heads)
    return None


def permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """``LlamaModel.permute``: within each head, rows ``[0..d/2) , [d/2..d)`` interleaved. Any row tensor
    (weights, codes, per-row scales) permutes alike, so quantized rows move bit-exactly."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ToolkitError(f"llama.cpp's pre-tokenizer for this tokenizer is not known here (hash {digest[:12]}); "
                           "set export_gguf: {pre_tokenizer: NAME} (e.g. 'default', 'llama-bpe', 'smollm')")
    return PRE_TOKENIZERS[digest]


def _tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Token strings and types as ``get_vocab_base`` makes them (ids the tokenizer lacks become UNUSED)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(reverse) >= vocab_size:
        raise ToolkitError(f"the tokenizer has ids up to {max(reverse)} but the model's vocabulary is {vocab_size}")
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            looks_special = reverse[i].startswith("<|") and reverse[i].endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_vocab(writer: Writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int, pre: str) -> None:
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads the files save_pretrained writes
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:  # written empty (see ``Writer``)
        special.load_merges = False
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# Hugging Face rope_type -> the scaling type llama.cpp reads (``TextModel.set_gguf_parameters``); llama3 has
# none: its per-pair divisors are a rope_freqs tensor (ROPE_TENSORS). longrope's two factor tensors and
# attention factor are not written
ROPE_SCALINGS = {"default": None, "linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN,
                 "llama3": None}
# rope_type -> (the tensor llama.cpp divides each pair's frequency by, its values from the rope parameters)
ROPE_TENSORS = {"llama3": (gguf.MODEL_TENSOR.ROPE_FREQS, rope_factors.llama3)}
# optional yarn parameters: config key(s) -> writer method
YARN_EXTRAS = ((("extrapolation_factor",), "add_rope_scaling_yarn_ext_factor"),
               (("attention_factor", "attn_factor"), "add_rope_scaling_yarn_attn_factor"),
               (("beta_fast",), "add_rope_scaling_yarn_beta_fast"), (("beta_slow",), "add_rope_scaling_yarn_beta_slow"))


def _rope_parameters(config: Any) -> dict[str, Any]:
    """The rotary of full-attention layers (Gemma 3 keeps one per layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    return dict(params.get("full_attention", params))


def rotary_dim(config: Any) -> int:
    """Dimensions of each head that rotate (Phi-3 rotates a fraction, ``partial_rotary_factor``)."""
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    fraction = _rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(head_dim * float(fraction if fraction is not None else 1.0))


def rope_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 values of the rope tensors the scaling needs (Llama 3.1: ``rope_freqs.weight``)."""
    params = _rope_parameters(model.config)
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TENSORS:
        return {}
    tensor, factors = ROPE_TENSORS[kind]
    return {f"{gguf.TENSOR_NAMES[tensor]}.weight": factors(params, rotary_dim(model.config))}


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, before anything is written, what llama.cpp would compute differently from the model."""
    arch, c = arch_of(model), model.config
    kind = _rope_parameters(c).get("rope_type", "default")
    if kind not in ROPE_SCALINGS:
        raise ToolkitError(f"rope type '{kind}' is not written by this GGUF exporter (llama.cpp needs extra "
                           f"rope tensors for it); supported: {', '.join(ROPE_SCALINGS)}")
    if kind in ROPE_TENSORS and not arch.rope_freqs:
        raise ToolkitError(f"rope type '{kind}' needs a {gguf.TENSOR_NAMES[ROPE_TENSORS[kind][0]]} tensor, which "
                           f"llama.cpp's '{arch.arch}' architecture does not read (it would refuse the file); "
                           f"this {c.model_type} model is not exported")
    windows = [w for w in sliding_windows(c) if w is not None and w < c.max_position_embeddings]
    if windows and not arch.sliding_window:
        raise ToolkitError(f"llama.cpp's '{arch.arch}' architecture attends to every key, but this "
                           f"{c.model_type} model sees only the last {windows[0]} (sliding_window); its GGUF would "
                           "answer differently past that length, so it is not exported")
    if arch.full_every is not None:
        fixed = [None if (i + 1) % arch.full_every == 0 else c.sliding_window for i in range(c.num_hidden_layers)]
        if sliding_windows(c) != fixed:
            raise ToolkitError(f"llama.cpp's '{arch.arch}' attends to all keys in every {arch.full_every}th layer and "
                               f"slides in the others whatever the file says; this model's windows "
                               f"{sliding_windows(c)} differ, so it is not exported")
    _check_attention_scale(model, arch)
    written = {attr for attr, _ in arch.config_keys}
    for attr, value in ((layout_of(c).attn_softcap_attr, attention_softcap(c)), (layout_of(c).final_softcap_attr, final_softcap(c))):
        if value is not None and attr not in written:
            raise ToolkitError(f"this {c.model_type} model soft-caps with {attr}={value}, which this exporter does "
                               f"not write for llama.cpp's '{arch.arch}'; it is not exported")
    local = rope_parameters(c, "sliding_attention") if arch.sliding_rope_theta is not None else {}
    if local and (local.get("rope_type", "default") != "default" or local.get("rope_theta") != arch.sliding_rope_theta):
        raise ToolkitError(f"llama.cpp's '{arch.arch}' rotates sliding layers with base {arch.sliding_rope_theta:g}, "
                           f"unscaled, whatever the file says; this model's sliding rotary is {local}, so it is not exported")
    if arch.nope_every is not None:
        fixed = [(i + 1) % arch.nope_every != 0 for i in range(c.num_hidden_layers)]
        if rotary_layers(c) != fixed:
            raise ToolkitError(f"llama.cpp's '{arch.arch}' leaves out rotary in every {arch.nope_every}th layer "
                               f"whatever the file says; this model's rotary layers {rotary_layers(c)} differ, "
                               "so it is not exported")


def _check_attention_scale(model: PreTrainedModel, arch: GGUFArch) -> None:
    """llama.cpp's Gemma scales scores by a dimension it derives itself, not by ``query_pre_attn_scalar``."""
    c, layout = model.config, layout_of(model)
    if layout.attn_scale_attr is None:
        return
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    derived = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == arch.scale_by_hidden_at_layers else head_dim
    if not math.isclose(attention_scale(c, head_dim), derived ** -0.5, rel_tol=1e-6):
        raise ToolkitError(f"llama.cpp's '{arch.arch}' scales attention scores by {derived} ** -0.5, but this model's "
                           f"{layout.attn_scale_attr} is {getattr(c, layout.attn_scale_attr)}; its GGUF would answer "
                           "differently, so it is not exported")


def norm_offset(model: PreTrainedModel, hf_name: str) -> float:
    """What the converter adds to a norm weight: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w."""
    return layout_of(model).norm_offset if hf_name.endswith("norm.weight") else 0.0


def write_rope(writer: gguf.GGUFWriter, config: Any) -> None:
    params = _rope_parameters(config)
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    scaling = ROPE_SCALINGS[params.get("rope_type", "default")]
    if scaling is None:
        return
    writer.add_rope_scaling_type(scaling)
    writer.add_rope_scaling_factor(float(params["factor"]))
    if scaling == gguf.RopeScalingType.YARN:
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for keys, method in YARN_EXTRAS:
            value = next((params[k] for k in keys if params.get(k) is not None), None)
            if value is not None:
                getattr(writer, method)(float(value))


def write_hparams(writer: gguf.GGUFWriter, model: PreTrainedModel, file_type: gguf.LlamaFileType) -> None:
    """The keys ``TextModel.set_gguf_parameters`` and ``LlamaModel.set_gguf_parameters`` write."""
    c = model.config
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    writer.add_name(str(getattr(c, "_name_or_path", "") or "model"))
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    write_rope(writer, c)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(rotary_dim(c))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch_of(model).sliding_window and getattr(c, "sliding_window", None):
        writer.add_sliding_window(int(c.sliding_window))
    for attr, method in arch_of(model).config_keys:
        if getattr(c, attr, None) is not None:
            getattr(writer, method)(float(getattr(c, attr)))
