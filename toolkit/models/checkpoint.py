"""Model artifacts on disk: a Hugging Face-style folder plus, for quantized models, packed weights.

Float models are saved with ``save_pretrained`` (loadable by any transformers user). Quantized models
keep the HF ``config.json`` and tokenizer files, store every tensor in ``model.safetensors`` (packed
codes, float16 scales, uint8 zero points for each quantized linear) and describe the layout in
``quantization.json``. Every folder gets a ``manifest.json`` with the sha256 and size of each file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from toolkit import __version__
from toolkit.errors import ToolkitError, panics_as_errors
from toolkit.models.architectures import layout_of
from toolkit.models.shards import ShardedWeights, listed, non_finite
from toolkit.models.streaming import (
    SkeletonModel,
    check_config_sizes,
    empty_model,
    install_quantized,
    read_config,
    set_tensor,
    tied_head,
)
from toolkit.paths import code_identity, names_a_file_in, sha256_file, sha256_json, write_text_atomic
from toolkit.quant.modules import QuantEmbedding, quantized_modules

QUANT_FILE = "quantization.json"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
QUANT_FORMAT = "llm-toolkit-packed-v1"


def library_versions() -> dict[str, str]:
    """What a result depends on besides its inputs: library versions and the toolkit's own source hash."""
    import platform

    import numpy
    import onnx
    import onnxruntime
    import safetensors
    import tokenizers
    import transformers

    return {
        "toolkit": __version__,
        "toolkit_code": code_identity()[:16],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu_kernels(),
    }


def cpu_kernels() -> str:
    """The vector instruction set torch's CPU kernels (and MKL's, unless overridden) run with. GPTQ's codes depend
    on the summation order of its float reductions, so the same recipe lands on other codes on another one."""
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return torch.backends.cpu.get_cpu_capability() + (f" (MKL {mkl})" if mkl else "")


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(), **(extra or {})}
    manifest["files"] = file_table(folder)
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{folder} has no {MANIFEST}: it is not a toolkit artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-create the artifact") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise ToolkitError(f"{path} cannot be read ({type(exc).__name__}); re-create the artifact") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ToolkitError(f"{path} is not a toolkit manifest (no file table); re-create the artifact")
    return manifest


def verify_files(folder: Path, hashes: bool = True) -> list[str]:
    """Problems with ``folder`` against its manifest: missing, extra, resized or (``hashes``) altered files."""
    folder = Path(folder)
    try:
        files = read_manifest(folder).get("files", {})
    except ToolkitError as exc:
        return [str(exc)]
    if not files:
        return [f"{folder / MANIFEST} lists no files"]
    problems = []
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(present - set(files)):
        problems.append(f"{name}: not in the manifest")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not names_a_file_in(folder, name):
            problems.append(f"{name}: lies outside the folder (a manifest lists only its own files)")
        elif not isinstance(entry, dict):
            problems.append(f"{name}: no size and sha256 in the manifest")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif hashes and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def verify_tree(folder: Path) -> tuple[int, list[str]]:
    """Check every manifest under ``folder`` (an output holds its own, its model's and its export's)."""
    manifests = sorted(Path(folder).rglob(MANIFEST))
    if not manifests:
        return 0, [f"{folder} has no {MANIFEST}: it is not a toolkit artifact"]
    problems = []
    for manifest in manifests:
        where = manifest.parent.relative_to(folder)
        problems += [f"{where / p if str(where) != '.' else p}" for p in verify_files(manifest.parent)]
    return len(manifests), problems


KEY_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")


def weights_key(folder: Path) -> str:
    """Content key of a model folder: the sha256 of every file a load reads (weights, config, tokenizer).

    Hashed from the bytes, never taken from the manifest: an edited file changes the key.
    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.suffix in KEY_SUFFIXES and p.name != MANIFEST)
    return sha256_json({n: sha256_file(folder / n) for n in names})


def verify_weight_files(folder: Path) -> None:
    """Refuse truncated or corrupt safetensors files before anything is built from them."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ToolkitError(f"{folder} has no .safetensors weights")
    expected = read_manifest(folder).get("files", {}) if (Path(folder) / MANIFEST).is_file() else {}
    for path in files:
        entry = expected.get(path.name)
        want = entry.get("bytes") if isinstance(entry, dict) else None
        if want is not None and path.stat().st_size != want:
            raise ToolkitError(
                f"{path} is truncated or altered ({path.stat().st_size} bytes, manifest says {want}); re-create it"
            )
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except SafetensorError as exc:
            raise ToolkitError(f"{path} is truncated or corrupt ({exc}); re-create it") from None


