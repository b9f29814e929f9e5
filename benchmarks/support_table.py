"""Every stage on every family's tiny model saved as a checkpoint folder the way the hub stores it, each column a
`toolkit run` of that folder; prints the README's support table from the results.

    .venv/bin/python benchmarks/support_table.py [--families llama qwen2 ...] [--in-memory]

Rows: per family, the tiny model saved by ``save_pretrained`` in bf16 as one safetensors file with the head tied or
untied as the family's tiny config has it, and again with the other head, sharded into several files behind an
index. Every column runs recipes on that folder through ``runner.run`` (what ``toolkit run`` calls, in process,
with an empty cache), so RTN, GPTQ and the exports stream layer by layer as they do for a user's checkpoint:
RTN and GPTQ int4 g32 (GPTQ's summed per-layer output error relative to RTN's, on GPTQ's 8 x 64 calibration
windows of pydoc text, both read back from the runs' packed folders); AWQ; shallow distillation; both ONNX targets of the
float folder, its RTN and its GPTQ model (max |Δlogits| of the export's own check against PyTorch at
accuracy_level 0, over prefill, decode steps and a padded batch, longer than any sliding window); our runtime's
greedy tokens (3 prompts x 32) against transformers' ``generate`` on the float folder and on the RTN model;
onnxruntime-genai on the float ``ort`` export (same tokens as ours); the HF GPTQ checkpoint (relative logit
error of the reloaded checkpoint). A failing stage prints its error in its cell.

``--in-memory`` prints the former table, from the in-memory tiny models (a second source that no longer decides
the README).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit.data import token_windows
from toolkit.interop import genai_probe
from toolkit.models.architectures import decoder_layers, layout_of
from toolkit.models.tiny import FAMILIES, family_config, save_tiny_folder, tiny_model, tiny_tokenizer
from toolkit.passes import awq, distill, export_hf_gptq, gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.passes.onnx import ONNXConfig
from toolkit.passes.onnx import export as onnx_export
from toolkit.paths import atomic_dir
from toolkit.pipeline import recipes, runner
from toolkit.quant import checkpoint
from toolkit.quant.activations import ActivationBuffer
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
def _layer_error(reference: torch.nn.Module, candidate: torch.nn.Module, ids: torch.Tensor = CALIB) -> float:
    """Summed per-layer output error, each candidate layer fed the reference's inputs to that layer."""
    inputs = capture_layer_inputs(reference, ids, batch_size=4)
    hidden = reference(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    total = 0.0
    for i, (a, b) in enumerate(zip(decoder_layers(reference), decoder_layers(candidate), strict=True)):
        inputs.layer, inputs.hidden = i, ActivationBuffer.of(hidden[i].float().split(4))
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


def memory_row(family: str, work: Path) -> dict[str, str]:
    """The former rows: every stage on the in-memory tiny model (a second source; it does not decide the table)."""
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
                                       warmup_steps=1, eval_every=2, checkpoint_every=2, heldout_windows=2)
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

    return _cells([rtn_cell, gptq_cell, awq_cell, distill_cell, export_cell("ort"), export_cell("standard"),
                   runtime_cell, genai_cell, hf_gptq_cell])


SHARD_BYTES = 40_000  # the tiny models' 130-270 kB of bf16 weights in several files
INT4 = {"bits": 4, "group_size": 32}
CALIBRATION = {"count": 8, "length": 64}
ONNX = {"accuracy_level": 0, "tolerance": 1e-3, "threads": 1}


def save_variants(family: str, root: Path) -> list[tuple[str, Path]]:
    """The family's folder with its own head, then the other head (sharded): (label, folder)."""
    tied = bool(family_config(family).tie_word_embeddings)
    own = save_tiny_folder(family, root / "own")
    other = save_tiny_folder(family, root / "other", SHARD_BYTES, tie_word_embeddings=not tied)
    files = len(list(other.glob("*.safetensors")))
    head = {True: "tied", False: "untied"}
    return [(f"bf16, {head[tied]}", own), (f"bf16 in {files} shards, {head[not tied]}", other)]


class FolderRuns:
    """Recipes run on one checkpoint folder; each output under ``work``, the cache shared (steps run once)."""

    def __init__(self, folder: Path, work: Path) -> None:
        self.folder, self.work = folder, work

    def run(self, name: str, passes: list[dict[str, Any]]) -> runner.RunResult:
        recipe = {"model": str(self.folder), "output": str(self.work / name), "passes": passes,
                  "calibration": CALIBRATION, "evaluation": {"count": 2, "length": 32}}
        path = self.work / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        return runner.run(recipes.load(path), progress=False, log=lambda line: None)

    def export_diff(self, name: str, passes: list[dict[str, Any]]) -> float:
        return float(self.run(name, passes).steps[-1].metrics["export"]["max_abs_logit_diff"])


