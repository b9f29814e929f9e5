"""Export a model as one GGUF file for llama.cpp, carrying the quantization pass's exact codes.

Block types: int4 group 32 symmetric -> Q4_0, int4 group 32 asymmetric -> Q4_1, int8 group 32 symmetric ->
Q8_0 (``toolkit.interop.gguf_file.BLOCK_TYPES``), float weights -> F16 or F32, norms F32. Nothing is
re-quantized: the bytes are our codes and float16 scales rearranged. Q4_1's offset ``m = -scale * zero``
is rounded to float16, so those blocks are exact only where the product fits; the metrics say how far off
the rest are. A tied embedding is written once as ``token_embd.weight`` (llama.cpp then reads it as the
output head too). The file proves itself: it is read back with gguf's ``GGUFReader``, every tensor is
dequantized by gguf-py's ``quants`` and compared bit-exactly with the weights the model computes with,
and, when llama-cpp-python is installed, llama.cpp's tokenization and logits on two prompts are compared
with PyTorch's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.interop import gguf_file, llama_cpp_probe
from toolkit.models import gguf_reader
from toolkit.models.architectures import layout_of
from toolkit.passes.base import ExportConfig, PassConfig
from toolkit.quant.formats import GGUFQ4_1, PackedFormat
from toolkit.quant.modules import QuantEmbedding, QuantLinear, quantized_modules
from toolkit.quant.spec import QuantScheme

FILE = "model.gguf"
Q = gguf.GGMLQuantizationType
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:")


@dataclass(frozen=True)
class ExportGGUFConfig(ExportConfig):
    name: ClassVar[str] = "export_gguf"
    reads_calibration: ClassVar[bool] = False

    float_type: Literal["f16", "f32"] = "f16"  # 2-D weights the model holds in float (norms are always F32)
    pre_tokenizer: str = "auto"  # llama.cpp's tokenizer.ggml.pre; auto: identified as convert_hf_to_gguf.py does
    check_llama_cpp: bool = True  # compare llama.cpp's logits with PyTorch when llama-cpp-python is installed
    # max |Δlogit| / max |logit| against PyTorch: llama.cpp's Q4/Q8 kernels round activations to 8 bits
    llama_cpp_tolerance: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.pre_tokenizer:
            raise ValueError("pre_tokenizer must be 'auto' or a llama.cpp pre-tokenizer name such as 'smollm'")
        if not 0 < self.llama_cpp_tolerance < 1:
            raise ValueError(f"llama_cpp_tolerance must be in (0, 1), got {self.llama_cpp_tolerance}")


@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor and where its values come from: a QuantLinear (``module``), a float parameter, or
    values computed from the config (``value``: Llama 3.1's rope factors)."""

    gguf_name: str
    param: str
    module: str | None = None
    rope_heads: int | None = None
    value: torch.Tensor | None = None
    offset: float = 0.0  # added to the float values (Gemma's norms: llama.cpp scales by w, Gemma by 1 + w)


def check_spec(scheme: QuantScheme, config: PassConfig | None = None) -> None:
    """Refuse a quantization no GGUF block type holds (recipes call it before any pass runs); a whole-row group
    (-1) depends on the model's widths and is checked on the model."""
    spec = scheme.weight_only(ExportGGUFConfig.name)
    if spec.group_size != -1:
        gguf_file.block_type(spec, spec.group_size)


def _block_type(m: QuantLinear, name: str) -> tuple[gguf.GGMLQuantizationType, type[PackedFormat]]:
    return gguf_file.block_type(m.spec, m.spec.group(m.in_features), f"{name}: ")


