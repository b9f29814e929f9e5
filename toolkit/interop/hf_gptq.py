"""Hugging Face GPTQ checkpoints (``quant_method: gptq``, read by transformers/optimum, vLLM, TGI): the
``quantization_config``, the tensor names of a packed linear and a reader that dequantizes a folder
independently of ``QuantLinear``.

Per quantized linear: ``<name>.qweight/.qzeros/.scales/.g_idx`` in the int32 layout of
``toolkit.quant.formats.GPTQInt32`` (``checkpoint_format: gptq``, zero points stored minus one) or
``GPTQv2Int32`` (``gptq_v2``); every other tensor float16, in ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toolkit.models.shards import SINGLE
from toolkit.quant.formats import GPTQInt32, GPTQv2Int32
from toolkit.quant.spec import QuantSpec

LAYOUTS: dict[str, type[GPTQInt32]] = {"gptq": GPTQInt32, "gptq_v2": GPTQv2Int32}  # checkpoint_format -> layout
CHECKPOINT_FORMATS = tuple(LAYOUTS)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
BITS = GPTQInt32.widths()  # widths that fill an int32 word exactly


def quantization_config(spec: QuantSpec, checkpoint_format: str) -> dict[str, Any]:
    """The keys every reader needs to unpack the codes; how they were made (GPTQ's damping, order) is the exporter's
    to add, and only when it knows (``passes.export_hf_gptq.provenance``)."""
    return {
        "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
        "sym": spec.symmetric, "static_groups": False, "checkpoint_format": checkpoint_format,
    }


def linear_tensors(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
                   checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the linear ``name``, keyed by their names in the file."""
    packed = LAYOUTS[checkpoint_format].pack(codes, scales, zeros, spec)
    return {f"{name}.{k}": v for k, v in packed.items()}


def read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` (with its quantization_config) and the float32 state: every packed linear's ``.weight``
    dequantized from its own four tensors (via ``g_idx``), the other tensors as stored."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    fmt = LAYOUTS[qc["checkpoint_format"]]
    state = load_file(str(folder / SINGLE))
    floats = {k: v.float() for k, v in state.items() if not k.endswith(tuple(f".{s}" for s in SUFFIXES))}
    for key in [k for k in state if k.endswith(".qweight")]:
        base = key[: -len(".qweight")]
        floats[f"{base}.weight"] = fmt.dequantize({s: state[f"{base}.{s}"] for s in SUFFIXES}, int(qc["bits"]))
    return config, floats