def _greedy_equal(export: Path, model: torch.nn.Module, prompts: list[list[int]] | None = None) -> list[list[int]]:
    engine = load(export, threads=1)
    config = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW)
    ids = prompts or [engine.encode(p) for p in PROMPTS]
    ours = [engine.generate(i, config).token_ids for i in ids]
    differ = sum(o != _hf_greedy(model, i) for o, i in zip(ours, ids, strict=True))
    if differ:
        raise AssertionError(f"greedy tokens differ from transformers on {differ} of {len(ids)} prompts ({export.name})")
    return ours


def folder_row(family: str, folder: Path, work: Path) -> dict[str, str]:
    runs, state = FolderRuns(folder, work), {}

    def rtn_cell() -> str:
        runs.run("rtn", [{"rtn": INT4}])
        return "yes"

    def gptq_cell() -> str:
        runs.run("gptq", [{"gptq": INT4}])
        ref, (rtn_model, gptq_model) = checkpoint.load_model(folder), (checkpoint.load_model(work / m / "model")
                                                                        for m in ("rtn", "gptq"))
        windows = token_windows(tiny_tokenizer(), recipes.CalibrationSpec(**CALIBRATION).windows())  # GPTQ's own
        ratio = _layer_error(ref, gptq_model, windows) / _layer_error(ref, rtn_model, windows)
        return f"yes (layer error {ratio:.2f}x RTN)"

    def awq_cell() -> str:
        runs.run("awq", [{"awq": INT4}])
        return "yes"

    def distill_cell() -> str:
        n = family_config(family).num_hidden_layers
        config = {"student": "shallow", "layers": list(range(0, n, 2)), "steps": 2, "batch_size": 2,
                  "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "heldout_windows": 2, "device": "cpu"}
        runs.run("distill", [{"distill": config}])
        return f"yes ({n} -> {len(config['layers'])} layers)"

    def export_cell(target: str) -> Callable[[], str]:
        def cell() -> str:
            onnx = {"onnx": {"target": target, **ONNX}}
            fp = runs.export_diff(f"{target}-fp", [onnx])
            int4 = max(runs.export_diff(f"{target}-{m}", [{m: INT4}, onnx]) for m in ("rtn", "gptq"))
            return f"yes (max abs dlogits: fp32 {fp:.1e}, int4 {int4:.1e})"
        return cell

    def runtime_cell() -> str:
        state["ours"] = _greedy_equal(work / "ort-fp" / "export", checkpoint.load_model(folder))
        _greedy_equal(work / "ort-rtn" / "export", checkpoint.load_model(work / "ort-rtn" / "model"))
        return f"yes ({len(PROMPTS)} x {NEW} greedy tokens = transformers, float and RTN int4)"

    def genai_cell() -> str:
        export = work / "ort-fp" / "export"
        genai_type = layout_of(checkpoint.load_model(folder)).genai_type
        if genai_type is None:
            return "no: onnxruntime-genai has no model type for this family"
        ids = [load(export, threads=1).encode(p) for p in PROMPTS]
        if [genai_probe.greedy(export, i, NEW) for i in ids] != state["ours"]:
            raise AssertionError("onnxruntime-genai's greedy tokens differ from our runtime's")
        return f"yes (`{genai_type}`, tokens = ours)"

    def hf_gptq_cell() -> str:
        metrics = runs.run("hf-gptq", [{"gptq": INT4}, {"export_hf_gptq": {}}]).steps[-1].metrics
        return f"yes (relative logit error {metrics['relative_logit_error']:.1e})"

    return _cells([rtn_cell, gptq_cell, awq_cell, distill_cell, export_cell("ort"), export_cell("standard"),
                   runtime_cell, genai_cell, hf_gptq_cell])


def _cells(runs: list[Callable[[], str]]) -> dict[str, str]:
    row = {}
    for column, run in zip(COLUMNS, runs, strict=True):
        try:
            row[column] = run()
        except Exception as exc:  # a failing stage is a cell of the table, not the end of the run
            row[column] = f"**no**: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--in-memory", action="store_true", help="the former rows, from in-memory tiny models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| family (`model_type`), checkpoint folder | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    with tempfile.TemporaryDirectory(prefix="support-") as tmp:
        os.environ["TOOLKIT_CACHE"] = str(Path(tmp) / "cache")  # nothing reused from earlier runs
        for family in args.families:
            model_type = family_config(family).model_type
            if args.in_memory:
                rows = [("in memory", memory_row(family, Path(tmp) / family))]
            else:
                rows = [(label, folder_row(family, folder, Path(tmp) / family / label.replace(" ", "_")))
                        for label, folder in save_variants(family, Path(tmp) / family / "src")]
            for label, row in rows:
                print(f"| `tiny-{family}` (`{model_type}`), {label} | " + " | ".join(row[c] for c in COLUMNS) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
