"""Export to ONNX with a KV cache, fused attention and the exact quantized weights; validated against PyTorch.

``target: ort`` uses onnxruntime contrib ops (GroupQueryAttention, MatMulNBits, GatherBlockQuantized,
SkipSimplifiedLayerNormalization); ``target: standard`` uses only ONNX opset >= 23 ops. The folder holds
``model.onnx`` + ``model.onnx.data`` (external weights, relative location), the tokenizer, ``export.json``
(the IO contract the runtime reads) and, for ``ort``, a ``genai_config.json`` for onnxruntime-genai.

Validation fails the export (ToolkitError), it never only warns. It runs twice:
- ``strict``: MatMulNBits / fused DequantizeLinear at accuracy_level 0 (float activations), so the only
  difference from PyTorch is float32 summation order: any copied code, scale or zero point that is wrong shows
  up far above ``tolerance``;
- ``deployed`` (quantized models with accuracy_level > 0): the shipped setting, where level 4 quantizes
  activations to int8 per block. Its error is noise spread over every logit (max |Δ| reaches ~2.5 on SmolLM2
  with random tokens, a few % of the logit range), so it is judged scale-free, per position:
  median over positions of RMS(Δ)/RMS(logits) <= ``deployed_tolerance``; a broken kernel or layout gives ~1 at
  every position. The median, because random-token prompts sometimes produce one atypical hidden state whose
  int8-activation error is huge (3.6 at one of 7 positions on SmolLM2 GPTQ g64, the same with the head at
  float activations; text positions stay <= 0.2), which would otherwise decide the check alone. ``decode``
  compares the one-token steps only, so a broken single-row kernel cannot hide behind prefill rows. Measured
  on SmolLM2 int4 (pooled RMS): RTN g32 0.033, GPTQ g32 0.053, so the bound is 0.1: an order of magnitude
  below a broken graph. Correctness itself is the strict check above (exact weights, float activations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.models.architectures import layout_of
from toolkit.onnx.decoder import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, POSITION_IDS, PRESENT, build_model
from toolkit.onnx.graph import GraphOptions, dims_of
from toolkit.onnx.validate import Probe, op_census, run_checks, session
from toolkit.quant.modules import quantized_modules

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
STRICT_FILE = "_strict.onnx"  # a weightless twin at accuracy_level 0 reading the same data file; deleted after use
TARGETS = ("ort", "standard")
MIN_OPSET = {"ort": 23, "standard": 23}  # RMSNormalization, RotaryEmbedding, Attention


@dataclass(frozen=True)
class ONNXConfig:
    name: ClassVar[str] = "onnx"
    reads_calibration: ClassVar[bool] = False

    target: str = "ort"
    opset: int = 23
    accuracy_level: int = 4  # MatMulNBits: 0 float activations; 4 int8 activations (fastest on CPU)
    # strict check: max |Δlogits| (exact weights, float activations). Summation order alone gives ~1e-4 on
    # SmolLM2 and up to 1.9e-3 (GPTQ g64 asymmetric, one 7-token prefill); a wrong code or scale gives >> 1e-2
    tolerance: float = 5e-3
    deployed_tolerance: float = 0.1  # accuracy_level > 0: RMS(Δlogits) / RMS(logits) (int8 activation noise)
    max_positions: int = 0  # longest context the export serves (rotary cache rows); 0: the model's own
    # ort: batches are right-padded (each row from column 0, as our runtime and onnxruntime-genai feed them) unless
    # this is true, which adds an attention bias for left-padded batches (Hugging Face style) at ~4 % of decode speed
    left_padding: bool = False
    threads: int = 2

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got '{self.target}'")
        if self.opset < MIN_OPSET[self.target]:
            raise ValueError(f"target '{self.target}' needs opset >= {MIN_OPSET[self.target]}, got {self.opset}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0..4 (0 float, 4 int8 activations), got {self.accuracy_level}")
        if self.max_positions and self.max_positions < 64:
            raise ValueError(f"max_positions must be 0 (the model's own) or >= 64, got {self.max_positions}")
        if not (self.tolerance > 0 and self.deployed_tolerance > 0):
            raise ValueError("tolerance and deployed_tolerance must be positive")

    def graph_options(self, accuracy_level: int | None = None) -> GraphOptions:
        level = self.accuracy_level if accuracy_level is None else accuracy_level
        return GraphOptions(self.target, self.opset, level, self.max_positions, self.pads_left)

    @property
    def pads_left(self) -> bool:
        """The standard target's Attention takes the mask as a bias anyway: it serves both paddings."""
        return self.left_padding or self.target == "standard"


def _save(proto: onnx.ModelProto, folder: Path) -> None:
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)  # small shape constants stay inline


def _strict_twin(folder: Path) -> Path:
    """The saved graph with every MatMulNBits at accuracy_level 0, sharing ``model.onnx.data``."""
    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    path = folder / STRICT_FILE
    onnx.save_model(proto, str(path))
    return path


