"""GPTQ weight quantization (Frantar et al. 2022), layer by layer on calibration windows.

Each decoder layer is calibrated on the outputs of the already-quantized layers before it. Inside a
layer, true-sequential order (q/k/v, o, gate/up, down) lets later linears see the quantized earlier
ones. Linears reading the same input share one Hessian and are quantized as one concatenated matrix.
Integer codes, or fp8 e4m3 weights (``type: float``, one
scale per output channel: GPTQ's error feedback on the e4m3 grid, the same FP8 checkpoint RTN writes). The head is
RTN (8 bits: near-lossless) or, with ``lm_head_method: gptq``, GPTQ calibrated on the final
norm's output. Per-layer results (the dampening actually used, dead input channels) go to
``<workdir>/gptq.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.algorithms.gptq import MAX_DAMP, float_target, gptq_quantize
from toolkit.errors import ToolkitError
from toolkit.evaluation.sensitivity import KeepFloat, keep_float_groups
from toolkit.models.architectures import layout_of
from toolkit.models.shape import ModelShape
from toolkit.models.streaming import SkeletonModel
from toolkit.passes.base import QuantPassConfig
from toolkit.passes.context import PassContext
from toolkit.quant.arithmetic import dequantize, fake_quantize_activations, fp8_dequantize
from toolkit.quant.calibration import (
    LayerInputs,
    LayerPair,
    check_finite,
    stream_input_pairs,
    stream_inputs,
    stream_module_inputs,
    walk_layer_pairs,
    walk_layers,
)
from toolkit.quant.modules import QuantizedLinear
from toolkit.quant.moments import InputMoments, PairedMoments
from toolkit.quant.spec import ActivationSpec, QuantSpec
from toolkit.quant.streaming import (
    PackedWriter,
    StreamOptions,
    head_bias,
    head_inputs_hessian,
    stream_calibrated,
)
from toolkit.quant.surgery import (
    LinearCodes,
    check_group_size,
    install,
    install_fp8,
    quantize_head,
    static_input_scales,
    target_linears,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig(QuantPassConfig):
    name: ClassVar[str] = "gptq"
    reads_calibration: ClassVar[bool] = True

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal; raised x10 automatically if needed
    block_size: int = 128  # lazy-update block (GPTQ sec. 3, step 2); rounded to a multiple of the group
    act_order: bool = True  # columns by descending diag H, static groups (ordinary packed layout)
    true_sequential: bool = True  # later linears of a layer see the quantized earlier ones
    # how the head (at lm_head_bits) is quantized: "rtn": symmetric round-to-nearest (near-lossless at 8 bits);
    # "gptq": GPTQ on its input (the final norm's output under the quantized body), with this config's symmetry
    lm_head_method: Literal["rtn", "gptq"] = "rtn"
    batch_size: int = 8  # calibration windows per forward
    # GPTAQ's asymmetric calibration (Li et al. 2025): H from the inputs each linear gets in the quantized model as
    # deployed (earlier linears installed, input activations rounded as the kernel rounds them), the target from
    # the float model's output W·X (``toolkit.algorithms.gptq.float_target``); in memory only. On SmolLM2 FP8 dynamic
    # with 32 windows it was worse than plain GPTQ (benchmarks/activation_quality.py): off by default
    asymmetric: bool = False
    # fp8 weights: each row's scale is the multiple of absmax / 448 (0.80 ... 1.25) with the least diag(H)-weighted
    # rounding error (``toolkit.quant.arithmetic.fp8_searched_scale``), chosen before the sweep; still one per channel.
    # On SmolLM2 FP8 dynamic it lowered the layers' error but not the perplexity (activation_quality.py): off by default
    scale_search: bool = False
    # mixed precision chosen by measurement: the fused groups (q/k/v, o, gate/up, down) whose quantization alone
    # costs the most KL against the float model on calibration windows stay float, up to a share of the weights
    # (``toolkit.evaluation.sensitivity``); the choice goes to gptq.json. In memory only (it scores whole forwards)
    keep_float: KeepFloat | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp <= MAX_DAMP:
            raise ValueError(f"damp must be in (0, {MAX_DAMP}] (a fraction of mean(diag H); 0.01 is usual), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive number of columns (128 is usual), got {self.block_size}")
        if self.lm_head_method == "gptq" and self.lm_head_bits is None:
            raise ValueError("lm_head_method 'gptq' needs lm_head_bits (4 or 8): a float head is not quantized")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 window, got {self.batch_size}")
        if self.scale_search and self.type != "float":
            raise ValueError("scale_search picks fp8 per-channel weight scales: use it with type: float (integer "
                             "scales come from min/max; awq searches integer clipping)")

    @property
    def spec(self) -> QuantSpec:
        """GPTQ writes integer or fp8 codes (fp8 with one scale per output channel) and runs quantized input
        activations too (int8 W8A8, FP8)."""
        spec = self.scheme.runnable(self.name)
        if spec.per_tensor:
            raise ToolkitError(f"{self.name} rounds fp8 weights with one scale per output channel; one scale per "
                               "tensor (strategy: tensor) is rounded by rtn: use rtn, or group_size: -1 without "
                               "strategy: tensor here")
        return spec

    def streams(self) -> bool:
        """Asymmetric calibration carries the float model's hidden states beside the quantized ones, and keep_float
        scores forwards of the whole model: in memory."""
        return super().streams() and not self.asymmetric and self.keep_float is None

    def in_memory_bytes(self, shape: ModelShape, calibration_tokens: int) -> float:
        """Asymmetric calibration also carries the float model's hidden states (float32); keep_float its scorer."""
        extra = 4 * calibration_tokens * shape.hidden if self.asymmetric else 0
        if self.keep_float is not None:  # its scorer: the float log-probabilities, one batch's logits, every
            # layer's float input, on its windows (counted here as up to 2,048 tokens each)
            tokens = min(calibration_tokens, 2048 * self.keep_float.windows)
            layers = shape.parameters // max(shape.layer_parameters, 1)  # at least the decoder layers
            extra += 4 * tokens * (3 * shape.vocab + shape.hidden * layers)
        return super().in_memory_bytes(shape, calibration_tokens) + extra

    def streaming_bytes(self, shape: ModelShape, calibration_tokens: int, activations_budget: int) -> float:
        """A GPTQ head also holds the head's float32 weight while the body's hidden states are carried."""
        head = 4 * shape.embedding_parameters if self.lm_head_method == "gptq" else 0
        return super().streaming_bytes(shape, calibration_tokens, activations_budget) + head


