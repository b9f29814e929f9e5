"""What a memory estimate needs to know about a model, from its config alone (no weights read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layer_parameters: int
    embedding_parameters: int
    hidden: int
    vocab: int
    max_in_features: int
    tied: bool

    @classmethod
    def of_config(cls, config: Any) -> ModelShape:
        from toolkit.models.architectures import decoder_layers
        from toolkit.models.streaming import empty_model

        model = empty_model(config)
        layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
        embed = model.get_input_embeddings().weight.numel()
        ins = [m.in_features for m in model.modules() if hasattr(m, "in_features")]
        return cls(sum(p.numel() for p in model.parameters()), layer, embed, int(config.hidden_size),
                   int(config.vocab_size), max(ins or [0]), bool(getattr(config, "tie_word_embeddings", False)))
