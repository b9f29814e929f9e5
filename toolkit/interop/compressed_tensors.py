"""compressed-tensors checkpoints (the formats llm-compressor writes; transformers, vLLM and TensorRT-LLM read them),
described by ``quantization_config`` with ``config_groups`` in ``config.json``:

- ``pack-quantized`` (integer weights, float activations): ``<linear>.weight_packed`` int32, ``.weight_scale``,
  ``.weight_shape`` and, when asymmetric, ``.weight_zero_point`` int32 packed along the output dimension
  (``toolkit.quant.formats.CompressedTensorsPacked``);
- ``int-quantized`` (W8A8: int8 per-channel symmetric weights, int8 activations) and ``float-quantized`` (fp8 e4m3
  weights, per channel or per tensor (the ``FP8`` preset), fp8 activations): ``<linear>.weight`` int8 /
  float8_e4m3fn ``[out, in]``, ``.weight_scale`` float32 ``[out, 1]`` (tensor strategy: ``[1]``) and, for static
  activations, ``.input_scale`` float32 ``[1]``, which
  vLLM's ``CompressedTensorsW8A8Int8`` / ``CompressedTensorsW8A8Fp8`` schemes load (``naive-quantized``: the same
  tensors for fp8 weights with float activations).

An fp8 KV cache (``kv_cache_scheme``: fp8, one static scale per tensor) adds ``<attention>.k_scale`` and
``.v_scale`` float32 ``[1]`` per attention layer (``model.layers.N.self_attn.k_scale``), the names llm-compressor
writes and vLLM's compressed-tensors KV cache method loads.

``read`` checks a folder without the compressed-tensors package and dequantizes it independently of
``QuantLinear``; the exporter and the tests use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import ToolkitError
from toolkit.models.shards import SINGLE, load_single
from toolkit.quant.formats import CompressedTensorsPacked
from toolkit.quant.spec import ActivationSpec, KVCacheSpec, QuantScheme, QuantSpec

FORMAT = "pack-quantized"
DENSE_FORMATS = ("int-quantized", "float-quantized", "naive-quantized")  # one 8-bit value per weight, not packed
MIXED = "mixed-precision"  # the top-level format when config groups use several
KV_SUFFIXES = (".k_scale", ".v_scale")  # of an attention module
SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".input_scale", *KV_SUFFIXES)
DENSE_DTYPES = (torch.int8, torch.float8_e4m3fn)


def format_of(scheme: QuantScheme) -> str:
    """The compressed-tensors format that holds ``scheme`` (as llm-compressor infers it)."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "float-quantized" if a is not None else "naive-quantized"
    return "int-quantized" if a is not None and w.bits == 8 else FORMAT


def scale_shape(weight_shape: tuple[int, ...] | torch.Size, per_tensor: bool) -> tuple[int, ...]:
    """The ``weight_scale`` shape compressed-tensors gives an 8-bit ``[out, in]`` weight: ``[out, 1]`` per channel,
    ``[1]`` per tensor."""
    return (1,) if per_tensor else (weight_shape[0], 1)


