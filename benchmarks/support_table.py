"""Run every stage on the tiny model of every family and print the README's support table from the results.

    .venv/bin/python benchmarks/support_table.py [--families llama qwen2 ...]

Each cell comes from a run: the quantization passes (RTN; GPTQ with its summed per-layer output error relative
to RTN's on the same calibration windows; AWQ; shallow distillation), both ONNX targets (max |Δlogits| against
transformers at float32 and for the RTN and GPTQ int4 models at accuracy_level 0, over prefill, decode steps and a
padded batch of 2, longer than any sliding window), our runtime's greedy tokens against transformers' ``generate``
(3 prompts x 32 tokens), onnxruntime-genai on the unchanged ``ort`` export (same tokens as ours), and the
HF GPTQ checkpoint (relative logit error of the reloaded checkpoint). A failing stage prints its error.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.interop import genai_probe
from toolkit.models.architectures import decoder_layers, layout_of
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import awq, distill, export_hf_gptq, gptq, rtn
from toolkit.passes.onnx import ONNXConfig
from toolkit.passes.onnx import export as onnx_export
from toolkit.paths import atomic_dir
from toolkit.pipeline.context import PassContext
from toolkit.quant.calibration import capture_layer_inputs
from toolkit.runtime import GenerationConfig, load

CALIB = torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(0))
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Sliding windows forget the start", "0123456789abcdefghij"]
NEW = 32
COLUMNS = ["RTN", "GPTQ", "AWQ", "distill", "`ort` export", "`standard` export", "runtime", "onnxruntime-genai",
           "HF GPTQ checkpoint"]


def _ctx(family: str, work: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), work)


@torch.no_grad()
def _layer_error(reference: torch.nn.Module, candidate: torch.nn.Module) -> float:
    inputs = capture_layer_inputs(reference, CALIB, batch_size=4)
    hidden = reference(input_ids=CALIB, use_cache=False, output_hidden_states=True).hidden_states
    total = 0.0
    for i, (a, b) in enumerate(zip(decoder_layers(reference), decoder_layers(candidate), strict=True)):
        inputs.layer, inputs.hidden = i, hidden[i].float()
        total += sum(float(((a(h, **kw) - b(h, **kw)) ** 2).mean()) for h, kw in inputs.batches())
    return total


def _export(model: torch.nn.Module, folder: Path, target: str) -> float:
    with atomic_dir(folder) as tmp:
        result = onnx_export(model, tiny_tokenizer(), ONNXConfig(target=target, accuracy_level=0, tolerance=1e-3,
                                                                 threads=1), tmp)["export"]
    return max(m["max_abs"] for m in result["validation"]["strict"].values())


def _hf_greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def family_row(family: str, work: Path) -> dict[str, str]:
    state: dict[str, Any] = {}

    def rtn_cell() -> str:
        state["rtn"] = rtn.apply(tiny_model(family), rtn.RTNConfig())
        return "yes"

    def gptq_cell() -> str:
        state["gptq"] = gptq.apply(tiny_model(family), gptq.GPTQConfig(), _ctx(family, work / "gptq"))
        body = {k: rtn.apply(tiny_model(family), rtn.RTNConfig(lm_head_bits=None)) if k == "rtn" else
                gptq.apply(tiny_model(family), gptq.GPTQConfig(lm_head_bits=None), _ctx(family, work / "g2"))
                for k in ("rtn", "gptq")}
        ref = tiny_model(family)
        return f"yes (layer error {_layer_error(ref, body['gptq']) / _layer_error(ref, body['rtn']):.2f}x RTN)"

    def awq_cell() -> str:
        awq.apply(tiny_model(family), awq.AWQConfig(), _ctx(family, work / "awq"))
        return "yes"

    def distill_cell() -> str:
        n = tiny_model(family).config.num_hidden_layers
        config = distill.DistillConfig(student="shallow", layers=tuple(range(0, n, 2)), steps=2, batch_size=2,
                                       warmup_steps=1, eval_every=2, checkpoint_every=2, heldout_windows=2,
                                       device="cpu")
        student = distill.apply(tiny_model(family), config, _ctx(family, work / "distill"))
        return f"yes ({n} -> {student.config.num_hidden_layers} layers)"

    def export_cell(target: str) -> Callable[[], str]:
        def run() -> str:
            float_d = _export(tiny_model(family), work / f"{target}-fp32", target)
            int4 = max(_export(state[k], work / f"{target}-{k}", target) for k in ("rtn", "gptq"))
            return f"yes (max abs dlogits: fp32 {float_d:.1e}, int4 {int4:.1e})"
        return run

    def runtime_cell() -> str:
        engine = load(work / "ort-fp32", threads=1)
        config = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW)
        model = tiny_model(family)
        state["ids"] = [engine.encode(p) for p in PROMPTS]
        state["ours"] = [engine.generate(ids, config).token_ids for ids in state["ids"]]
        same = sum(o == _hf_greedy(model, ids) for o, ids in zip(state["ours"], state["ids"], strict=True))
        if same != len(PROMPTS):
            raise AssertionError(f"greedy tokens differ from transformers on {len(PROMPTS) - same} prompts")
        return f"yes ({len(PROMPTS)} x {NEW} greedy tokens = transformers)"

    def genai_cell() -> str:
        if layout_of(tiny_model(family)).genai_type is None:
            return "no: onnxruntime-genai has no model type for this family"
        theirs = [genai_probe.greedy(work / "ort-fp32", ids, NEW) for ids in state["ids"]]
        if theirs != state["ours"]:
            raise AssertionError("onnxruntime-genai's greedy tokens differ from our runtime's")
        return f"yes (`{layout_of(tiny_model(family)).genai_type}`, tokens = ours)"

    def hf_gptq_cell() -> str:
        res = export_hf_gptq.export(state["gptq"], tiny_tokenizer(), export_hf_gptq.ExportHFGPTQConfig(),
                                    work / "hf-gptq")
        return f"yes (relative logit error {res['relative_logit_error']:.1e})"

    cells: dict[str, Callable[[], str]] = dict(zip(COLUMNS, [
        rtn_cell, gptq_cell, awq_cell, distill_cell, export_cell("ort"), export_cell("standard"), runtime_cell,
        genai_cell, hf_gptq_cell], strict=True))
    row = {}
    for column, run in cells.items():
        try:
            row[column] = run()
        except Exception as exc:  # a failing stage is a cell of the table, not the end of the run
            row[column] = f"**no**: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| family (`model_type`) | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    with tempfile.TemporaryDirectory(prefix="support-") as tmp:
        for family in args.families:
            row = family_row(family, Path(tmp) / family)
            model_type = tiny_model(family).config.model_type
            print(f"| `tiny-{family}` (`{model_type}`) | " + " | ".join(row[c] for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