def check_finite(model: PreTrainedModel, folder: Path) -> None:
    """Refuse NaN or Inf weights, naming the tensors, before any figure is computed from them."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise non_finite(folder, bad)


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
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.weight is getattr(embedding, "weight", None):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}  # a float tied head: once
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


def _quant_info(folder: Path) -> dict[str, Any]:
    """``quantization.json``, checked for the fields the loader reads."""
    path = folder / QUANT_FILE
    try:
        info = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ToolkitError(f"{path} is not valid JSON ({type(exc).__name__}); re-create the artifact") from None
    if not isinstance(info, dict) or info.get("format") != QUANT_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ToolkitError(f"{path}: unknown format {found!r}; expected {QUANT_FORMAT}")
    modules = info.get("modules")
    fields = {"bits": int, "group_size": int, "symmetric": bool, "in_features": int, "out_features": int, "bias": bool}
    if not isinstance(modules, dict) or not all(
        isinstance(m, dict) and all(isinstance(m.get(k), t) for k, t in fields.items()) for m in modules.values()
    ):
        raise ToolkitError(f"{path}: 'modules' must map module names to {{{', '.join(fields)}}}; re-create the artifact")
    return info


def _build_quantized(folder: Path, info: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The packed model, built on meta and filled tensor by tensor from one file or from shards, so
    loading holds the packed bytes once and never a float copy of the quantized weights. Float tensors
    (embedding, norms, a float head) take ``dtype``; packed codes, scales and zeros keep their own."""
    config = read_config(folder)
    weights = ShardedWeights(folder)
    check_config_sizes(config, weights, folder)
    model = empty_model(config, dtype)
    install_quantized(model, info, folder / QUANT_FILE)
    arch = layout_of(model)
    expected = dict(model.state_dict(keep_vars=True))
    weights.check_stored(expected, tied_head(model, arch), folder / WEIGHTS if (folder / WEIGHTS).is_file() else folder)
    for name in weights.names():
        set_tensor(model, name, weights.get(name).to(expected[name].dtype))
    head, embed = model.get_submodule(arch.head), model.get_submodule(arch.embed)
    if isinstance(head, nn.Linear) and head.weight.is_meta and config.tie_word_embeddings:
        head.weight = embed.weight  # a tied float head is stored once, under the embedding's name
    return model.eval()


def check_float_weights(folder: Path) -> None:
    """The check the streaming path makes (``SkeletonModel``), made before transformers loads ``folder``:
    every tensor's name, shape and dtype against the model ``config.json`` builds."""
    config = read_config(folder)
    weights = ShardedWeights(folder)
    check_config_sizes(config, weights, folder)
    model = empty_model(config)
    weights.check_stored(model.state_dict(keep_vars=True), tied_head(model, layout_of(model)))


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a float or quantized model from an artifact folder (one file or shards), computing in
    ``dtype``; refuse missing, unexpected or non-finite tensors."""
    folder = Path(folder)
    verify_weight_files(folder)
    if (folder / QUANT_FILE).is_file():
        model = _build_quantized(folder, _quant_info(folder), dtype)
    else:
        check_float_weights(folder)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ToolkitError(f"cannot load model from {folder}: {str(exc).splitlines()[0][:300]}") from None
        missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
        mismatched = {str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ())}
        if missing or unexpected or mismatched:
            raise ToolkitError(f"{folder}: the weights do not match config.json: missing {listed(missing) or 'none'}; "
                               f"unexpected {listed(unexpected) or 'none'}; wrong shape {listed(mismatched) or 'none'}. "
                               "Re-create the checkpoint (missing tensors would run as random weights)")
    check_finite(model, folder)
    return model.eval()


def check_weights(folder: Path) -> None:
    """Refuse, before any work, a checkpoint folder whose files are corrupt or whose tensors (names, shapes,
    dtypes: the shard headers) do not fit its config; values are checked as they are read."""
    open_streaming(folder, "meta")


def open_streaming(folder: Path, device: torch.device | str = "cpu") -> SkeletonModel:
    """A float or packed checkpoint folder opened for streaming (one module resident at a time)."""
    folder = Path(folder)
    verify_weight_files(folder)
    quant = _quant_info(folder) if (folder / QUANT_FILE).is_file() else None
    return SkeletonModel(folder, device=device, quant=quant)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        with panics_as_errors(f"cannot load the tokenizer from {folder}; re-create its tokenizer files"):
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
