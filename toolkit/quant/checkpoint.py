"""The packed checkpoint: a float checkpoint folder whose quantized linears are stored packed, described by one
record, ``quantization.json``, that both writers fill and every reader checks.

The folder keeps the Hugging Face ``config.json`` and tokenizer files; its safetensors (one file, or shards from
the streaming writer) hold every tensor: a quantized linear as its ``QuantLinear`` buffers (packed codes, float16
scales, uint8 zero points, a float bias) or its ``FP8Linear`` buffers (fp8 e4m3 weight, float32 per-channel
or per-tensor scales), with a static ``input_scale`` where its activations are calibrated; everything else as stored.
``PackedCheckpoint`` names each quantized linear with its scheme and shape, and the head a tied quantized
embedding reads. Its ``format`` is the version: ``FORMAT`` is written, every version in ``READABLE`` loads
(v1: integer weight-only linears; v2 adds a linear's ``type`` and ``input_activations`` keys, v3 its weight
``strategy`` (fp8 per tensor), each written only where the scheme has it, so a weight-only v3 record is the v1 record
under another name; v4 adds the top-level ``kv_cache``: null, or the fp8 KV cache whose ``k_scale`` / ``v_scale``
buffers each attention module then stores, ``toolkit.quant.kv_cache``).

``load_model`` and ``open_streaming`` take a folder of either kind; ``load`` is ``toolkit.models.load`` for any
source, packed folders included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.models.architectures import layout_of
from toolkit.models.checkpoint import check_finite, load_float, save_float, verify_weight_files
from toolkit.models.shards import SINGLE, ShardedWeights
from toolkit.models.streaming import (
    SkeletonModel,
    check_config_sizes,
    empty_model,
    read_config,
    set_tensor,
    tied_head,
)
from toolkit.quant import kv_cache
from toolkit.quant.modules import (
    FP8Linear,
    QuantEmbedding,
    QuantizedLinear,
    QuantLinear,
    quantized_linears,
    set_module,
)
from toolkit.quant.spec import ActivationSpec, KVCacheSpec, QuantScheme, QuantSpec

FILE = "quantization.json"
FORMAT = "llm-toolkit-packed-v4"  # the version written; also the safetensors metadata of a packed folder
V3 = "llm-toolkit-packed-v3"  # adds strategy to v2; no kv_cache
V2 = "llm-toolkit-packed-v2"  # adds type / input_activations to v1
V1 = "llm-toolkit-packed-v1"  # integer weight-only linears
READABLE = (FORMAT, V3, V2, V1)  # the versions this reader loads: a new version keeps the older ones here
# what each version adds to a module's record, only where the scheme has it
SCHEME_KEYS = {V1: (), V2: ("type", "input_activations"), V3: ("type", "input_activations", "strategy"),
               FORMAT: ("type", "input_activations", "strategy")}
BASE_TYPES = {"bits": int, "group_size": int, "symmetric": bool, "in_features": int, "out_features": int, "bias": bool}
WEIGHTS_METADATA = {"format": FORMAT}


@dataclass(frozen=True)
class PackedLinear:
    """One quantized linear as stored: its scheme and its float shape ``[out_features, in_features]``."""

    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int
    bias: bool
    type: str = "int"  # the weights: "int" (packed codes) or "float" (fp8 e4m3)
    input_activations: ActivationSpec | None = None  # None: float activations
    strategy: str = "group"  # "tensor": one fp8 weight scale for the matrix

    @classmethod
    def of(cls, module: QuantizedLinear) -> PackedLinear:
        spec = module.spec
        return cls(spec.bits, spec.group_size, spec.symmetric, module.in_features, module.out_features,
                   module.bias is not None, spec.type, module.act, spec.strategy)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                         type=self.type, strategy=self.strategy)  # type: ignore[arg-type]

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.spec, self.input_activations)

    def to_record(self) -> dict[str, Any]:
        shape = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias}
        return {**self.scheme.to_dict(), **shape}

    @classmethod
    def from_record(cls, m: dict[str, Any], version: str) -> PackedLinear:
        """One module's record; raises ValueError naming what is wrong."""
        keys = SCHEME_KEYS[version]
        extra = sorted(set(m) - set(BASE_TYPES) - set(keys))
        if extra:
            raise ValueError(f"unknown keys {extra}")
        scheme = QuantScheme.from_dict({k: m[k] for k in ("bits", "group_size", "symmetric", *keys) if k in m})
        return cls(m["bits"], m["group_size"], m["symmetric"], m["in_features"], m["out_features"], m["bias"],
                   scheme.weights.type, scheme.input_activations, scheme.weights.strategy)

    def module(self) -> QuantizedLinear:
        """The empty ``QuantLinear`` or ``FP8Linear`` whose buffers the folder stores (on the current default
        device)."""
        kind = FP8Linear if self.type == "float" else QuantLinear
        return kind(self.in_features, self.out_features, self.spec, bias=self.bias, act=self.input_activations)


