"""NVIDIA ModelOpt's unified Hugging Face checkpoint for FP8 (what TensorRT-LLM and vLLM's ``modelopt`` loader
read): ``hf_quant_config.json`` with ``quantization.quant_algo``, the same in ``config.json``'s
``quantization_config`` (``quant_method: modelopt``), and per linear ``weight`` float8_e4m3fn ``[out, in]``
with ``weight_scale`` float32.

``FP8_PER_CHANNEL_PER_TOKEN``: one weight scale per output channel (``weight_scale: [out]``), activations quantized
per token at run time (no ``input_scale``): our ``fp8_dynamic`` scheme. (``FP8``, per-tensor weight and static input
scales, has no pass writing it yet.) ``read`` checks a folder without the ModelOpt package.
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
ALGO = "FP8_PER_CHANNEL_PER_TOKEN"


def hf_quant_config(exclude: list[str]) -> dict[str, Any]:
    """``hf_quant_config.json``: the producer, the algorithm and the modules left in float."""
    return {"producer": {"name": "llm-toolkit", "version": __version__},
            "quantization": {"quant_algo": ALGO, "kv_cache_quant_algo": None, "exclude_modules": sorted(exclude)}}


def quantization_config(exclude: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: the keys vLLM's ``ModelOptFp8Config`` reads there."""
    return {"quant_method": "modelopt", "quant_algo": ALGO, "kv_cache_scheme": None, "ignore": sorted(exclude),
            "producer": {"name": "llm-toolkit", "version": __version__}}


def linear_tensors(name: str, weight: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """An fp8 linear's tensors: ``weight`` e4m3 ``[out, in]`` and its per-channel ``weight_scale`` ``[out]``."""
    return {f"{name}.weight": weight.contiguous(), f"{name}.weight_scale": scale.to(torch.float32).reshape(-1)}


@dataclass
class FP8Weight:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # float32 [out]

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.scale.view(-1, 1)


def read(folder: Path) -> tuple[dict[str, Any], dict[str, FP8Weight], dict[str, torch.Tensor]]:
    """``config.json``, the fp8 linears and the float tensors of a folder; one-line ToolkitError when the folder is
    incomplete or its two configs disagree."""
    folder = Path(folder)
    for name in ("config.json", HF_QUANT_CONFIG, SINGLE):
        if not (folder / name).is_file():
            raise ToolkitError(f"{folder}: not a ModelOpt FP8 checkpoint: {name} is missing")
    try:
        config = json.loads((folder / "config.json").read_text())
        hf = json.loads((folder / HF_QUANT_CONFIG).read_text())
        algos = (config["quantization_config"]["quant_algo"], hf["quantization"]["quant_algo"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ToolkitError(f"{folder}: no readable ModelOpt quantization config ({type(exc).__name__}: {exc})") from None
    if algos != (ALGO, ALGO):
        raise ToolkitError(f"{folder}: quant_algo {algos[0]!r} (config.json) / {algos[1]!r} ({HF_QUANT_CONFIG}); "
                           f"this reader holds {ALGO}")
    state = load_single(folder)
    linears: dict[str, FP8Weight] = {}
    for key in [k for k, v in state.items() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn]:
        module = key[: -len(".weight")]
        scale = state.get(module + ".weight_scale")
        if scale is None or tuple(scale.shape) != (state[key].shape[0],):
            found = None if scale is None else list(scale.shape)
            raise ToolkitError(f"{folder}: {module}: weight_scale is {found}, a per-channel weight needs "
                               f"[{state[key].shape[0]}]")
        linears[module] = FP8Weight(state[key], scale)
    floats = {k: v for k, v in state.items()
              if not k.endswith(".weight_scale") and k[: -len(".weight")] not in linears}
    return config, linears, floats
