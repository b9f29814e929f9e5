"""Tiny seeded random models with a byte-level tokenizer, for fast tests of the whole pipeline.

``tiny_llama``: sizes deliberately odd (3 query heads, 1 KV head, vocab 259) but keeping the group sizes 16
and 32 valid (hidden 96, intermediate 160) and 64 invalid, so group-size errors can be tested.
``tiny_model(family)``: one model per supported family with its quirks switched on (``FAMILY_CONFIGS``).
``save_tiny_folder``: such a model as a checkpoint folder the way the hub stores one (bf16 safetensors, sharded
or not, a tokenizer), to test the path users take.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from toolkit.errors import ToolkitError
from toolkit.models.architectures import layout_of

TINY_CONFIG = dict(
    vocab_size=259,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, plus <s>, </s>, <pad> (ids 256-258)."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for i, tok in enumerate(("<s>", "</s>", "<pad>")):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so that quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


# ---------------------------------------------------------------- one tiny model per supported family
# Quirks on and sized so they matter on test sequences of 15-40 tokens: sliding windows of 8-12 keys,
# soft-capping at values random logits reach, rotary scaling whose original context is shorter than the
# cache, q/k norms and biases with random (not identity) weights, head_dim 16 or 32 (GroupQueryAttention needs multiples of 16), vocabularies that
# are not powers of two, untied heads where the family ships them.

SPECIAL = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258, attn_implementation="eager")
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=256,
             rms_norm_eps=1e-6, **SPECIAL)

FAMILY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "llama3": (LlamaConfig, dict(SMALL, vocab_size=300, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=False,
                                 rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=32))),
    "qwen2": (Qwen2Config, dict(SMALL, vocab_size=320, num_hidden_layers=2, num_key_value_heads=2,
                                tie_word_embeddings=True,
                                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                     original_max_position_embeddings=32))),
    "qwen3": (Qwen3Config, dict(SMALL, vocab_size=400, num_hidden_layers=2, num_key_value_heads=2, head_dim=32,
                                tie_word_embeddings=False)),
    "mistral": (MistralConfig, dict(SMALL, vocab_size=500, num_hidden_layers=2, num_key_value_heads=1, head_dim=16,
                                    sliding_window=8, tie_word_embeddings=False)),
    # head_dim 32, a quarter rotating: GroupQueryAttention needs rotary_dim / 2 a multiple of 8
    "phi3": (Phi3Config, dict(SMALL, vocab_size=352, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              sliding_window=12,
                              tie_word_embeddings=False, original_max_position_embeddings=128,
                              rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                   partial_rotary_factor=0.5,
                                                   short_factor=[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0],
                                                   long_factor=[2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0],
                                                   original_max_position_embeddings=128))),
    "gemma2": (Gemma2Config, dict(SMALL, vocab_size=384, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                                  query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "gemma3": (Gemma3TextConfig, dict(SMALL, vocab_size=450, num_hidden_layers=3, num_key_value_heads=1, head_dim=32,
                                      query_pre_attn_scalar=32, sliding_window=8, tie_word_embeddings=True,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                      rope_parameters={
                                          "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                          "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=2.0)})),
    "smollm3": (SmolLM3Config, dict(SMALL, vocab_size=600, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                    no_rope_layer_interval=2, tie_word_embeddings=True)),  # layer 1 without rotary
    "olmo2": (Olmo2Config, dict(SMALL, vocab_size=520, num_hidden_layers=2, num_key_value_heads=2,
                                tie_word_embeddings=False)),
    "granite": (GraniteConfig, dict(SMALL, vocab_size=700, num_hidden_layers=2, num_key_value_heads=2,
                                    embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                    logits_scaling=2.5, tie_word_embeddings=True)),
}
FAMILIES = ("llama", *FAMILY_CONFIGS)  # the names of ``tiny-<family>[:seed]`` sources


def family_config(family: str, **overrides: object) -> PretrainedConfig:
    if family == "llama":
        return LlamaConfig(**{**TINY_CONFIG, **overrides})
    if family not in FAMILY_CONFIGS:
        raise ToolkitError(f"no tiny model for '{family}'; tiny models: {', '.join(FAMILIES)}")
    cls, kwargs = FAMILY_CONFIGS[family]
    return cls(**{**kwargs, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A seeded random model of ``family``; every vector (norm weights, biases) is random too, so that
    folding a norm or dropping a bias shows up in the logits."""
    if family == "llama":
        return tiny_llama(seed, **overrides)
    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    offset = layout_of(config).norm_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # RMSNorm weights: around 1 (Gemma stores w - 1, around 0)
                p.normal_(1.0 - offset, 0.2)
    return model.eval()


def save_tiny_folder(family: str, folder: Path, shard_bytes: int | None = None, seed: int = 0,
                     **overrides: object) -> Path:
    """``tiny_model(family)`` saved by ``save_pretrained`` in bf16 with the tiny tokenizer; ``shard_bytes``
    splits the weights into several safetensors files behind an index, as the hub does for large models."""
    model = tiny_model(family, seed, **overrides).to(torch.bfloat16)
    model.save_pretrained(folder, **({} if shard_bytes is None else {"max_shard_size": shard_bytes}))
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)
