"""Layer-wise quantization of checkpoints larger than memory: one decoder layer resident at a time.

The source is a ``SkeletonModel`` (parameters on meta, read from the shards on demand); the result is
written as it is produced into a packed checkpoint folder (``toolkit.quant.checkpoint``, sharded). RTN reads
each weight in its stored dtype and quantizes it in float32 row chunks. GPTQ captures the inputs of layer
0 once into an ``ActivationBuffer`` (bounded, spilled to disk beyond its budget), then for each layer:
load it in float32, quantize it with the pass's own per-layer function (the one its in-memory version
uses), run it to get the next layer's inputs, write its packed tensors, free it. The embedding is resident only while layer 0's
inputs are captured, the head only while it is quantized.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.models.shards import ShardWriter
from toolkit.models.streaming import SkeletonModel
from toolkit.quant.activations import ActivationBuffer
from toolkit.quant.arithmetic import rtn_quantize
from toolkit.quant.calibration import LayerInputs, advance, capture_layer_inputs
from toolkit.quant.checkpoint import WEIGHTS_METADATA, PackedCheckpoint, PackedLinear
from toolkit.quant.formats import ToolkitPacked, packed_width
from toolkit.quant.moments import InputMoments
from toolkit.quant.spec import QuantSpec
from toolkit.quant.surgery import LinearCodes, WeightQuantConfig, check_group_size, target_linears

CHUNK_ELEMENTS = 1 << 23  # RTN quantizes 8 M weights (32 MB in float32) at a time
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
        self.shards = ShardWriter(self.folder, max_shard_bytes, WEIGHTS_METADATA)
        self.modules: dict[str, PackedLinear] = {}

    def tensor(self, name: str, t: torch.Tensor) -> None:
        self.shards.add(name, t.to("cpu"))

    def linear(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
               bias: torch.Tensor | None) -> None:
        self.linear_rows(name, list(codes.shape), spec, iter([(codes, scales, zeros)]), bias)

    def linear_rows(self, name: str, shape: list[int], spec: QuantSpec,
                    parts: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bias: torch.Tensor | None) -> None:
        """A quantized linear ``shape = [out, in]`` given as row blocks ``(codes, scales, zeros)``: packed codes
        are written block by block, so neither the codes nor the float weight of a large head are ever whole.
        The tensors are exactly ``QuantLinear.from_codes``'s buffers."""
        out_f, in_f = shape
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []

        def packed() -> Iterator[torch.Tensor]:
            for codes, s, z in parts:
                packed = ToolkitPacked.pack(codes.cpu(), s.cpu(), z.cpu(), spec)
                scales.append(packed["scales"])
                zeros.append(packed["qzeros"])
                yield packed["qweight"]

        self.shards.add_chunks(f"{name}.qweight", [out_f, packed_width(spec.bits, in_f)], torch.uint8, packed())
        self.tensor(f"{name}.scales", torch.cat(scales))
        self.tensor(f"{name}.qzeros", torch.cat(zeros))
        if bias is not None:
            self.tensor(f"{name}.bias", bias.detach().float())
        self.modules[name] = PackedLinear(spec.bits, spec.group_size, spec.symmetric, in_f, out_f, bias is not None)

    def close(self, source: SkeletonModel, embedding_from: str | None) -> int:
        """Write the index, config, tokenizer and ``quantization.json``; returns the weight bytes written."""
        self.shards.close()
        source.config.save_pretrained(self.folder)
        for file in TOKENIZER_FILES:
            if (source.folder / file).is_file():
                shutil.copy(source.folder / file, self.folder / file)
        if self.modules:  # otherwise (AWQ without quantize) a plain float checkpoint, which streams again
            PackedCheckpoint(self.modules, embedding_from).write(self.folder)
        return self.shards.bytes_written