def _validate(model: PreTrainedModel, config: ONNXConfig, folder: Path, quantized: bool) -> dict[str, Any]:
    dims = dims_of(model, config.max_positions)
    probe = Probe(dims, vocab_limit=min(dims.vocab, 256 if dims.vocab < 1000 else dims.vocab))
    shared = config.target == "ort"
    strict_path = _strict_twin(folder)
    try:
        strict = run_checks(session(str(strict_path), 0, config.threads), model, probe, shared, config.pads_left)
    finally:
        strict_path.unlink()
    report: dict[str, Any] = {"strict": strict, "tolerance": config.tolerance}
    failures = [f"strict {k}: max |Δ| {m['max_abs']:.3g} > {config.tolerance}"
                for k, m in strict.items() if not m["max_abs"] <= config.tolerance]
    if quantized and config.accuracy_level > 0:
        sess = session(str(folder / MODEL_FILE), config.accuracy_level, config.threads)
        deployed = run_checks(sess, model, probe, shared, config.pads_left)
        report["deployed"] = deployed
        report["deployed_tolerance"] = config.deployed_tolerance
        failures += [f"accuracy_level {config.accuracy_level} {k}: median relative RMS {m['rel_rms_median']:.3g} > "
                     f"{config.deployed_tolerance}" for k, m in deployed.items()
                     if not m["rel_rms_median"] <= config.deployed_tolerance]
    if failures:
        raise ToolkitError(
            "ONNX export does not match the PyTorch model (max |Δlogits|): " + "; ".join(failures)
            + ". This is a bug in the exporter or an unsupported model variant; please report it with the recipe"
        )
    return report


def _contract(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ONNXConfig) -> dict[str, Any]:
    d = dims_of(model, config.max_positions)
    eos = model.config.eos_token_id
    return {
        "format": "llm-toolkit-onnx/1",
        "target": config.target,
        "model_file": MODEL_FILE,
        "data_file": DATA_FILE,
        "model_type": model.config.model_type,
        "num_layers": d.layers, "num_heads": d.heads, "num_kv_heads": d.kv_heads, "head_dim": d.head_dim,
        "hidden_size": d.hidden, "vocab_size": d.vocab, "max_positions": d.max_positions,
        "dtype": "float32",
        "weights": "int" if quantized_modules(model) else "float32",
        "accuracy_level": config.accuracy_level,
        # batches this graph serves: GQA masks by seqlens_k (right), the bias adds left; standard concatenates past
        "padding": {"standard": "left"}.get(config.target, "left or right" if config.left_padding else "right"),
        "bos_token_id": model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.bos_token_id,
        "eos_token_id": eos if eos is not None else tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key": PAST.replace("{i}", "%d").replace("{kv}", "key"),
                   "past_value": PAST.replace("{i}", "%d").replace("{kv}", "value")},
        "outputs": {"logits": LOGITS, "present_key": PRESENT.replace("{i}", "%d").replace("{kv}", "key"),
                    "present_value": PRESENT.replace("{i}", "%d").replace("{kv}", "value")},
        "kv_layout": "[batch, num_kv_heads, seq, head_dim] float32",
        "past_present_share_buffer": config.target == "ort",
    }


def _genai_config(contract: dict[str, Any], genai_type: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json (decoder-only, past/present shared buffer, greedy defaults);
    ``genai_type`` is the model type its builder writes for the family."""
    inputs, outputs = contract["inputs"], contract["outputs"]
    return {
        "model": {
            "bos_token_id": contract["bos_token_id"], "eos_token_id": contract["eos_token_id"],
            "pad_token_id": contract["pad_token_id"] if contract["pad_token_id"] is not None
            else contract["eos_token_id"],
            "context_length": contract["max_positions"], "type": genai_type,
            "vocab_size": contract["vocab_size"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": contract["head_dim"], "hidden_size": contract["hidden_size"],
                "num_attention_heads": contract["num_heads"], "num_key_value_heads": contract["num_kv_heads"],
                "num_hidden_layers": contract["num_layers"],
                "inputs": {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                           "position_ids": inputs["position_ids"], "past_key_names": inputs["past_key"],
                           "past_value_names": inputs["past_value"]},
                "outputs": {"logits": outputs["logits"], "present_key_names": outputs["present_key"],
                            "present_value_names": outputs["present_value"]},
            },
        },
        "search": {"do_sample": False, "max_length": contract["max_positions"], "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": contract["past_present_share_buffer"],
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


@torch.no_grad()
def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ONNXConfig,
           folder: Path) -> dict[str, Any]:
    """Write the ONNX export into ``folder`` (a fresh temp dir) and prove it; returns manifest metrics."""
    folder = Path(folder)
    model = model.eval()
    proto = build_model(model, config.graph_options())
    census = op_census(proto)
    _save(proto, folder)
    del proto
    onnx.checker.check_model(str(folder / MODEL_FILE))  # by path: the checker reads the external data too
    quantized = bool(quantized_modules(model))
    validation = _validate(model, config, folder, quantized)
    tokenizer.save_pretrained(str(folder))
    contract = _contract(model, tokenizer, config)
    (folder / "export.json").write_text(json.dumps(contract, indent=2) + "\n")
    genai_type = layout_of(model).genai_type
    if config.target == "ort" and genai_type is not None:
        (folder / "genai_config.json").write_text(json.dumps(_genai_config(contract, genai_type), indent=2) + "\n")
    size = sum(p.stat().st_size for p in (folder / MODEL_FILE, folder / DATA_FILE))
    return {"export": {"config": asdict(config), "op_census": census, "validation": validation,
                       "size_bytes": size, "size_mb": round(size / 1e6, 2),
                       "max_abs_logit_diff": max(_all_diffs(validation))}}


def _all_diffs(validation: dict[str, Any]) -> list[float]:
    values = [m["max_abs"] for key in ("strict", "deployed") for m in validation.get(key, {}).values()]
    return [v for v in values if math.isfinite(v)] or [0.0]
