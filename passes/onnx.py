"""Export to ONNX with a KV cache, fused attention and the exact quantized weights; validated against PyTorch.

``target: ort`` uses onnxruntime contrib ops (GroupQueryAttention, MatMulNBits, GatherBlockQuantized,
SkipSimplifiedLayerNormalization); ``target: standard`` uses only ONNX opset 24 ops, the graph TensorRT's ONNX
parser reads (checked against its documented operator list, ``toolkit.onnx.tensorrt``). The folder holds
``model.onnx`` + ``model.onnx.data`` (external weights, relative location), the tokenizer, ``export.json``
(the ``ExportContract`` the runtime reads, toolkit.runtime.contract) and, for ``ort``, a ``genai_config.json``
for onnxruntime-genai generated from the same contract.

The initializers' bytes go to ``model.onnx.data`` as the graph is built (``toolkit.onnx.external``), so the proto
never holds weights and protobuf's 2 GB limit never applies; ``stream`` exports a float or packed checkpoint folder
with one decoder layer resident at a time (the runner uses it whenever the export's input is a folder on disk).
Large tensors go out in row blocks: packed weights straight from ``QuantLinear``'s bytes, and an untied embedding
table from the dtype it is held in (a bf16 checkpoint's table stays bf16 in the graph, cast to float32 after the
Gather: exact, and half the bytes in the file and in onnxruntime's memory).

``dtype: float16`` stores float weights (embedding, norms, float linears, rotary caches) in float16 and runs the
activations and KV cache in float16; MatMulNBits takes its float16 scales as they are; logits stay float32. On
onnxruntime 1.32's CPU provider, MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization, Gather and
GatherBlockQuantized have float16 kernels; MatMul, Sigmoid (SiLU), RMSNormalization, RotaryEmbedding and
Attention do not, and onnxruntime inserts casts and runs those in float32 (a float MatMul's weight is widened at
load). So on CPU float16 pays off for int4 weights on the ``ort`` target; the other graphs run correctly but
gain only the smaller file. Its strict check is relative (``float16_tolerance``).

A W8A8 int8 model (``input_activations`` int8, per token dynamic or per tensor static; int8 per-channel symmetric
weights) exports on the ``ort`` target: each such linear quantizes its input as the PyTorch model does and runs
MatMulInteger (``graph.w8a8_linear``; onnxruntime fuses it to MatMulIntegerToFloat). onnxruntime's own dynamic
forms (DynamicQuantizeLinear, DynamicQuantizeMatMul) are per tensor and asymmetric uint8, another model than the
one evaluated, and were no faster (``benchmarks/w8a8_matmul_ab.py``). Its strict check is relative
(``activation_tolerance``: the int8 codes are exact, but a deep W8A8 model amplifies an activation code
that float rounding flips at a midpoint).

Validation fails the export (ToolkitError), it never only warns. It runs the folder through the runtime's
backend twice:
- ``strict``: MatMulNBits / fused DequantizeLinear at accuracy_level 0 (float activations), so the only
  difference from PyTorch is float32 summation order: any copied code, scale or zero point that is wrong shows
  up far above ``tolerance``;
- ``deployed`` (quantized models with accuracy_level > 0): the shipped setting, where level 4 quantizes
  activations to int8 per block. Its error is noise spread over every logit, large in absolute terms on
  random-token prompts, so it is judged scale-free, per position: median over positions of
  RMS(Δ)/RMS(logits) <= ``deployed_tolerance``; a broken kernel or layout gives ~1 at every position. The
  median, because random-token prompts sometimes produce one atypical hidden state whose int8-activation error
  is huge while text positions stay small, which would otherwise decide the check alone. ``decode`` compares
  the one-token steps only, so a broken single-row kernel cannot hide behind prefill rows. The bound sits an
  order of magnitude below a broken graph and above what correct int4 exports give (the figures are in the
  README). Correctness itself is the strict check above (exact weights, float activations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.evaluation.streaming import stream_logits
from toolkit.models.architectures import layout_of
from toolkit.models.streaming import SkeletonModel
from toolkit.onnx.decoder import Resident, build_model, in_memory
from toolkit.onnx.external import ExternalData
from toolkit.onnx.graph import Dims, GraphOptions, dims_of
from toolkit.onnx.tensorrt import parser_problems
from toolkit.onnx.validate import Probe, Reference, model_reference, op_census, probe_sequences, run_checks
from toolkit.passes.base import ExportConfig, PassConfig
from toolkit.passes.context import PassContext
from toolkit.quant import kv_cache
from toolkit.quant.modules import activation_modules, quantized_modules
from toolkit.quant.spec import QuantScheme
from toolkit.quant.streaming import StreamOptions
from toolkit.runtime.backend import MAX_THREADS, BackendOptions, OrtBackend
from toolkit.runtime.contract import (
    DATA_FILE,
    EXPORT_FILE,
    GENAI_FILE,
    MODEL_FILE,
    ExportContract,
    Target,
    TensorNames,
)

MIN_OPSET = {"ort": 23, "standard": 24}  # RMSNormalization, RotaryEmbedding, Attention; TensorScatter (24)
# a later opset names operator versions the installed onnx does not know; TensorRT 10.15's parser reads up to 24
MAX_OPSET = {"ort": onnx.defs.onnx_opset_version(), "standard": 24}

@dataclass(frozen=True)
class ONNXConfig(ExportConfig):
    name: ClassVar[str] = "onnx"
    reads_calibration: ClassVar[bool] = False

    target: Target = "ort"
    opset: int = 0  # 0: the target's own, ort 23 and standard 24 (MIN_OPSET)
    dtype: Literal["float32", "float16"] = "float32"  # float weights and activations: float32 or float16 (see the module docstring)
    accuracy_level: int = 4  # MatMulNBits: 0 float activations; 4 int8 activations (fastest on CPU)
    # strict check: max |Δlogits| (exact weights, float activations). Summation order alone gives ~1e-4 on
    # SmolLM2 and up to 1.9e-3 (GPTQ g64 asymmetric, one 7-token prefill); a wrong code or scale gives >> 1e-2
    tolerance: float = 5e-3
    deployed_tolerance: float = 0.1  # accuracy_level > 0: RMS(Δlogits) / RMS(logits) (int8 activation noise)
    # strict check of a float16 export: median over positions of RMS(Δlogits) / RMS(logits); float16 rounding is
    # relative, so no absolute bound fits every model (the tiny families give <= 1.7e-3, a broken graph ~1)
    float16_tolerance: float = 1e-2
    # strict check of a W8A8 export (quantized inputs): median over positions of RMS(Δlogits) / RMS(logits). The
    # graph computes the model's integers exactly (float32 rounding alone: ~3e-7 on every tiny family), but where x
    # lies within rounding of a code midpoint an activation code flips, and a deep W8A8 model amplifies flips: the
    # PyTorch W8A8 SmolLM2 itself moves by a median 0.021 (random-token probe; 0.11 on text) when its input
    # embeddings are multiplied by 1 + 1e-6 noise, and its export measured 0.023-0.028. A graph with a wrong bias
    # (an onnxruntime fusion bug, tiny qwen2) gave 0.36-0.43; exactness itself is tested at 1e-5 on the tiny models
    activation_tolerance: float = 0.1
    max_positions: int = 0  # longest context the export serves (rotary cache rows); 0: the model's own
    # ort: batches are right-padded (each row from column 0, as our runtime and onnxruntime-genai feed them) unless
    # this is true, which adds an attention bias for left-padded batches (Hugging Face style) at ~4 % of decode speed
    left_padding: bool = False
    threads: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = MIN_OPSET[self.target], MAX_OPSET[self.target]
        if self.opset and not low <= self.opset <= high:
            span = f"opset {low}" if low == high else f"opset {low} to {high}"
            why = {"ort": "the installed onnx knows no later one", "standard": "TensorScatter; TensorRT's parser reads "
                   "no later one"}
            raise ValueError(f"target '{self.target}' takes {span} ({why[self.target]}), got {self.opset}; "
                             "or leave opset out for the target's own")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads (onnxruntime's, for the export's self-check) must be in 1..{MAX_THREADS}, "
                             f"got {self.threads}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0..4 (0 float, 4 int8 activations), got {self.accuracy_level}")
        if self.max_positions and self.max_positions < 64:
            raise ValueError(f"max_positions must be 0 (the model's own) or >= 64, got {self.max_positions}")
        if not (self.tolerance > 0 and self.deployed_tolerance > 0 and self.float16_tolerance > 0
                and self.activation_tolerance > 0):
            raise ValueError("tolerance, deployed_tolerance, float16_tolerance and activation_tolerance must be "
                             "positive")

    def graph_options(self, accuracy_level: int | None = None) -> GraphOptions:
        level = self.accuracy_level if accuracy_level is None else accuracy_level
        opset = self.opset or MIN_OPSET[self.target]
        return GraphOptions(self.target, opset, level, self.max_positions, self.pads_left, self.dtype)

    @property
    def pads_left(self) -> bool:
        """The standard target's Attention takes the mask as a bias anyway: it serves both paddings."""
        return self.left_padding or self.target == "standard"


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    """Weight-only schemes compute with float activations (MatMulNBits / DequantizeLinear on the weights only); an
    asymmetric one is refused for the standard target (TensorRT's parser takes DequantizeLinear only with zero
    zero-points; the graph refuses such weights too, ``graph._symmetric_codes``). A scheme quantizing activations
    runs on the ort target only as W8A8 int8 (``graph.w8a8_linear``): int8 per-channel symmetric weights, int8
    symmetric inputs, per token (dynamic) or per tensor (static). Refused when the recipe is read, and again for the
    model's own modules before the export writes anything."""
    onnx_config = config if isinstance(config, ONNXConfig) else None
    if scheme.input_activations is not None:
        _check_w8a8(scheme, onnx_config)
        return
    spec = scheme.weight_only(ONNXConfig.name)
    if onnx_config is not None and onnx_config.target == "standard" and not spec.symmetric:
        raise ToolkitError("the standard ONNX target holds symmetric codes only (TensorRT's parser takes "
                           "DequantizeLinear without zero points): quantize with symmetric: true, or export with "
                           "target: ort")