def rtn_rows(src: SkeletonModel, name: str, spec: QuantSpec) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``rtn_quantize`` of stored weight ``name`` in row blocks read one at a time from the shards (rows
    are independent: bit-identical to the whole matrix, with bounded float32 temporaries)."""
    stored = src.stored_name(name)
    out_f, in_f = src.weights.meta(stored)[0]
    step = max(1, CHUNK_ELEMENTS // in_f)
    for start in range(0, out_f, step):
        yield rtn_quantize(src.weights.rows(stored, start, min(start + step, out_f)).to(src.device), spec)


def _rtn_linear(src: SkeletonModel, writer: PackedWriter, module: str, spec: QuantSpec) -> None:
    shape = src.weights.meta(src.stored_name(f"{module}.weight"))[0]
    bias = src.read(f"{module}.bias") if f"{module}.bias" in src.weights else None
    writer.linear_rows(module, shape, spec, rtn_rows(src, f"{module}.weight", spec), bias)


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _write_float(writer: PackedWriter, src: SkeletonModel, names: list[str]) -> None:
    """Tensors kept as they are, in their stored dtype, copied in row blocks (a 128k-row embedding is
    never whole in memory)."""
    for name in names:
        stored = src.stored_name(name)
        shape = src.weights.meta(stored)[0]
        step = max(1, CHUNK_ELEMENTS // max(1, int(torch.Size(shape[1:]).numel())))
        blocks = (src.weights.rows(stored, r, min(r + step, shape[0])) for r in range(0, shape[0], step))
        writer.shards.add_chunks(name, shape, src.source_dtype(name), blocks)


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
                _rtn_linear(src, writer, module, config.spec)
            elif not (module in quantized and name.endswith(".bias")):
                writer.tensor(name, src.read(name))
    embedding_from = _head_and_rest(src, config, writer, config.lm_head_bits is not None)
    if config.lm_head_bits is not None:
        rtn_head(src, writer, config.lm_head_bits, config.group_size)
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
    except BaseException:  # the caller closes it only once it has it: a spilled half is removed here
        buffer.close()
        raise
    finally:
        src.release(src.layout.embed)


LayerFn = Callable[[str, nn.Module, LayerInputs], list[LinearCodes]]
HeadFn = Callable[[SkeletonModel, LayerInputs, PackedWriter], None]


@torch.no_grad()
def stream_calibrated(src: SkeletonModel, out: Path, config: WeightQuantConfig, windows: torch.Tensor,
                      options: StreamOptions, layer_fn: LayerFn, head_fn: HeadFn | None = None,
                      batch_size: int = 8) -> dict[str, Any]:
    """Calibrated quantization layer by layer: ``layer_fn(prefix, layer, inputs)`` quantizes the loaded
    layer (leaving the dequantized weights in its float linears) and returns the packed results; the layer
    then produces the next layer's inputs, is written and freed. ``head_fn(src, inputs, writer)`` writes
    the head from the final hidden states (default: symmetric RTN at ``lm_head_bits``)."""
    targets = target_linears(src.model, config.skip)
    check_group_size(targets, config.group_size)
    writer = PackedWriter(out, options.max_shard_bytes)
    inputs = capture(src, windows, batch_size, options)
    try:
        for i in _layers(src, options):
            prefix = src.layer_prefix(i)
            layer = src.load(prefix)
            inputs.layer = i  # the mask and rotary embeddings of this layer's type
            done = layer_fn(prefix, layer, inputs)
            advance(layer, inputs, prefix)
            quantized = {q.name for q in done}
            for q in done:
                writer.linear(q.name, q.codes, q.scales, q.zeros, config.spec, q.linear.bias)
            for name, p in layer.named_parameters():
                if f"{prefix}.{_module_of(name)}" not in quantized:
                    writer.tensor(f"{prefix}.{name}", p.detach())
            src.release(prefix)
        embedding_from = _head_and_rest(src, config, writer, config.lm_head_bits is not None)
        if head_fn is not None:
            head_fn(src, inputs, writer)
        elif config.lm_head_bits is not None:
            rtn_head(src, writer, config.lm_head_bits, config.group_size)
    finally:
        inputs.hidden.close()
    written = writer.close(src, embedding_from)
    return {"bytes_written": written, "layers": src.num_layers, "spilled_bytes": inputs.hidden.spilled_bytes}


def rtn_head(src: SkeletonModel, writer: PackedWriter, bits: int, group_size: int) -> None:
    """The head by symmetric round-to-nearest, as ``surgery.quantize_head`` does in memory."""
    head = src.model.get_submodule(src.layout.head)
    check_group_size({src.layout.head: head}, group_size)
    _rtn_linear(src, writer, src.layout.head, QuantSpec(bits, group_size, symmetric=True))


def head_inputs_hessian(src: SkeletonModel, inputs: LayerInputs) -> torch.Tensor:
    """``H = 2 X Xᵀ / n`` of the head's input: the final norm applied to the carried hidden states."""
    norm = src.load(src.layout.final_norm)
    moments = InputMoments(int(src.config.hidden_size), device=src.device)
    for hidden, _ in inputs.batches():
        moments.add(norm(hidden).float())
    src.release(src.layout.final_norm)
    return moments.hessian()


def head_bias(src: SkeletonModel) -> torch.Tensor | None:
    name = f"{src.layout.head}.bias"
    return src.read(name) if name in src.weights else None
