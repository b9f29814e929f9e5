"""Opening an export folder: refuse unsafe external data, read the model facts, create the ORT session.

An export folder holds ``model.onnx`` + ``model.onnx.data`` (external data), tokenizer files and a
description of the decoder: our ``export.json`` or onnxruntime-genai's ``genai_config.json``
(either is enough; ``config.json`` from Hugging Face is the last resort).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from toolkit.errors import ToolkitError

MODEL_FILE = "model.onnx"
DESCRIPTIONS = ("export.json", "genai_config.json", "config.json")
# Ops whose past/present outputs may alias one preallocated buffer (seqlens from the attention mask).
SHARED_BUFFER_OPS = ("GroupQueryAttention",)


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    # printf templates of the cache tensor names (export.json / genai_config.json may rename them)
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    def cache_names(self) -> list[tuple[str, str]]:
        """(past input, present output) per buffer: layer 0 key, layer 0 value, layer 1 key, ..."""
        return [(past % i, present % i) for i in range(self.num_layers)
                for past, present in ((self.past_key, self.present_key), (self.past_value, self.present_value))]


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def _first(d: dict[str, Any], *keys: str) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), None)


def _spec_from(d: dict[str, Any], source: Path) -> ModelSpec:
    # keys differ between export.json, genai_config.json (decoder facts flattened) and config.json
    model = dec = d
    values = {
        "num_layers": _first(dec, "num_layers", "num_hidden_layers"),
        "num_kv_heads": _first(dec, "num_kv_heads", "num_key_value_heads"),
        "head_dim": _first(dec, "head_dim", "head_size"),
        "vocab_size": _first(model, "vocab_size", "vocab"),
        "context_length": _first(model, "context_length", "max_positions", "max_position_embeddings") or 2048,
    }
    if values["head_dim"] is None and "hidden_size" in dec and "num_attention_heads" in dec:
        values["head_dim"] = dec["hidden_size"] // dec["num_attention_heads"]
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ToolkitError(f"{source} does not give {', '.join(missing)}: re-export the model")
    eos = _as_ids(_first(model, "eos_token_ids", "eos_token_id"))
    pad = _first(model, "pad_token_id")
    inputs, outputs = d.get("inputs") or {}, d.get("outputs") or {}
    names = {
        "past_key": _first(inputs, "past_key", "past_key_names"),
        "past_value": _first(inputs, "past_value", "past_value_names"),
        "present_key": _first(outputs, "present_key", "present_key_names"),
        "present_value": _first(outputs, "present_value", "present_value_names"),
    }
    return ModelSpec(
        num_layers=int(values["num_layers"]), num_kv_heads=int(values["num_kv_heads"]),
        head_dim=int(values["head_dim"]), vocab_size=int(values["vocab_size"]),
        context_length=int(values["context_length"]), eos_token_ids=eos,
        pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)),
        **{k: str(v) for k, v in names.items() if v},
    )


def read_spec(folder: Path) -> ModelSpec:
    """Facts from the first description found; a fact it lacks is taken from the next one."""
    merged: dict[str, Any] = {}
    found = []
    for name in reversed(DESCRIPTIONS):  # later files are fallbacks: apply them first, then override
        path = folder / name
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ToolkitError(f"{path} is not valid JSON ({exc.msg}); re-export the model") from None
        model = d.get("model", d)
        flat = {**model, **model.get("decoder", {})} if isinstance(model.get("decoder"), dict) else dict(model)
        merged.update({k: v for k, v in flat.items() if v is not None})
        found.append(path)
    if not found:
        raise ToolkitError(f"{folder} has none of {', '.join(DESCRIPTIONS)}: it is not an export folder")
    return _spec_from(merged, found[-1])


def check_external_data(folder: Path, model_path: Path) -> onnx.ModelProto:
    """Load the graph without weights and refuse missing or escaping external-data files.

    Every initializer's ``location`` must name an existing file inside ``folder``: ORT would
    otherwise read whatever path the graph names (``../../etc/...``) or fail halfway.
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/OSError variants; report them all the same way
        raise ToolkitError(f"{model_path} is not a readable ONNX model ({exc}); re-export it") from None
    root = folder.resolve()
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if not location:
            raise ToolkitError(f"{model_path}: initializer {init.name} has external data with no location; re-export")
        target = (folder / location).resolve()
        if not target.is_relative_to(root):
            raise ToolkitError(
                f"{model_path}: initializer {init.name} points outside the export folder ({location}); "
                "refusing to read it: re-export the model with its weights inside the folder"
            )
        if not target.is_file():
            raise ToolkitError(
                f"{model_path}: external data file {location} is missing; copy the whole export folder "
                "(model.onnx and its .data file) or re-export"
            )
    return proto


def uses_shared_buffer(proto: onnx.ModelProto) -> bool:
    return any(node.op_type in SHARED_BUFFER_OPS for node in proto.graph.node)


def resolve_model(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolkitError(f"export folder not found: {folder}")
    path = folder / MODEL_FILE
    if not path.is_file():
        raise ToolkitError(f"{folder} has no {MODEL_FILE}: give an export folder (toolkit run with an export step)")
    return path
