"""NVIDIA ModelOpt's unified Hugging Face checkpoint for FP8 (what TensorRT-LLM and vLLM's ``modelopt`` loader
read): ``hf_quant_config.json`` with ``quantization.quant_algo``, the same in ``config.json``'s
``quantization_config`` (``quant_method: modelopt``), and per linear ``weight`` float8_e4m3fn ``[out, in]``
with ``weight_scale`` float32. Two algorithms:

- ``FP8_PER_CHANNEL_PER_TOKEN``: one weight scale per output channel (``weight_scale: [out]``), activations
  quantized per token at run time (no ``input_scale``): our ``fp8_dynamic`` scheme.
- ``FP8``: one weight scale per tensor and one calibrated input scale per tensor, both float32 scalars (shape
  ``[]``, ModelOpt's ``amax / 448``): compressed-tensors' ``FP8`` preset. ModelOpt's export gives linears vLLM fuses
  (q/k/v, gate/up) the largest of their weight and input scales, and vLLM requantizes unequal ones to the largest.

An fp8 KV cache is ``kv_cache_quant_algo: FP8`` (``hf_quant_config.json``; ``kv_cache_scheme`` in ``config.json``) with
a float32 scalar ``k_scale`` on the key projection and ``v_scale`` on the value projection of each attention layer
(``model.layers.N.self_attn.k_proj.k_scale``, ``...v_proj.v_scale``; a fused ``qkv_proj`` holds both), where ModelOpt
writes them and vLLM's loader maps them to its attention layer.

``read`` checks a folder without the ModelOpt package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit import __version__
from toolkit.errors import ToolkitError
from toolkit.models.shards import SINGLE, load_single

HF_QUANT_CONFIG = "hf_quant_config.json"
PER_CHANNEL = "FP8_PER_CHANNEL_PER_TOKEN"
PER_TENSOR = "FP8"
ALGOS = (PER_CHANNEL, PER_TENSOR)
KV_FP8 = "FP8"  # kv_cache_quant_algo
KV_SCHEME = {"num_bits": 8, "type": "float", "dynamic": False}  # config.json's kv_cache_scheme, as vLLM reads it
KV_SUFFIXES = (".k_scale", ".v_scale")


def kv_tensors(projections: dict[str, tuple[str, str]],
               scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``<k projection>.k_scale`` and ``<v projection>.v_scale`` float32 scalars; ``projections`` maps each attention
    module to its key and value projections' full names."""
    out = {}
    for name, (k, v) in scales.items():
        k_proj, v_proj = projections[name]
        out[f"{k_proj}.k_scale"] = k.to(torch.float32).reshape(())
        out[f"{v_proj}.v_scale"] = v.to(torch.float32).reshape(())
    return out


def hf_quant_config(algo: str, exclude: list[str], fp8_kv: bool = False) -> dict[str, Any]:
    """``hf_quant_config.json``: the producer, the algorithm, the KV cache's and the modules left in float."""
    return {"producer": {"name": "llm-toolkit", "version": __version__},
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": KV_FP8 if fp8_kv else None,
                             "exclude_modules": sorted(exclude)}}


def quantization_config(algo: str, exclude: list[str], fp8_kv: bool = False) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: the keys vLLM's ``ModelOptFp8Config`` reads there."""
    return {"quant_method": "modelopt", "quant_algo": algo, "kv_cache_scheme": dict(KV_SCHEME) if fp8_kv else None,
            "ignore": sorted(exclude), "producer": {"name": "llm-toolkit", "version": __version__}}


def scale_shape(algo: str, out_features: int) -> tuple[int, ...]:
    """The ``weight_scale`` shape of an ``[out, in]`` weight: ``[out]`` per channel, a scalar per tensor."""
    return (out_features,) if algo == PER_CHANNEL else ()