def _plan(model: PreTrainedModel) -> list[_Tensor]:
    gguf_file.check_supported(model)
    layout = layout_of(model)
    quant = quantized_modules(model)
    for name, m in quant.items():
        _block_type(m, name)  # refuse before anything is written
    head = model.get_submodule(layout.head)
    tied = isinstance(model.get_input_embeddings(), QuantEmbedding) or bool(model.config.tie_word_embeddings)
    head_module = layout.head if isinstance(head, QuantLinear) else None
    head_param = f"{layout.embed}.weight" if tied and head_module is None else f"{layout.head}.weight"
    plan = [_Tensor("token_embd.weight", head_param if tied else f"{layout.embed}.weight", head_module if tied else None)]
    if not tied:
        plan.append(_Tensor("output.weight", f"{layout.head}.weight", head_module))
    for name in quant:
        if name != layout.head:
            plan.append(_Tensor(gguf_file.tensor_name(model, f"{name}.weight"), f"{name}.weight", name,
                                gguf_file.rope_heads(model, name)))
    done = {t.param for t in plan} | {f"{layout.head}.weight", f"{layout.embed}.weight"}
    for pname, _ in model.named_parameters():
        if pname not in done:
            owner = pname.rsplit(".", 1)[0]
            plan.append(_Tensor(gguf_file.tensor_name(model, pname), pname, None, gguf_file.rope_heads(model, owner),
                                offset=gguf_file.norm_offset(model, pname)))
    plan += [_Tensor(name, "config.rope_parameters", value=v) for name, v in gguf_file.rope_tensors(model).items()]
    return plan


def _float_param(model: PreTrainedModel, t: _Tensor) -> torch.Tensor:
    if t.value is not None:
        return t.value
    w = dict(model.named_parameters())[t.param].detach().float() + t.offset
    return w if t.rope_heads is None else gguf_file.permute(w, t.rope_heads)


def _encode(model: PreTrainedModel, t: _Tensor, config: ExportGGUFConfig) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The bytes (or float array, ``[rows, cols]``) written for ``t`` and their GGUF type."""
    if t.module is None:
        w = _float_param(model, t)
        qtype = gguf_file.FLOAT_TYPES[config.float_type] if w.dim() >= 2 else Q.F32
        return w.numpy().astype(np.float16 if qtype == Q.F16 else np.float32), qtype
    m = model.get_submodule(t.module)
    assert isinstance(m, QuantLinear)
    qtype, fmt = _block_type(m, t.module)
    codes, scales, zeros = m.codes(), m.scales, m.qzeros
    if t.rope_heads is not None:
        codes, scales, zeros = (gguf_file.permute(x, t.rope_heads) for x in (codes, scales, zeros))
    return fmt.pack(codes, scales, zeros, m.spec)["blocks"].numpy(), qtype


def _reference(model: PreTrainedModel, t: _Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[torch.Tensor, float]:
    """What the file must hold, in float32 GGUF row order, and the distance of that from the model's weight
    (zero except for Q4_1 blocks whose float16 offset is inexact)."""
    if t.module is None:
        w = _float_param(model, t)
        return (w.half().float() if qtype == Q.F16 else w), 0.0
    m = model.get_submodule(t.module)
    assert isinstance(m, QuantLinear)
    w = m.dequantized_weight()
    if qtype == Q.Q4_1:  # d * q + m in float32, as ggml and gguf-py compute it
        q = m.codes().float().reshape(m.out_features, -1, 32)
        stored = q * m.scales.float().unsqueeze(-1) + GGUFQ4_1.offset(m.scales, m.qzeros).float().unsqueeze(-1)
        stored = stored.reshape(w.shape)
        w, off = stored, float((stored - w).abs().max())
    else:
        off = 0.0
    return (w if t.rope_heads is None else gguf_file.permute(w, t.rope_heads)), off


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: list[_Tensor],
           config: ExportGGUFConfig, path: Path) -> dict[str, int]:
    encoded = [(t, *_encode(model, t, config)) for t in plan]
    counts: dict[str, int] = {}
    for _, _, qtype in encoded:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    main = max((q for _, a, q in encoded if a.ndim == 2), key=lambda q: sum(1 for _, _, x in encoded if x == q))
    writer = gguf_file.Writer(path, gguf_file.arch_of(model).arch)
    gguf_file.write_hparams(writer, model, gguf_file.FILE_TYPES[main])
    pre = gguf_file.pre_tokenizer(tokenizer) if config.pre_tokenizer == "auto" else config.pre_tokenizer
    gguf_file.write_vocab(writer, tokenizer, model.config.vocab_size, pre)
    for t, array, qtype in encoded:
        writer.add_tensor(t.gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _check_tensors(model: PreTrainedModel, plan: list[_Tensor], reader: gguf.GGUFReader) -> float:
    """Bit-exact: gguf-py's dequantization of every tensor equals what the model computes with."""
    by_name = {t.name: t for t in reader.tensors}
    extra = sorted(set(by_name) - {t.gguf_name for t in plan})
    if extra:
        raise ToolkitError(f"the GGUF holds tensors the model does not have: {extra[:3]}; this is a bug in the exporter")
    worst_offset = 0.0
    for t in plan:
        rt = by_name[t.gguf_name]
        got = torch.from_numpy(gguf_reader.dequantized_tensor(rt))
        ref, off = _reference(model, t, rt.tensor_type)
        worst_offset = max(worst_offset, off)
        if got.shape != ref.shape or not torch.equal(got, ref.reshape(got.shape)):
            diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("nan")
            raise ToolkitError(f"GGUF tensor {t.gguf_name} ({rt.tensor_type.name}) does not hold the model's {t.param} "
                               f"exactly (max |Δ| {diff:.3g}); this is a bug in the exporter, please report it")
    return worst_offset


