"""Model intake: sources (bundled SmolLM2, folders, GGUF, hub ids), checkpoints on disk, the architecture table,
tiny test models. ``load``/``resolve`` are the entry points."""

from toolkit.models.sources import (
    LoadedModel,
    ModelRef,
    check_lengths,
    context_length,
    load,
    load_tokenizer,
    resolve,
    smollm2_gguf_path,
)

__all__ = ["LoadedModel", "ModelRef", "check_lengths", "context_length", "load", "load_tokenizer", "resolve",
           "smollm2_gguf_path"]