@dataclass(frozen=True)
class PackedCheckpoint:
    """``quantization.json``: every quantized linear by module name, the head a tied quantized embedding
    reads (None when the embedding is a float table), and the KV cache (None: float)."""

    modules: Mapping[str, PackedLinear]
    embedding_from: str | None = None
    format: str = FORMAT
    kv_cache: KVCacheSpec | None = None

    @classmethod
    def of_model(cls, model: nn.Module) -> PackedCheckpoint:
        """The record of an in-memory quantized ``model``."""
        qmods = quantized_linears(model)
        embedding = model.get_input_embeddings()  # type: ignore[operator]
        tied = isinstance(embedding, QuantEmbedding)
        head = next((n for n, m in qmods.items() if tied and m is embedding.weight_source), None)
        return cls({name: PackedLinear.of(m) for name, m in qmods.items()}, head, kv_cache=kv_cache.spec_of(model))

    def to_json(self) -> str:
        record = {"format": self.format, "modules": {n: m.to_record() for n, m in self.modules.items()},
                  "embedding_from": self.embedding_from}
        if self.format == FORMAT:  # an older record read back is written as it was
            record["kv_cache"] = None if self.kv_cache is None else self.kv_cache.to_dict()
        return json.dumps(record, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path | str = FILE) -> PackedCheckpoint:
        """The record in ``text``, checked for every field a loader reads; ``where`` names it in a refusal."""
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise ToolkitError(f"{where} is not valid JSON ({type(exc).__name__}); re-create the artifact") from None
        if not isinstance(record, dict) or record.get("format") not in READABLE:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise ToolkitError(f"{where}: unknown format {found!r}; expected {' or '.join(READABLE)}; "
                               "re-create the artifact with this version of the toolkit")
        modules = record.get("modules")
        # a bool is no int here: ``"bits": true`` is refused
        if not isinstance(modules, dict) or not all(
            isinstance(m, dict) and all(type(m.get(k)) is t for k, t in BASE_TYPES.items()) for m in modules.values()
        ):
            raise ToolkitError(f"{where}: 'modules' must map module names to {{{', '.join(BASE_TYPES)}}}; "
                               "re-create the artifact")
        head = record.get("embedding_from")
        if head is not None and (not isinstance(head, str) or head not in modules):
            raise ToolkitError(f"{where}: 'embedding_from' is {head!r}, not one of its quantized modules; "
                               "re-create the artifact")
        cache = _kv_cache(record, where)
        linears: dict[str, PackedLinear] = {}
        for name, m in modules.items():
            try:
                linears[name] = PackedLinear.from_record(m, record["format"])
            except (ValueError, TypeError) as exc:
                raise ToolkitError(f"{where}: module {name!r} of a {record['format']} record: {exc}; "
                                   "re-create the artifact") from None
        return cls(linears, head, record["format"], cache)

    def write(self, folder: Path) -> None:
        (Path(folder) / FILE).write_text(self.to_json())

    @classmethod
    def read(cls, folder: Path) -> PackedCheckpoint:
        path = Path(folder) / FILE
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolkitError(f"{path} cannot be read ({type(exc).__name__}); re-create the artifact") from None
        return cls.from_json(text, path)

    def install(self, model: PreTrainedModel, where: Path | str = FILE) -> None:
        """Replace the linears the record names by empty ``QuantLinear`` on meta, and a tied quantized
        embedding by a ``QuantEmbedding`` over ``embedding_from``."""
        with torch.device("meta"):
            for name, linear in self.modules.items():
                try:
                    set_module(model, name, linear.module())
                except (ValueError, AttributeError, KeyError) as exc:
                    raise ToolkitError(f"{where}: module {name!r} does not fit the model ({exc}); "
                                       "re-create the artifact") from None
            if self.kv_cache is not None:
                kv_cache.install(model, self.kv_cache)
        if self.embedding_from:
            head = model.get_submodule(self.embedding_from)
            model.set_input_embeddings(QuantEmbedding.replacing(model.get_input_embeddings(), head))


