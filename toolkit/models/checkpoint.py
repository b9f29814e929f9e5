"""Float checkpoint folders on disk: a Hugging Face-style folder (``config.json``, tokenizer files, safetensors
weights in one file or shards), saved with ``save_pretrained`` and so loadable by any transformers user.

Every read is checked before anything is built: the files against their manifest's sizes and as safetensors,
the tensors' names, shapes and dtypes against the model ``config.json`` describes, their values for NaN or Inf.
A packed (quantized) folder is the same folder plus the record ``toolkit.quant.checkpoint`` owns; that module
loads either kind.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from toolkit.errors import ToolkitError, panics_as_errors
from toolkit.manifest import MANIFEST, read_manifest
from toolkit.models.architectures import layout_of
from toolkit.models.shards import ShardedWeights, finite, listed, non_finite
from toolkit.models.streaming import check_config_sizes, empty_model, read_config, tied_head
from toolkit.paths import sha256_file, sha256_json

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
    bad = [name for name, t in model.state_dict().items() if not finite(t)]
    if bad:
        raise non_finite(folder, bad)


def check_float_weights(folder: Path) -> None:
    """The check the streaming path makes (``SkeletonModel``), made before transformers loads ``folder``:
    every tensor's name, shape and dtype against the model ``config.json`` builds."""
    config = read_config(folder)
    weights = ShardedWeights(folder)
    check_config_sizes(config, weights, folder)
    model = empty_model(config)
    weights.check_stored(model.state_dict(keep_vars=True), tied_head(model, layout_of(model)))


def float_model(config: dict, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A float32 model built from a ``config.json`` dict (its ``quantization_config`` ignored) and a complete state
    dict, for exporters that check their own folder independently of the quantized modules; refuses a missing or
    unexpected tensor (a tied head may be absent)."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                 dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ToolkitError(f"the exported checkpoint is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def load_float(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a float model from a checkpoint folder (one file or shards), computing in ``dtype``; refuse
    corrupt files and missing, unexpected or non-finite tensors."""
    folder = Path(folder)
    verify_weight_files(folder)
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


def config_dict(model: PreTrainedModel) -> dict:
    """``config.json``'s content as ``save_pretrained`` writes it, for exporters that write their own folder: the
    class that loads it named in ``architectures`` (vLLM picks its model by that name; without it a model made from
    a config, as the tiny ones are, loads in vLLM as the headless base model, an embedding runner), and no
    ``_name_or_path`` (where this process read the model from)."""
    d = model.config.to_dict()
    d.pop("_name_or_path", None)
    d["architectures"] = [type(model).__name__]
    return d


def save_float(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write a float ``model`` and ``tokenizer`` into ``folder`` (which the caller makes atomic), loadable by
    any transformers user."""
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        with panics_as_errors(f"cannot load the tokenizer from {folder}; re-create its tokenizer files"):
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
