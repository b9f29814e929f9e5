"""compressed-tensors ``pack-quantized`` checkpoints (the format llm-compressor writes; transformers and vLLM
read it): ``<linear>.weight_packed`` int32, ``.weight_scale``, ``.weight_shape`` and, when asymmetric,
``.weight_zero_point`` int32 packed along the output dimension (``toolkit.quant.formats.CompressedTensorsPacked``),
described by ``quantization_config`` with ``config_groups`` in ``config.json``.

``read`` checks a folder without the compressed-tensors package and dequantizes it independently of
``QuantLinear``; the exporter and the tests use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from toolkit.errors import ToolkitError
from toolkit.models.shards import SINGLE
from toolkit.quant.formats import CompressedTensorsPacked
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

FORMAT = "pack-quantized"
SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")


def linear_tensors(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the linear ``name`` (scales stored in their dtype), keyed by their names in the file."""
    return {f"{name}.{k}": v for k, v in CompressedTensorsPacked.pack(codes, scales, zeros, spec).items()}


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """A ``QuantizationArgs`` record for our weights (group -1, one group per row, is the channel strategy)."""
    return {"num_bits": spec.bits, "type": spec.type, "symmetric": spec.symmetric,
            "strategy": "channel" if spec.group_size == -1 else "group",
            "group_size": None if spec.group_size == -1 else spec.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}


def activation_args(spec: ActivationSpec) -> dict[str, Any]:
    """A ``QuantizationArgs`` record for our input activations: a dynamic scale needs no observer, a static one
    is the running min/max over calibration (compressed-tensors' ``static_minmax``)."""
    return {"num_bits": spec.bits, "type": spec.type, "symmetric": spec.symmetric, "strategy": spec.strategy,
            "group_size": None, "dynamic": spec.dynamic, "actorder": None,
            "observer": None if spec.dynamic else "static_minmax", "observer_kwargs": {}, "block_structure": None}


def scheme_group(scheme: QuantScheme, targets: list[str]) -> dict[str, Any]:
    """One ``config_groups`` entry: a ``QuantizationScheme`` record for ``scheme`` applied to ``targets``."""
    acts = scheme.input_activations
    return {"targets": targets, "weights": weights_args(scheme.weights),
            "input_activations": None if acts is None else activation_args(acts),
            "output_activations": None, "format": FORMAT}


def quantization_config(groups: dict[QuantScheme, list[str]], ignore: list[str]) -> dict[str, Any]:
    """``groups``: scheme -> target module names; a single scheme targets every ``Linear`` not ignored."""
    single = len(groups) == 1
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": scheme_group(scheme, ["Linear"] if single else sorted(names))
            for i, (scheme, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


@dataclass
class Packed:
    """One quantized linear as read from disk: our codes, float16-valued scales and zero points."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # [out, G] as stored
    zeros: torch.Tensor  # uint8 [out, G]

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        group = in_f // self.scales.shape[1]
        q = self.codes.to(torch.float32).reshape(out_f, -1, group)
        w = (q - self.zeros.to(torch.float32).unsqueeze(-1)) * self.scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(out_f, in_f)


def _spec_of(module: str, groups: dict[str, Any]) -> dict[str, Any]:
    for g in groups.values():
        if "Linear" in g["targets"] or module in g["targets"]:
            return dict(g["weights"])
    raise ToolkitError(f"{module} holds packed weights but no config group targets it")


def read(folder: Path) -> tuple[dict[str, Any], dict[str, Packed], dict[str, torch.Tensor]]:
    """``config.json`` (with its quantization_config), the packed linears and the float tensors of a folder.
    Raises ToolkitError with one line when the folder is incomplete, truncated or inconsistent."""
    folder = Path(folder)
    for name in ("config.json", SINGLE):
        if not (folder / name).is_file():
            raise ToolkitError(f"{folder}: not a compressed-tensors checkpoint: {name} is missing")
    try:
        config = json.loads((folder / "config.json").read_text())
        qc = config["quantization_config"]
        groups = qc["config_groups"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ToolkitError(f"{folder}/config.json: no readable quantization_config ({type(exc).__name__}: {exc})") from None
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT:
        raise ToolkitError(f"{folder}: quantization_config is not compressed-tensors {FORMAT} "
                           f"(quant_method {qc.get('quant_method')!r}, format {qc.get('format')!r})")
    try:
        state = load_file(str(folder / SINGLE))
    except (SafetensorError, OSError) as exc:
        raise ToolkitError(f"{folder}/{SINGLE}: unreadable (truncated or corrupt): {exc}") from None
    packed: dict[str, Packed] = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        module = key[: -len(".weight_packed")]
        packed[module] = _unpack(module, state, _spec_of(module, groups), folder)
    floats = {k: v for k, v in state.items() if not k.endswith(SUFFIXES)}
    return config, packed, floats


def _unpack(module: str, state: dict[str, torch.Tensor], args: dict[str, Any], folder: Path) -> Packed:
    bits, symmetric = int(args["num_bits"]), bool(args["symmetric"])
    where = f"{folder}: {module}"
    for suffix in (".weight_scale", ".weight_shape") + (() if symmetric else (".weight_zero_point",)):
        if module + suffix not in state:
            raise ToolkitError(f"{where}: inconsistent checkpoint: {module}{suffix} is missing")
    out_f, in_f = (int(x) for x in state[module + ".weight_shape"].tolist())
    scales = state[module + ".weight_scale"]
    group = in_f if args.get("group_size") in (None, -1) else int(args["group_size"])
    if in_f % group or tuple(scales.shape) != (out_f, in_f // group):
        raise ToolkitError(f"{where}: inconsistent checkpoint: weight_scale has shape {list(scales.shape)}, "
                           f"a [{out_f}, {in_f}] weight in groups of {group} needs [{out_f}, {in_f // group}]")
    tensors = {s[1:]: state[module + s] for s in SUFFIXES if module + s in state}
    try:
        spec = QuantSpec(bits, -1 if group == in_f else group, symmetric)
        codes, scales, zeros = CompressedTensorsPacked.unpack(tensors, spec, (out_f, in_f))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ToolkitError(f"{where}: inconsistent checkpoint: {exc}") from None
    if zeros.shape != scales.shape:
        raise ToolkitError(f"{where}: inconsistent checkpoint: zero points {list(zeros.shape)} vs scales {list(scales.shape)}")
    return Packed(codes, scales, zeros)
