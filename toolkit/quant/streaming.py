"""Layer-wise quantization of checkpoints larger than memory: one decoder layer resident at a time.

The source is a ``SkeletonModel`` (parameters on meta, read from the shards on demand); the result is
written as it is produced into a quantized folder (``checkpoint``'s packed format, sharded). RTN reads
each weight in its stored dtype and quantizes it in float32 row chunks. GPTQ captures the inputs of layer
0 once into an ``ActivationBuffer`` (bounded, spilled to disk beyond its budget), then for each layer:
load it in float32, quantize it with the same per-layer function as the in-memory pass, run it to get the
next layer's inputs, write its packed tensors, free it. The embedding is resident only while layer 0's
inputs are captured, the head only while it is quantized.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.algorithms.gptq import accumulate_hessian, gptq_quantize
from toolkit.algorithms.rtn import rtn_quantize
from toolkit.errors import ToolkitError
from toolkit.models.checkpoint import QUANT_FILE, QUANT_FORMAT
from toolkit.models.shards import ShardWriter
from toolkit.models.streaming import SkeletonModel
from toolkit.passes.gptq import quantize_layer
from toolkit.quant.activations import ActivationBuffer
from toolkit.quant.calibration import LayerInputs, advance, capture_layer_inputs
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import QuantSpec
from toolkit.quant.surgery import WeightQuantConfig, check_group_size, target_linears

CHUNK_ELEMENTS = 1 << 24  # RTN quantizes 16 M weights (64 MB in float32) at a time
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")


@dataclass(frozen=True)
class StreamOptions:
    device: str = "cpu"
    activation_budget_bytes: int | None = 512 * 2**20  # calibration activations kept in memory; the rest spill
    spill_dir: Path | None = None  # where they spill (default: the system temporary folder)
    max_shard_bytes: int = 2**30  # output shards; also the most the writer buffers
    progress: bool = False


class PackedWriter:
    """The quantized folder, written as tensors arrive: shards, index, ``quantization.json``."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.shards = ShardWriter(self.folder, max_shard_bytes, {"format": QUANT_FORMAT})
        self.modules: dict[str, dict[str, Any]] = {}

    def tensor(self, name: str, t: torch.Tensor) -> None:
        self.shards.add(name, t.to("cpu"))

    def linear(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
               bias: torch.Tensor | None) -> None:
        q = QuantLinear.from_codes(codes.cpu(), scales.cpu(), zeros.cpu(), spec, None if bias is None else bias.cpu())
        for leaf, t in q.state_dict().items():
            self.tensor(f"{name}.{leaf}", t)
        self.modules[name] = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                              "in_features": q.in_features, "out_features": q.out_features, "bias": bias is not None}

    def close(self, source: SkeletonModel, embedding_from: str | None) -> int:
        """Write the index, config, tokenizer and ``quantization.json``; returns the weight bytes written."""
        self.shards.close()
        source.config.save_pretrained(self.folder)
        for file in TOKENIZER_FILES:
            if (source.folder / file).is_file():
                shutil.copy(source.folder / file, self.folder / file)
        info = {"format": QUANT_FORMAT, "modules": self.modules, "embedding_from": embedding_from}
        (self.folder / QUANT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return self.shards.bytes_written


def chunked_rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rtn_quantize`` in row chunks (rows are independent: bit-identical, bounded float32 temporaries)."""
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    parts = [rtn_quantize(chunk, spec) for chunk in w.split(rows)]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _write_float(writer: PackedWriter, src: SkeletonModel, names: list[str]) -> None:
    """Tensors kept as they are, in their stored dtype."""
    for name in names:
        writer.tensor(name, src.read(name, src.source_dtype(name)))


def _head_and_rest(src: SkeletonModel, config: WeightQuantConfig, writer: PackedWriter,
                   head_quantized: bool) -> str | None:
    """Write the tensors outside the decoder layers (embedding, final norm, ...); returns the head's
    name when a tied embedding will read the quantized head."""
    layers, head, head_w = src.layout.layers + ".", src.layout.head + ".", f"{src.layout.head}.weight"
    outside = [n for n, _ in src.model.named_parameters() if not n.startswith((layers, head))]
    embed_w = f"{src.layout.embed}.weight"
    tied_to_quantized = src.tied and head_quantized
    _write_float(writer, src, [n for n in outside if not (tied_to_quantized and n == embed_w)])
    if not head_quantized and not src.tied:
        _write_float(writer, src, [head_w])
    return src.layout.head if tied_to_quantized else None


def _head_spec(src: SkeletonModel, bits: int, config: WeightQuantConfig, symmetric: bool) -> QuantSpec:
    head = src.model.get_submodule(src.layout.head)
    check_group_size({src.layout.head: head}, config.group_size)
    return QuantSpec(bits, config.group_size, symmetric)


def _head_bias(src: SkeletonModel) -> torch.Tensor | None:
    name = f"{src.layout.head}.bias"
    return src.read(name) if name in src.weights else None


def _layer_targets(src: SkeletonModel, prefix: str, targets: dict[str, nn.Linear]) -> list[str]:
    return [n for n in targets if n.startswith(prefix + ".")]


@torch.no_grad()
def stream_rtn(src: SkeletonModel, out: Path, config: WeightQuantConfig, options: StreamOptions) -> dict[str, Any]:
    """RTN of every target linear, read and written one tensor at a time (no calibration, no activations)."""
    targets = target_linears(src.model, config.skip)
    check_group_size(targets, config.group_size)
    writer = PackedWriter(out, options.max_shard_bytes)
    for i in _layers(src, options):
        prefix = src.layer_prefix(i)
        quantized = set(_layer_targets(src, prefix, targets))
        for name in src.param_names(prefix):
            module = _module_of(name)
            if module in quantized and name.endswith(".weight"):
                codes, scales, zeros = chunked_rtn(src.read(name, src.source_dtype(name)), config.spec)
                bias = src.read(f"{module}.bias") if f"{module}.bias" in src.weights else None
                writer.linear(module, codes, scales, zeros, config.spec, bias)
            elif not (module in quantized and name.endswith(".bias")):
                writer.tensor(name, src.read(name))
    embedding_from = _head_and_rest(src, config, writer, config.lm_head_bits is not None)
    if config.lm_head_bits is not None:
        spec = _head_spec(src, config.lm_head_bits, config, symmetric=True)
        head_w = f"{src.layout.head}.weight"
        codes, scales, zeros = chunked_rtn(src.read(head_w, src.source_dtype(head_w)), spec)
        writer.linear(src.layout.head, codes, scales, zeros, spec, _head_bias(src))
    written = writer.close(src, embedding_from)
    return {"bytes_written": written, "layers": src.num_layers}


def _layers(src: SkeletonModel, options: StreamOptions) -> Iterator[int]:
    from tqdm import tqdm

    yield from tqdm(range(src.num_layers), desc="layers", disable=not options.progress, leave=False)


def capture(src: SkeletonModel, windows: torch.Tensor, batch_size: int, options: StreamOptions) -> LayerInputs:
    """Layer 0's inputs for ``windows``, with only the embedding resident (then freed)."""
    src.load(src.layout.embed)
    buffer = ActivationBuffer(options.activation_budget_bytes, options.spill_dir)
    try:
        return capture_layer_inputs(src.model, windows.to(src.device), batch_size, buffer)
    finally:
        src.release(src.layout.embed)


@torch.no_grad()
def stream_gptq(src: SkeletonModel, out: Path, config: Any, windows: torch.Tensor, options: StreamOptions,
                report: dict[str, Any]) -> dict[str, Any]:
    """GPTQ layer by layer (``config``: a ``GPTQConfig``); ``report`` receives the per-linear results."""
    targets = target_linears(src.model, config.skip)
    check_group_size(targets, config.group_size)
    writer = PackedWriter(out, options.max_shard_bytes)
    inputs = capture(src, windows, config.batch_size, options)
    try:
        for i in _layers(src, options):
            prefix = src.layer_prefix(i)
            layer = src.load(prefix)
            done = quantize_layer(src.model, prefix, layer, inputs, targets, config, report)
            advance(layer, inputs, prefix)
            quantized = {q.name for q in done}
            for q in done:
                writer.linear(q.name, q.codes, q.scales, q.zeros, config.spec, q.linear.bias)
            for name, p in layer.named_parameters():
                if f"{prefix}.{_module_of(name)}" not in quantized:
                    writer.tensor(f"{prefix}.{name}", p.detach())
            src.release(prefix)
        embedding_from = _head_and_rest(src, config, writer, config.lm_head_bits is not None)
        if config.lm_head_bits is not None:
            _stream_head(src, config, inputs, writer, report)
    finally:
        inputs.hidden.close()
    written = writer.close(src, embedding_from)
    return {"bytes_written": written, "layers": src.num_layers, "spilled_bytes": inputs.hidden.spilled_bytes}


def _stream_head(src: SkeletonModel, config: Any, inputs: LayerInputs, writer: PackedWriter,
                 report: dict[str, Any]) -> None:
    """The head: RTN (symmetric), or GPTQ on the final norm's output of the carried activations."""
    head_w = f"{src.layout.head}.weight"
    if config.lm_head_method != "gptq":
        spec = _head_spec(src, config.lm_head_bits, config, symmetric=True)
        codes, scales, zeros = chunked_rtn(src.read(head_w, src.source_dtype(head_w)), spec)
        writer.linear(src.layout.head, codes, scales, zeros, spec, _head_bias(src))
        return
    spec = _head_spec(src, config.lm_head_bits, config, config.symmetric)
    norm = src.load(src.layout.final_norm)
    dim = int(src.config.hidden_size)
    h_sum, count = torch.zeros(dim, dim, device=src.device), 0
    for hidden, _ in inputs.batches():
        count += accumulate_hessian(h_sum, norm(hidden).float())
    src.release(src.layout.final_norm)
    try:
        res = gptq_quantize(src.read(head_w), 2 * h_sum / max(count, 1), spec, config.damp, config.block_size,
                            config.act_order)
    except ToolkitError as exc:
        raise ToolkitError(f"GPTQ failed on the lm_head: {exc}") from None
    report["lm_head"] = {"damp": res.damp, "dead_columns": res.dead_columns}
    writer.linear(src.layout.head, res.codes, res.scales, res.zeros, spec, _head_bias(src))
