"""Model intake: sources (bundled SmolLM2, folders, GGUF, hub ids), checkpoints on disk, the architecture table,
tiny test models. ``load``/``resolve`` are the entry points."""

from toolkit.models.sources import LoadedModel, ModelRef, load, load_tokenizer, resolve

__all__ = ["LoadedModel", "ModelRef", "load", "load_tokenizer", "resolve"]