def _groups(model: PreTrainedModel, prefix: str, targets: dict[str, nn.Linear]) -> list[list[str]]:
    """Full names of the target linears of one layer, grouped by shared input, in execution order."""
    groups = [[f"{prefix}.{rel}" for rel in group if f"{prefix}.{rel}" in targets]
              for group in layout_of(model).sequential_groups()]
    return [g for g in groups if g]


def _hessians(layer: nn.Module, prefix: str, inputs: LayerInputs, names: list[str]) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n (GPTQ eq. 1) for the input of each named linear (relative to ``layer``)."""
    modules = {n: layer.get_submodule(n[len(prefix) + 1 :]) for n in names}
    device = next(iter(modules.values())).weight.device
    moments = {n: InputMoments(m.in_features, device=device) for n, m in modules.items()}  # type: ignore[arg-type]
    stream_inputs(layer, inputs, modules, lambda name, x: moments[name].add(x))
    return {n: moments[n].hessian() for n in names}


def _quantize_group(model: PreTrainedModel, names: list[str], h: torch.Tensor, config: GPTQConfig,
                    done: list[LinearCodes], delta: torch.Tensor | None = None) -> dict[str, Any]:
    """GPTQ on the row-concatenation of linears sharing one input; with ``delta`` (asymmetric calibration) on the
    float target ``W*`` rather than ``W``.

    Each linear keeps computing in float with its dequantized weight (the same function as the
    QuantLinear, without unpacking codes on every calibration batch) until ``done`` is installed.
    """
    linears = [model.get_submodule(n) for n in names]
    for n, m in zip(names, linears, strict=True):
        check_finite(m.weight, f"the weight of {n}")
    w = torch.cat([m.weight.detach() for m in linears])  # type: ignore[misc]
    found: dict[str, Any] = {}
    if delta is not None:
        target = float_target(w, h, delta, config.damp)
        found["target_shift"] = float((target - w).norm() / w.norm().clamp(min=1e-30))  # ‖W* − W‖ / ‖W‖
        w = target
    try:
        res = gptq_quantize(w, h, config.spec, config.damp, config.block_size, config.act_order,
                            scale_search=config.scale_search)
    except ToolkitError as exc:
        raise ToolkitError(f"GPTQ failed on {', '.join(names)}: {exc}") from None
    if res.damp != config.damp:
        log.warning("GPTQ on %s needed dampening %g (asked %g)", names[0], res.damp, config.damp)
    row = 0
    for n, m in zip(names, linears, strict=True):
        rows = slice(row, row + m.out_features)  # type: ignore[operator]
        q = LinearCodes(n, m, res.codes[rows], res.scales[rows], res.zeros[rows])  # type: ignore[arg-type]
        m.weight.data.copy_(_dequantized(q, config.spec))
        done.append(q)
        row = rows.stop
    return {"damp": res.damp, "dead_columns": res.dead_columns, **found}


def _dequantized(q: LinearCodes, spec: QuantSpec) -> torch.Tensor:
    if spec.type == "float":
        return fp8_dequantize(q.codes, q.scales)
    return dequantize(q.codes, q.scales, q.zeros, spec.group(q.codes.shape[1]))


def _quantize_head_gptq(model: PreTrainedModel, config: GPTQConfig, ctx: PassContext) -> dict[str, Any]:
    """GPTQ on the lm_head, calibrated on what it reads once the body is quantized (a tied embedding
    then reads the same codes)."""
    assert config.lm_head_bits is not None
    head = model.get_submodule(layout_of(model).head)
    moments = InputMoments(head.in_features)  # type: ignore[arg-type]
    stream_module_inputs(model, head, ctx.calibration(), config.batch_size, moments.add, "the lm_head")
    found: dict[str, Any] = {}

    def quantizer(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            res = gptq_quantize(w, moments.hessian(), spec, config.damp, config.block_size, config.act_order)
        except ToolkitError as exc:
            raise ToolkitError(f"GPTQ failed on the lm_head: {exc}") from None
        found.update(damp=res.damp, dead_columns=res.dead_columns)
        return res.codes, res.scales, res.zeros

    quantize_head(model, QuantSpec(config.lm_head_bits, config.group_size, config.symmetric), quantizer)
    return found


def quantize_layer(model: PreTrainedModel, prefix: str, layer: nn.Module, inputs: LayerInputs,
                   targets: dict[str, nn.Linear], config: GPTQConfig, report: dict[str, Any]) -> list[LinearCodes]:
    """GPTQ on the target linears of one decoder layer; their float weights become the dequantized
    result (for the next layers' calibration), the packed results are returned."""
    done: list[LinearCodes] = []
    groups = _groups(model, prefix, targets)
    # true-sequential: one calibration sweep per group; otherwise one sweep on the float layer
    sweeps = [[g] for g in groups] if config.true_sequential else [groups]
    for sweep in sweeps:
        hs = _hessians(layer, prefix, inputs, [g[0] for g in sweep])
        for names in sweep:
            report[names[0]] = _quantize_group(model, names, hs.pop(names[0]), config, done)  # freed when done
    return done


def _as_kernel_reads(x: torch.Tensor, act: ActivationSpec | None, static_scale: torch.Tensor | None) -> torch.Tensor:
    """A linear's input as its deployed kernel reads it (``toolkit.quant.modules.quantized_input``)."""
    if act is None:
        return x
    return fake_quantize_activations(x, act.type, act.strategy, None if act.dynamic else static_scale)


def _install(model: PreTrainedModel, q: LinearCodes, config: GPTQConfig, input_scales: dict[str, torch.Tensor]) -> None:
    spec, act = config.spec, config.input_activations
    if spec.type == "float":
        module: QuantizedLinear = install_fp8(model, q.name, q.linear, spec, act, codes=(q.codes, q.scales))
    else:
        module = install(model, q.name, q.linear, q.codes, q.scales, q.zeros, spec, act)
    if q.name in input_scales:
        module.input_scale.copy_(input_scales[q.name])


def _paired_moments(pair: LayerPair, names: list[str], targets: dict[str, nn.Linear], act: ActivationSpec | None,
                    input_scales: dict[str, torch.Tensor]) -> dict[str, PairedMoments]:
    """The paired statistics of the named linears (full names) of ``pair``'s layer: their inputs as the deployed
    kernel reads them in the quantized model, and in the float model."""
    moments = {n: PairedMoments(targets[n].in_features, device=targets[n].weight.device) for n in names}
    full = {n[len(pair.prefix) + 1 :]: n for n in names}  # relative name -> full name

    def add(rel: str, x: torch.Tensor, x_float: torch.Tensor) -> None:
        moments[full[rel]].add(_as_kernel_reads(x, act, input_scales.get(full[rel])), x_float)

    stream_input_pairs(pair, list(full), add)
    return moments


def quantize_layer_pair(model: PreTrainedModel, pair: LayerPair, targets: dict[str, nn.Linear], config: GPTQConfig,
                        input_scales: dict[str, torch.Tensor], report: dict[str, Any]) -> list[LinearCodes]:
    """GPTQ with asymmetric calibration on the target linears of one decoder layer: each group's statistics pair the
    inputs of the quantized model as deployed (earlier groups already installed, inputs rounded as the kernel
    rounds them) with the float model's; every group is installed as soon as it is quantized."""
    done: list[LinearCodes] = []
    groups = _groups(model, pair.prefix, targets)
    sweeps = [[g] for g in groups] if config.true_sequential else [groups]
    for sweep in sweeps:
        moments = _paired_moments(pair, [g[0] for g in sweep], targets, config.input_activations, input_scales)
        for names in sweep:
            stats = moments.pop(names[0])
            quantized: list[LinearCodes] = []
            report[names[0]] = _quantize_group(model, names, stats.hessian(), config, quantized, stats.cross())
            for q in quantized:
                _install(model, q, config, input_scales)
            done.extend(quantized)
    return done


@torch.no_grad()
def apply(model: PreTrainedModel, config: GPTQConfig, ctx: PassContext) -> PreTrainedModel:
    """Quantize every decoder linear in place with GPTQ on ``ctx.calibration()`` windows; static activation scales
    are calibrated on the float model first."""
    _ = config.spec  # refuses a scheme this pass cannot run, before any work
    act = config.input_activations
    targets = target_linears(model, config.skip)
    check_group_size(targets, config.group_size)
    report: dict[str, Any] = {}
    if config.keep_float is not None:
        chosen = keep_float_groups(model, ctx.calibration(), config.scheme, targets, config.keep_float,
                                   config.batch_size)
        report["keep_float"] = chosen.report()
        ctx.findings["keep_float"] = {k: report["keep_float"][k] for k in ("kept_float", "share_kept")}
        targets = {n: m for n, m in targets.items() if n not in chosen.names}
    input_scales = static_input_scales(model, targets, act, ctx.calibration(), config.batch_size)
    done: list[LinearCodes] = []

    def one_layer(prefix: str, layer: nn.Module, inputs: LayerInputs) -> None:
        done.extend(quantize_layer(model, prefix, layer, inputs, targets, config, report))

    def one_pair(pair: LayerPair) -> None:  # installs as it goes
        quantize_layer_pair(model, pair, targets, config, input_scales, report)

    layers = layout_of(model).layers
    if config.asymmetric:
        walk_layer_pairs(model, ctx.calibration(), config.batch_size, layers, one_pair, ctx.progress)
    else:
        walk_layers(model, ctx.calibration(), config.batch_size, layers, one_layer, ctx.progress)
    for q in done:
        _install(model, q, config, input_scales)
    if config.lm_head_method == "gptq":
        report["lm_head"] = _quantize_head_gptq(model, config, ctx)
    elif config.lm_head_bits is not None:
        quantize_head(model, QuantSpec(config.lm_head_bits, config.group_size, symmetric=True))
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "gptq.json").write_text(json.dumps(report, indent=2))
    return model