def _check_w8a8(scheme: QuantScheme, config: ONNXConfig | None) -> None:
    w, a = scheme.weights, scheme.input_activations
    assert a is not None
    if not (w.type == "int" and w.bits == 8 and w.group_size == -1 and w.symmetric and a.type == "int"):
        raise ToolkitError(f"onnx runs quantized input activations only as W8A8 int8 (int8 x int8 MatMulInteger); "
                           f"this {scheme.name} scheme has {w.type} {w.bits}-bit weights, group_size {w.group_size}, "
                           f"symmetric {w.symmetric}, {a.name} inputs: quantize with type: int, bits: 8, "
                           "group_size: -1, symmetric: true and int8 input_activations, or drop input_activations")
    if config is not None and config.target != "ort":
        raise ToolkitError("the standard ONNX target computes with float activations (DequantizeLinear weights): "
                           "export this W8A8 model with target: ort, or drop input_activations")
    if config is not None and config.dtype != "float32":
        raise ToolkitError("W8A8 ONNX quantizes float32 activations as the PyTorch model does: export it with "
                           "dtype: float32")


def check_model(model: PreTrainedModel, config: ONNXConfig) -> None:
    """``check_spec`` for every linear the model quantizes beyond float activations (a model read from a cached
    or given folder, which the recipe check does not see)."""
    for m in activation_modules(model).values():
        check_spec(m.scheme, config)
    kv_cache.check_float_cache(model, ONNXConfig.name)


