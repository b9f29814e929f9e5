"""Streaming intake: a model skeleton on the meta device whose parts are read from the shards when needed.

``SkeletonModel`` builds the transformers model from ``config.json`` with every parameter on the meta
device (buffers such as rotary frequencies are real: they are computed, not stored). ``load(prefix)``
reads the parameters under one module (a decoder layer, the embedding, the head) from the safetensors
shards in the compute dtype and device; ``release(prefix)`` puts them back on meta. An untied float input
embedding is the exception: it stays in its stored dtype (a bf16 128k x 4096 table is 1 GB, not 2 GB in float32)
and a forward hook widens the rows it looks up to the compute dtype, which is exact, so the model computes what
it would from a float32 table. Module paths come from
the architecture record (``layout_of``), so every family listed there streams the same way.

A packed folder opens the same way: ``install`` (``toolkit.quant.checkpoint``'s record) puts its quantized
modules on meta before the stored tensors are checked, and ``load`` reads their stored buffers (codes, float16
scales, zero points) in their own dtype. A tied float head shares the embedding's parameter whether it is loaded
or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from toolkit.errors import ToolkitError
from toolkit.models.architectures import Architecture, layout_of
from toolkit.models.shards import FLOAT_DTYPES, READ_AS, ShardedWeights


def empty_model(config: object, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of ``config`` with parameters on meta (no memory) and real non-persistent buffers."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def read_config(folder: Path) -> Any:
    """``config.json`` as transformers reads it; unreadable or invalid (its own checks, e.g. heads that do not
    divide the hidden size) as one line."""
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, StrictDataclassError, ArithmeticError, TypeError) as exc:  # its validators
        # divide by a head count of 0 or compare a string with a number before they report anything
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ToolkitError(f"cannot read {Path(folder) / 'config.json'}: {detail}; re-create it") from None


# config sizes that shape the model built from it; a packed dimension is at most 8x smaller than the real one
SIZE_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads", "num_key_value_heads")
PACKING = 8


def check_config_sizes(config: Any, weights: ShardedWeights, where: Path) -> None:
    """Refuse, before a model is built from ``config`` (rotary buffers are real even on the meta device), sizes
    that the stored tensors cannot back: a lying ``num_hidden_layers`` or ``hidden_size`` would build a model
    of that size first. Each layer stores at least one tensor; no size exceeds the largest stored dimension
    (times the packing of a quantized one)."""
    headers = weights.headers()
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and (not isinstance(layers, int) or not 0 < layers <= len(headers)):
        raise ToolkitError(f"{where / 'config.json'}: num_hidden_layers is {layers}, but the checkpoint stores "
                           f"{len(headers)} tensors; re-create config.json")
    largest = max((d for shape, _ in headers.values() for d in shape), default=0)
    for key in SIZE_KEYS:
        value = getattr(config, key, None)
        if value is not None and (not isinstance(value, int) or not 0 < value <= PACKING * largest):
            raise ToolkitError(f"{where / 'config.json'}: {key} is {value}, but no stored tensor has a dimension "
                               f"above {largest}; re-create config.json")


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted) of ``model`` by ``value``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        parent._buffers[leaf] = value


def tied_head(model: nn.Module, layout: Architecture) -> list[str]:
    """The head's weight when the config ties it to the embedding: a checkpoint may store it once, under the
    embedding's name."""
    return [f"{layout.head}.weight"] if getattr(model.config, "tie_word_embeddings", False) else []