def stream(src: SkeletonModel, out: Path, config: GPTQConfig, ctx: PassContext, options: StreamOptions) -> dict[str, Any]:
    """GPTQ with one decoder layer resident at a time (``toolkit.quant.streaming``); the same per-layer
    function as ``apply``, so the packed result is the same."""
    config.scheme.weight_only(f"{config.name} layer by layer")  # the runner streams weight-only configs only
    targets = target_linears(src.model, config.skip)
    report: dict[str, Any] = {}

    def one_layer(prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[LinearCodes]:
        return quantize_layer(src.model, prefix, layer, inputs, targets, config, report)

    def gptq_head(src: SkeletonModel, inputs: LayerInputs, writer: PackedWriter) -> None:
        assert config.lm_head_bits is not None
        head = src.layout.head
        check_group_size({head: src.model.get_submodule(head)}, config.group_size)
        spec = QuantSpec(config.lm_head_bits, config.group_size, config.symmetric)
        h = head_inputs_hessian(src, inputs)
        try:
            res = gptq_quantize(src.read(f"{head}.weight"), h, spec, config.damp, config.block_size, config.act_order)
        except ToolkitError as exc:
            raise ToolkitError(f"GPTQ failed on the lm_head: {exc}") from None
        report["lm_head"] = {"damp": res.damp, "dead_columns": res.dead_columns}
        writer.linear(head, res.codes, res.scales, res.zeros, spec, head_bias(src))

    head_fn = gptq_head if config.lm_head_method == "gptq" else None
    stats = stream_calibrated(src, out, config, ctx.calibration(), options, one_layer, head_fn, config.batch_size)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "gptq.json").write_text(json.dumps(report, indent=2))
    return stats