def _write(model: PreTrainedModel, config: ONNXConfig, folder: Path, contract: ExportContract,
           resident: Resident) -> dict[str, int]:
    """Build the graph with every initializer's bytes going straight to the data file (``ExternalData``), so
    the proto in memory holds no weights; save and check it; returns the op census."""
    with ExternalData(folder / contract.data_file, contract.data_file) as data:
        proto = build_model(model, config.graph_options(), contract.names, data, resident)
    census = op_census(proto)
    refused = parser_problems(proto) if config.target == "standard" else []
    if refused:
        raise ToolkitError(f"the standard ONNX graph has what TensorRT's parser refuses: {'; '.join(refused[:3])}. "
                           "This is a bug in the exporter; please report it with the recipe")
    onnx.save_model(proto, str(folder / contract.model_file))
    del proto
    onnx.checker.check_model(str(folder / contract.model_file))  # by path: the checker reads the external data too
    return census


def _validate(config: ONNXConfig, folder: Path, reference: Reference, dims: Dims,
              quantized: bool, activations: bool) -> dict[str, Any]:
    probe = Probe(vocab_limit=min(dims.vocab, 256 if dims.vocab < 1000 else dims.vocab))
    sequences = probe_sequences(probe)
    refs = reference(sequences)  # computed once, for both checks

    def checks(level: int) -> dict[str, dict[str, float]]:
        backend = OrtBackend(folder, BackendOptions(threads=config.threads, accuracy_level=level))
        return run_checks(backend, sequences, refs, config.pads_left)

    strict = checks(0)
    report: dict[str, Any] = {"strict": strict}
    relative = {"float16_tolerance": config.float16_tolerance} if config.dtype == "float16" else \
        {"activation_tolerance": config.activation_tolerance} if activations else {}
    if relative:
        report.update(relative)
        bound = next(iter(relative.values()))
        failures = [f"strict {k}: median relative RMS {m['rel_rms_median']:.3g} > {bound}"
                    for k, m in strict.items() if not m["rel_rms_median"] <= bound]
    else:
        report["tolerance"] = config.tolerance
        failures = [f"strict {k}: max |Δ| {m['max_abs']:.3g} > {config.tolerance}"
                    for k, m in strict.items() if not m["max_abs"] <= config.tolerance]
    if quantized and config.accuracy_level > 0:
        deployed = checks(config.accuracy_level)
        report["deployed"] = deployed
        report["deployed_tolerance"] = config.deployed_tolerance
        failures += [f"accuracy_level {config.accuracy_level} {k}: median relative RMS {m['rel_rms_median']:.3g} > "
                     f"{config.deployed_tolerance}" for k, m in deployed.items()
                     if not m["rel_rms_median"] <= config.deployed_tolerance]
    if failures:
        raise ToolkitError(
            "ONNX export does not match the PyTorch model: " + "; ".join(failures)
            + ". This is a bug in the exporter or an unsupported model variant; please report it with the recipe"
        )
    return report


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def contract_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ONNXConfig) -> ExportContract:
    d = dims_of(model, config.max_positions)
    c = model.config
    return ExportContract(
        target=config.target, model_type=c.model_type, num_layers=d.layers, num_heads=d.heads,
        num_kv_heads=d.kv_heads, head_dim=d.head_dim, hidden_size=d.hidden, vocab_size=d.vocab,
        context_length=d.max_positions,
        eos_token_ids=_token_ids(c.eos_token_id if c.eos_token_id is not None else tokenizer.eos_token_id),
        bos_token_id=c.bos_token_id if c.bos_token_id is not None else tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # batches this graph serves: GQA masks by seqlens_k (right), the bias adds left; standard writes and masks per row
        padding="left or right" if config.pads_left else "right",
        weights="int" if quantized_modules(model) else config.dtype,
        cache_dtype=config.dtype,
        accuracy_level=config.accuracy_level,
        share_buffer=True,  # GroupQueryAttention (ort) and TensorScatter (standard) write the cache in place
        # no next-token ArgMax: onnxruntime runs every node whatever a call reads, and the runtime takes numpy's
        # argmax of the logits it binds anyway (exports made before still load: the runtime drops their ArgMax)
        names=TensorNames(next_token=None),
    )