class SkeletonModel:
    """A checkpoint folder opened for streaming: the skeleton, the shard index and the architecture record."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 install: Callable[[PreTrainedModel], None] | None = None) -> None:
        """``install`` replaces modules of the meta model before its tensors are checked against the shards
        (a packed folder's quantized linears)."""
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.weights = ShardedWeights(self.folder)
        check_config_sizes(self.config, self.weights, self.folder)
        self.dtype, self.device = dtype, torch.device(device)
        self.model = empty_model(self.config, dtype)
        for name, buf in list(self.model.named_buffers()):  # rotary frequencies: computed, needed on the device
            set_tensor(self.model, name, buf.to(self.device))
        self.layout: Architecture = layout_of(self.model)
        if install is not None:
            install(self.model)
        self.weights.check_stored(self.model.state_dict(keep_vars=True), tied_head(self.model, self.layout))
        self._retie()
        if self.narrow_table:
            self.model.get_input_embeddings().register_forward_hook(self._widen)

    @property
    def narrow_table(self) -> bool:
        """The input embedding is a plain float table of its own (not the head's): held in its stored dtype."""
        embed, head = self.model.get_input_embeddings(), self.model.get_submodule(self.layout.head)
        return type(embed) is nn.Embedding and not (isinstance(head, nn.Linear) and head.weight is embed.weight)

    def _table_dtype(self, name: str) -> torch.dtype:
        """The stored dtype when it is no wider than the compute dtype (bf16, float16 under float32)."""
        stored = self.source_dtype(name)
        return stored if stored.itemsize <= self.dtype.itemsize else self.dtype

    def _widen(self, module: nn.Module, args: object, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype)  # bf16 -> float32 is exact: the rows a float32 table holds

    @property
    def num_layers(self) -> int:
        return len(self.model.get_submodule(self.layout.layers))

    def layer_prefix(self, i: int) -> str:
        return f"{self.layout.layers}.{i}"

    @property
    def tied(self) -> bool:
        """The head reads the embedding's weight (stored once, under the embedding's name)."""
        return bool(getattr(self.config, "tie_word_embeddings", False)) and f"{self.layout.head}.weight" not in self.weights

    def stored_name(self, name: str) -> str:
        """The checkpoint's name for parameter ``name`` (a tied head's weight is the embedding's)."""
        if self.tied and name == f"{self.layout.head}.weight":
            return f"{self.layout.embed}.weight"
        return name

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype ``read`` and ``rows`` return for ``name`` (float64 is read as float32)."""
        dtype = FLOAT_DTYPES[self.weights.meta(self.stored_name(name))[1]]
        return READ_AS.get(dtype, dtype)

    def param_names(self, prefix: str) -> list[str]:
        module = self.model.get_submodule(prefix)
        return [f"{prefix}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One stored tensor, converted to ``dtype`` (the compute dtype unless given) on the compute device."""
        t = self.weights.get(self.stored_name(name))
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def _owner(self, prefix: str) -> str:
        """The module whose stored tensors ``prefix`` reads: a tied float head's are the embedding's."""
        tied_float = self.tied and isinstance(self.model.get_submodule(self.layout.head), nn.Linear)
        return self.layout.embed if tied_float and prefix == self.layout.head else prefix

    def _stored(self, prefix: str) -> dict[str, torch.Tensor]:
        """What ``prefix`` holds from the checkpoint: its parameters and a packed linear's buffers (codes,
        scales, zero points), by full name."""
        prefix = self._owner(prefix)
        module = self.model.get_submodule(prefix)
        return {f"{prefix}.{n}": t for n, t in module.state_dict(keep_vars=True).items()}

    def _retie(self) -> None:
        """A tied float head shares the embedding's parameter (loaded or on meta), as the in-memory model does."""
        head, embed = self.model.get_submodule(self.layout.head), self.model.get_input_embeddings()
        if self.tied and isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding):
            head._parameters["weight"] = embed._parameters["weight"]

    def load(self, prefix: str) -> nn.Module:
        """Materialise every parameter under module ``prefix`` in the compute dtype (a packed linear's buffers
        and an untied float embedding in their stored dtype); returns the module."""
        narrow = self.narrow_table and self._owner(prefix) == self.layout.embed
        for name, t in self._stored(prefix).items():
            dtype = (self._table_dtype(name) if narrow else self.dtype) if isinstance(t, nn.Parameter) else t.dtype
            set_tensor(self.model, name, self.read(name, dtype))
        self._retie()
        return self.model.get_submodule(prefix)

    def release(self, prefix: str) -> None:
        """Free the parameters and stored buffers under ``prefix`` (back to meta: no memory)."""
        for name, t in self._stored(prefix).items():
            set_tensor(self.model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self._retie()

    @contextmanager
    def resident(self, prefixes: list[str]) -> Iterator[None]:
        """The modules ``prefixes`` loaded for the duration of the block, then freed."""
        owners = list(dict.fromkeys(self._owner(p) for p in prefixes))
        try:
            for prefix in owners:
                self.load(prefix)
            yield
        finally:
            for prefix in owners:
                self.release(prefix)

    def stored_bytes(self) -> int:
        return self.weights.total_bytes()

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (they all have the same shapes)."""
        return sum(p.numel() for p in self.model.get_submodule(self.layer_prefix(0)).parameters())

    def embedding_parameters(self) -> int:
        return int(self.model.get_submodule(self.layout.embed).weight.numel())


@torch.no_grad()
def greedy_generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, vocab_limit: int) -> torch.Tensor:
    """Greedy continuation of ``ids: [1, S]`` with a KV cache; ids >= ``vocab_limit`` (a config vocabulary
    larger than its tokenizer, as in padded or synthetic checkpoints) are never chosen."""
    out = model(input_ids=ids, use_cache=True)
    cache, tokens = out.past_key_values, [ids]
    for _ in range(new_tokens):
        logits = out.logits[:, -1, :].float()
        logits[:, vocab_limit:] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)  # [1, 1]
        tokens.append(nxt)
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.past_key_values
    return torch.cat(tokens, dim=1)
