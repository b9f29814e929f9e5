"""Model artifacts on disk: a Hugging Face-style folder plus, for quantized models, packed weights.

Float models are saved with ``save_pretrained`` (loadable by any transformers user). Quantized models
keep the HF ``config.json`` and tokenizer files, store every tensor in ``model.safetensors`` (packed
codes, float16 scales, uint8 zero points for each quantized linear) and describe the layout in
``quantization.json``. Every folder gets a ``manifest.json`` with the sha256 and size of each file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from toolkit import __version__
from toolkit.errors import ToolkitError
from toolkit.models.architectures import layout_of
from toolkit.models.shards import ShardedWeights
from toolkit.models.streaming import empty_model, set_tensor
from toolkit.paths import sha256_file, sha256_json
from toolkit.quant.modules import QuantEmbedding, QuantLinear, quantized_modules, set_module
from toolkit.quant.spec import QuantSpec

QUANT_FILE = "quantization.json"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
QUANT_FORMAT = "llm-toolkit-packed-v1"


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import safetensors
    import transformers

    return {
        "toolkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(), **(extra or {})}
    manifest["files"] = file_table(folder)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{folder} has no {MANIFEST}: it is not a toolkit artifact")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-create the artifact") from None


def weights_key(folder: Path) -> str:
    """Content key of a model folder: from the manifest's hashes when present, else hashed now."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        files = read_manifest(folder).get("files", {})
        relevant = {k: v["sha256"] for k, v in files.items() if k.endswith((".safetensors", ".json"))}
        if relevant:
            return sha256_json(relevant)
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors",) or p.name in ("config.json", QUANT_FILE))
    return sha256_json({n: sha256_file(folder / n) for n in names})


def verify_weight_files(folder: Path) -> None:
    """Refuse truncated or corrupt safetensors files before anything is built from them."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ToolkitError(f"{folder} has no .safetensors weights")
    expected = read_manifest(folder).get("files", {}) if (Path(folder) / MANIFEST).is_file() else {}
    for path in files:
        want = expected.get(path.name, {}).get("bytes")
        if want is not None and path.stat().st_size != want:
            raise ToolkitError(
                f"{path} is truncated or altered ({path.stat().st_size} bytes, manifest says {want}); re-create it"
            )
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except SafetensorError as exc:
            raise ToolkitError(f"{path} is truncated or corrupt ({exc}); re-create it") from None


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write ``model`` and ``tokenizer`` into ``folder`` (which the caller makes atomic)."""
    folder = Path(folder)
    qmods = quantized_modules(model)
    tokenizer.save_pretrained(folder)
    if not qmods:
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    embedding = model.get_input_embeddings()
    tied = isinstance(embedding, QuantEmbedding)
    save_file(state, str(folder / WEIGHTS), metadata={"format": QUANT_FORMAT})
    spec_of = {
        name: {"bits": m.spec.bits, "group_size": m.spec.group_size, "symmetric": m.spec.symmetric,
               "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
        for name, m in qmods.items()
    }
    head_name = next((n for n, m in qmods.items() if tied and m is embedding.weight_source), None)
    info = {"format": QUANT_FORMAT, "modules": spec_of, "embedding_from": head_name}
    (folder / QUANT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def _build_quantized(folder: Path, info: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The packed model, built on meta and filled tensor by tensor from one file or from shards, so
    loading holds the packed bytes once and never a float copy of the quantized weights. Float tensors
    (embedding, norms, a float head) take ``dtype``; packed codes, scales and zeros keep their own."""
    if info.get("format") != QUANT_FORMAT:
        raise ToolkitError(f"{folder / QUANT_FILE}: unknown format {info.get('format')!r}; expected {QUANT_FORMAT}")
    model = empty_model(AutoConfig.from_pretrained(folder), dtype)
    with torch.device("meta"):
        for name, m in info["modules"].items():
            spec = QuantSpec(bits=m["bits"], group_size=m["group_size"], symmetric=m["symmetric"])
            set_module(model, name, QuantLinear(m["in_features"], m["out_features"], spec, bias=m["bias"]))
    weights = ShardedWeights(folder)
    expected = dict(model.state_dict(keep_vars=True))
    unexpected = [n for n in weights.names() if n not in expected]
    for name in weights.names():
        if name in expected:
            set_tensor(model, name, weights.get(name).to(expected[name].dtype))
    layout = layout_of(model)
    head, embed = model.get_submodule(layout.head), model.get_submodule(layout.embed)
    if isinstance(head, nn.Linear) and head.weight.is_meta and getattr(model.config, "tie_word_embeddings", False):
        head.weight = embed.weight  # a tied float head is stored once, under the embedding's name
    if info.get("embedding_from"):
        old = model.get_input_embeddings()
        model.set_input_embeddings(QuantEmbedding(model.get_submodule(info["embedding_from"]),
                                                  getattr(old, "padding_idx", None)))
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing or unexpected:
        raise ToolkitError(
            f"{folder} weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a float or quantized model from an artifact folder, computing in ``dtype``."""
    folder = Path(folder)
    verify_weight_files(folder)
    quant_path = folder / QUANT_FILE
    if quant_path.is_file():
        return _build_quantized(folder, json.loads(quant_path.read_text()), dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"cannot load model from {folder}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