@torch.no_grad()
def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ONNXConfig,
           folder: Path, *, history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write the ONNX export of an in-memory model into ``folder`` (a fresh temp dir) and prove it; returns
    manifest metrics. ``export.json`` describes the graph, not how its weights were made: ``history`` is unused."""
    return _export(model.eval(), tokenizer, config, Path(folder), in_memory, model_reference(model))


@torch.no_grad()
def stream(src: SkeletonModel, folder: Path, config: ONNXConfig, ctx: PassContext,
           options: StreamOptions) -> dict[str, Any]:
    """The same export from a float or packed checkpoint folder, one decoder layer resident at a time: each
    layer's tensors are read from the shards while its part of the graph is written, and the validation's
    reference runs layer by layer too (``stream_logits``)."""
    return _export(src.model, ctx.tokenizer, config, Path(folder), src.resident, partial(stream_logits, src))


def _export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ONNXConfig, folder: Path,
            resident: Resident, reference: Reference) -> dict[str, Any]:
    check_model(model, config)
    contract = contract_of(model, tokenizer, config)
    census = _write(model, config, folder, contract, resident)
    tokenizer.save_pretrained(str(folder))
    (folder / EXPORT_FILE).write_text(json.dumps(contract.to_json(), indent=2) + "\n")
    genai_type = layout_of(model).genai_type
    if config.target == "ort" and genai_type is not None:  # onnxruntime-genai has no type for some families
        (folder / GENAI_FILE).write_text(json.dumps(contract.genai_config(genai_type), indent=2) + "\n")
    dims = dims_of(model, config.max_positions)
    validation = _validate(config, folder, reference, dims, bool(quantized_modules(model)),
                           bool(activation_modules(model)))
    size = sum(p.stat().st_size for p in (folder / MODEL_FILE, folder / DATA_FILE))
    return {"export": {"config": asdict(config), "op_census": census, "validation": validation,
                       "size_bytes": size, "size_mb": round(size / 1e6, 2),
                       "max_abs_logit_diff": max(_all_diffs(validation))}}


def _all_diffs(validation: dict[str, Any]) -> list[float]:
    values = [m["max_abs"] for key in ("strict", "deployed") for m in validation.get(key, {}).values()]
    return [v for v in values if math.isfinite(v)] or [0.0]