def dense_tensors(name: str, weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None,
                  per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """An 8-bit linear's tensors: ``weight`` int8 (signed codes ``q - 128``) or fp8, float32 scales (per channel
    ``[out, 1]``, per tensor ``[1]``), and a static ``input_scale`` ``[1]``."""
    out = {f"{name}.weight": weight.contiguous(),
           f"{name}.weight_scale": scale.to(torch.float32).reshape(scale_shape(weight.shape, per_tensor))}
    if input_scale is not None:
        out[f"{name}.input_scale"] = input_scale.to(torch.float32).reshape(1)
    return out


def linear_tensors(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the linear ``name`` (scales stored in their dtype), keyed by their names in the file."""
    return {f"{name}.{k}": v for k, v in CompressedTensorsPacked.pack(codes, scales, zeros, spec).items()}


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """A ``QuantizationArgs`` record for our weights (group -1, one group per row, is the channel strategy)."""
    strategy = "tensor" if spec.per_tensor else "channel" if spec.group_size == -1 else "group"
    return {"num_bits": spec.bits, "type": spec.type, "symmetric": spec.symmetric, "strategy": strategy,
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
            "output_activations": None, "format": format_of(scheme)}


def kv_cache_args(spec: KVCacheSpec) -> dict[str, Any]:
    """``kv_cache_scheme``: a ``QuantizationArgs`` record of static per-tensor fp8 keys and values."""
    return {"num_bits": spec.bits, "type": spec.type, "symmetric": True, "strategy": spec.strategy,
            "group_size": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            "block_structure": None}


def kv_tensors(scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``<attention>.k_scale`` / ``.v_scale`` float32 ``[1]`` for each attention module's ``(k_scale, v_scale)``."""
    return {f"{name}{suffix}": s.to(torch.float32).reshape(1)
            for name, pair in scales.items() for suffix, s in zip(KV_SUFFIXES, pair, strict=True)}


def quantization_config(groups: dict[QuantScheme, list[str]], ignore: list[str],
                        kv_cache: KVCacheSpec | None = None) -> dict[str, Any]:
    """``groups``: scheme -> target module names; a single scheme targets every ``Linear`` not ignored."""
    single = len(groups) == 1
    formats = {format_of(scheme) for scheme in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": scheme_group(scheme, ["Linear"] if single else sorted(names))
            for i, (scheme, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None if kv_cache is None else kv_cache_args(kv_cache),
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


@dataclass
class Dense:
    """One 8-bit linear as read from disk (``int-quantized`` / ``float-quantized``): its weight (int8 signed codes
    or fp8), scales (per channel ``[out, 1]``, per tensor ``[1]``), the static input scale, and the input
    activations' args."""

    weight: torch.Tensor
    scales: torch.Tensor
    input_scale: torch.Tensor | None
    input_activations: ActivationSpec | None

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.scales.to(torch.float32)


def _group_of(module: str, groups: dict[str, Any]) -> dict[str, Any]:
    for g in groups.values():
        if "Linear" in g["targets"] or module in g["targets"]:
            return dict(g)
    raise ToolkitError(f"{module} holds quantized weights but no config group targets it")


def _spec_of(module: str, groups: dict[str, Any]) -> dict[str, Any]:
    return dict(_group_of(module, groups)["weights"])


def _activations(args: dict[str, Any] | None) -> ActivationSpec | None:
    if args is None:
        return None
    return ActivationSpec(args["type"], int(args["num_bits"]), args["strategy"], bool(args["dynamic"]),
                          bool(args["symmetric"]))


def read(folder: Path) -> tuple[dict[str, Any], dict[str, Packed | Dense], dict[str, torch.Tensor]]:
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
    readable = (FORMAT, *DENSE_FORMATS, MIXED)
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") not in readable:
        raise ToolkitError(f"{folder}: quantization_config is not compressed-tensors {' / '.join(readable)} "
                           f"(quant_method {qc.get('quant_method')!r}, format {qc.get('format')!r})")
    state = load_single(folder)
    packed: dict[str, Packed | Dense] = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        module = key[: -len(".weight_packed")]
        packed[module] = _unpack(module, state, _spec_of(module, groups), folder)
    dense = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dtype in DENSE_DTYPES]
    for module in dense:
        packed[module] = _dense(module, state, _group_of(module, groups), folder)
    floats = {k: v for k, v in state.items()
              if not k.endswith(SUFFIXES) and k[: -len(".weight")] not in dense}
    return config, packed, floats


def read_kv_cache(folder: Path) -> tuple[KVCacheSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
    """The folder's KV cache: its scheme and each attention module's ``(k_scale, v_scale)``, or None (a float cache);
    one-line ToolkitError when the scheme and the tensors disagree."""
    folder = Path(folder)
    args = json.loads((folder / "config.json").read_text())["quantization_config"].get("kv_cache_scheme")
    state = load_single(folder)
    found = {k[: -len(s)]: s for k in state for s in KV_SUFFIXES if k.endswith(s)}
    if args is None:
        if found:
            raise ToolkitError(f"{folder}: inconsistent checkpoint: KV cache scales without a kv_cache_scheme")
        return None
    try:
        spec = KVCacheSpec(args["type"], int(args["num_bits"]), args["strategy"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ToolkitError(f"{folder}: kv_cache_scheme is not an fp8 per-tensor cache ({exc})") from None
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in sorted(found):
        pair = tuple(state.get(module + s) for s in KV_SUFFIXES)
        if any(t is None or tuple(t.shape) != (1,) or t.dtype != torch.float32 for t in pair):
            raise ToolkitError(f"{folder}: {module}: k_scale and v_scale must both be float32 [1]")
        scales[module] = pair  # type: ignore[assignment]
    if not scales:
        raise ToolkitError(f"{folder}: inconsistent checkpoint: a kv_cache_scheme without k_scale / v_scale tensors")
    return spec, scales


def _dense(module: str, state: dict[str, torch.Tensor], group: dict[str, Any], folder: Path) -> Dense:
    where = f"{folder}: {module}"
    weight, scales = state[module + ".weight"], state.get(module + ".weight_scale")
    acts = _activations(group.get("input_activations"))
    strategy = group["weights"].get("strategy")
    expected = scale_shape(weight.shape, strategy == "tensor")
    if scales is None or tuple(scales.shape) != expected:
        found = None if scales is None else list(scales.shape)
        raise ToolkitError(f"{where}: inconsistent checkpoint: weight_scale is {found}, a {list(weight.shape)} weight "
                           f"of strategy {strategy} needs {list(expected)}")
    input_scale = state.get(module + ".input_scale")
    if (acts is not None and not acts.dynamic) != (input_scale is not None):
        raise ToolkitError(f"{where}: inconsistent checkpoint: input_scale is "
                           f"{'missing' if input_scale is None else 'present'} for {acts and acts.name} activations")
    return Dense(weight, scales, input_scale, acts)


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