@torch.no_grad()
def _check_llama_cpp(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                     config: ExportGGUFConfig) -> dict[str, Any]:
    """llama.cpp's tokenization and logits on two prompts against PyTorch's (when llama-cpp-python is installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"llama_cpp": "not installed: tokenization and logits not checked (pip install llama-cpp-python)"}
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    result = llama_cpp_probe.probe(path, list(PROMPTS), ids)
    worst, agree, total = 0.0, 0, 0
    for text, ours, theirs, logits in zip(PROMPTS, ids, result["tokens"], result["logits"], strict=True):
        if theirs != ours:
            raise ToolkitError(f"llama.cpp tokenizes {text[:20]!r} as {theirs[:8]}..., transformers as {ours[:8]}...; "
                               "set export_gguf: {pre_tokenizer: ...} to the tokenizer's llama.cpp pre-tokenizer")
        got = torch.from_numpy(logits)
        ref = model(input_ids=torch.tensor([ours]), use_cache=False).logits[0].float()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ours)
    if worst > config.llama_cpp_tolerance:
        raise ToolkitError(f"llama.cpp's logits disagree with PyTorch's (relative error {worst:.3g} > "
                           f"{config.llama_cpp_tolerance}); this is a bug in the exporter, please report it")
    return {"llama_cpp": result["version"], "llama_cpp_relative_logit_error": worst,
            "llama_cpp_top1_agreement": agree / total}


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ExportGGUFConfig,
           folder: Path, *, history: tuple[PassConfig, ...] = ()) -> dict[str, Any]:
    """Write ``folder/model.gguf`` (the folder is made atomic by the caller), validate it, return its metrics.
    The GGUF records no quantizer settings: ``history`` is unused."""
    folder = Path(folder)
    plan = _plan(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    counts = _write(model, tokenizer, plan, config, path)
    reader = gguf_reader.read(path)
    offset = _check_tensors(model, plan, reader)
    metrics = {"file": FILE, "bytes": path.stat().st_size, "tensor_types": counts, "bit_exact_tensors": len(plan),
               "q4_1_max_offset_error": offset}
    if config.check_llama_cpp:
        metrics.update(_check_llama_cpp(model, tokenizer, path, config))
    return metrics