def _kv_cache(record: dict[str, Any], where: Path | str) -> KVCacheSpec | None:
    """The record's KV cache: v4 names one (or null); older versions have none."""
    if record["format"] != FORMAT:
        if "kv_cache" in record:
            raise ToolkitError(f"{where}: a {record['format']} record has no 'kv_cache' (added in {FORMAT}); "
                               "re-create the artifact")
        return None
    cache = record.get("kv_cache")
    if cache is None:
        return None
    try:
        if not isinstance(cache, dict):
            raise ValueError(f"expected a mapping or null, got {type(cache).__name__}")
        return KVCacheSpec.from_dict(cache)
    except (ValueError, TypeError) as exc:
        raise ToolkitError(f"{where}: 'kv_cache': {exc}; re-create the artifact") from None


def is_packed(folder: Path) -> bool:
    """``folder`` holds a packed checkpoint (its record), not float weights."""
    return (Path(folder) / FILE).is_file()


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write ``model`` and ``tokenizer`` into ``folder`` (which the caller makes atomic): a float model with
    ``save_pretrained``, a quantized one as a packed checkpoint in one safetensors file."""
    folder = Path(folder)
    record = PackedCheckpoint.of_model(model)
    if not record.modules and record.kv_cache is None:
        save_float(model, tokenizer, folder)
        return
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight is getattr(embedding, "weight", None):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}  # a float tied head: once
    save_file(state, str(folder / SINGLE), metadata=WEIGHTS_METADATA)
    record.write(folder)


def _build_packed(folder: Path, record: PackedCheckpoint, dtype: torch.dtype) -> PreTrainedModel:
    """The packed model, built on meta and filled tensor by tensor from one file or from shards, so
    loading holds the packed bytes once and never a float copy of the quantized weights. Float tensors
    (embedding, norms, a float head) take ``dtype``; packed codes, scales and zeros keep their own."""
    config = read_config(folder)
    weights = ShardedWeights(folder)
    check_config_sizes(config, weights, folder)
    model = empty_model(config, dtype)
    record.install(model, folder / FILE)
    arch = layout_of(model)
    expected = dict(model.state_dict(keep_vars=True))
    weights.check_stored(expected, tied_head(model, arch), folder / SINGLE if (folder / SINGLE).is_file() else folder)
    for name in weights.names():
        set_tensor(model, name, weights.get(name).to(expected[name].dtype))
    head, embed = model.get_submodule(arch.head), model.get_submodule(arch.embed)
    if isinstance(head, nn.Linear) and head.weight.is_meta and config.tie_word_embeddings:
        head.weight = embed.weight  # a tied float head is stored once, under the embedding's name
    return model.eval()


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a float or packed model from a checkpoint folder (one file or shards), computing in ``dtype``;
    refuse missing, unexpected or non-finite tensors."""
    folder = Path(folder)
    if not is_packed(folder):
        return load_float(folder, dtype)
    verify_weight_files(folder)
    model = _build_packed(folder, PackedCheckpoint.read(folder), dtype)
    check_finite(model, folder)
    return model.eval()


def open_streaming(folder: Path, device: torch.device | str = "cpu") -> SkeletonModel:
    """A float or packed checkpoint folder opened for streaming (one module resident at a time)."""
    folder = Path(folder)
    verify_weight_files(folder)
    if not is_packed(folder):
        return SkeletonModel(folder, device=device)
    record = PackedCheckpoint.read(folder)
    return SkeletonModel(folder, device=device, install=lambda model: record.install(model, folder / FILE))


def check_weights(folder: Path) -> None:
    """Refuse, before any work, a checkpoint folder whose files are corrupt or whose tensors (names, shapes,
    dtypes: the shard headers) do not fit its config; values are checked as they are read."""
    open_streaming(folder, "meta")


def load(source: str) -> models.LoadedModel:
    """``toolkit.models.load`` for any source it accepts, a packed checkpoint folder included."""
    return models.load(source, read_folder=load_model)