def linear_tensors(name: str, algo: str, weight: torch.Tensor, scale: torch.Tensor,
                   input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """An fp8 linear's tensors: ``weight`` e4m3 ``[out, in]``, its float32 ``weight_scale`` (``scale_shape``) and,
    for ``FP8``, the static ``input_scale`` (a float32 scalar)."""
    out = {f"{name}.weight": weight.contiguous(),
           f"{name}.weight_scale": scale.to(torch.float32).reshape(scale_shape(algo, weight.shape[0]))}
    if input_scale is not None:
        out[f"{name}.input_scale"] = input_scale.to(torch.float32).reshape(())
    return out


@dataclass
class FP8Weight:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # float32 [out] (per channel) or [] (per tensor)
    input_scale: torch.Tensor | None = None  # float32 [] (FP8: static per tensor); None: dynamic per token

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.scale.reshape(-1, 1)


def _configs(folder: Path) -> str:
    """The algorithm both config files name; one-line ToolkitError when they are missing, unreadable or disagree."""
    for name in ("config.json", HF_QUANT_CONFIG, SINGLE):
        if not (folder / name).is_file():
            raise ToolkitError(f"{folder}: not a ModelOpt FP8 checkpoint: {name} is missing")
    try:
        config = json.loads((folder / "config.json").read_text())
        hf = json.loads((folder / HF_QUANT_CONFIG).read_text())
        algos = (config["quantization_config"]["quant_algo"], hf["quantization"]["quant_algo"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ToolkitError(f"{folder}: no readable ModelOpt quantization config ({type(exc).__name__}: {exc})") from None
    if algos[0] != algos[1] or algos[0] not in ALGOS:
        raise ToolkitError(f"{folder}: quant_algo {algos[0]!r} (config.json) / {algos[1]!r} ({HF_QUANT_CONFIG}); "
                           f"this reader holds {' or '.join(ALGOS)}, named alike in both")
    return str(algos[0])


def read(folder: Path) -> tuple[dict[str, Any], str, dict[str, FP8Weight], dict[str, torch.Tensor]]:
    """``config.json``, the algorithm, the fp8 linears and the float tensors of a folder; one-line ToolkitError when
    the folder is incomplete, its two configs disagree or a linear's scales do not fit the algorithm."""
    folder = Path(folder)
    algo = _configs(folder)
    config = json.loads((folder / "config.json").read_text())
    state = load_single(folder)
    linears: dict[str, FP8Weight] = {}
    for key in [k for k, v in state.items() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn]:
        module = key[: -len(".weight")]
        scale, input_scale = state.get(module + ".weight_scale"), state.get(module + ".input_scale")
        expected = scale_shape(algo, state[key].shape[0])
        if scale is None or tuple(scale.shape) != expected:
            found = None if scale is None else list(scale.shape)
            raise ToolkitError(f"{folder}: {module}: weight_scale is {found}, a {algo} weight needs {list(expected)}")
        wanted = () if algo == PER_TENSOR else None  # FP8's static input scale is a scalar; per-token has none
        found_input = None if input_scale is None else tuple(input_scale.shape)
        if found_input != wanted:
            have = "missing" if found_input is None else list(found_input)
            raise ToolkitError(f"{folder}: {module}: input_scale is {have}, "
                               f"{algo} needs {'a scalar []' if wanted is not None else 'none'}")
        linears[module] = FP8Weight(state[key], scale, input_scale)
    suffixes = (".weight_scale", ".input_scale", *KV_SUFFIXES)
    floats = {k: v for k, v in state.items() if not k.endswith(suffixes) and k[: -len(".weight")] not in linears}
    return config, algo, linears, floats


def read_kv_cache(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Each attention module's ``(k_scale, v_scale)`` (the module owning the projections that hold them), or None when
    the folder's ``kv_cache_quant_algo`` is null; one-line ToolkitError when the configs and the tensors disagree."""
    folder = Path(folder)
    hf = json.loads((folder / HF_QUANT_CONFIG).read_text())["quantization"].get("kv_cache_quant_algo")
    scheme = json.loads((folder / "config.json").read_text())["quantization_config"].get("kv_cache_scheme")
    state = load_single(folder)
    found = {k: v for k, v in state.items() if k.endswith(KV_SUFFIXES)}
    if (hf is None) != (scheme is None) or hf not in (None, KV_FP8):
        raise ToolkitError(f"{folder}: kv_cache_quant_algo {hf!r} ({HF_QUANT_CONFIG}) and kv_cache_scheme {scheme!r} "
                           f"(config.json) disagree; this reader holds {KV_FP8} or none")
    if hf is None:
        if found:
            raise ToolkitError(f"{folder}: KV cache scales without a kv_cache_quant_algo")
        return None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in found.items():
        projection, _, kind = key.rpartition(".")
        if tuple(t.shape) != () or t.dtype != torch.float32:
            raise ToolkitError(f"{folder}: {key} must be a float32 scalar [], got {t.dtype} {list(t.shape)}")
        pairs.setdefault(projection.rpartition(".")[0], {})[kind] = t
    incomplete = sorted(n for n, p in pairs.items() if set(p) != {"k_scale", "v_scale"})
    if incomplete or not pairs:
        raise ToolkitError(f"{folder}: kv_cache_quant_algo {KV_FP8} needs a k_scale and a v_scale per attention "
                           f"layer; incomplete: {incomplete[:3] or 'all'}")
    return {n: (p["k_scale"], p["v_scale"]) for n, p in sorted(pairs.items())}
