"""Run a recipe: passes in order, each output cached by content, then evaluation and a manifest.

Cache keys hash the input artifact's key (the model's file contents, or the previous step's key), the
pass name and config, the calibration spec (for passes that read it), the library versions and the
toolkit's own source hash. An unchanged recipe is served entirely from cache; changing one pass (or the
code) recomputes from that pass on. A cache entry is served only after every file it holds matches the
sizes and sha256 of its manifest; one that does not (truncated, altered, half-deleted) is recomputed with
a warning, as is an unreadable evaluation entry. The output folder is checked before any work
(``outputs.check_output``), assembled in a temporary sibling and renamed into place only when everything
succeeded.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit import data, manifest, models
from toolkit.errors import ToolkitError
from toolkit.evaluation import perplexity
from toolkit.evaluation.streaming import stream_perplexity
from toolkit.models import chat
from toolkit.models.shape import ModelShape
from toolkit.models.streaming import SkeletonModel, read_config
from toolkit.passes import entry
from toolkit.passes.context import PassContext
from toolkit.paths import atomic_dir, cache_dir, dir_bytes, sha256_json, write_text_atomic
from toolkit.pipeline import budget
from toolkit.pipeline.monitor import Measure
from toolkit.pipeline.outputs import check_output, check_spill
from toolkit.pipeline.recipes import EvaluationSpec, MemorySpec, Recipe, Step
from toolkit.quant import checkpoint
from toolkit.quant.streaming import StreamOptions
from toolkit.schema import record


@dataclass
class StepResult:
    name: str
    key: str
    cache_hit: bool
    folder: Path
    measure: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    is_export: bool = False

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "cache_hit": self.cache_hit, **self.measure, "metrics": self.metrics}


@dataclass
class RunResult:
    output: Path
    before: dict[str, Any]
    after: dict[str, Any]
    steps: list[StepResult]
    seconds: float


class _State:
    """The model as it flows through the steps: loaded only when a step must actually run."""

    def __init__(self, ref: models.ModelRef) -> None:
        self.ref = ref
        self.folder: Path | None = ref.folder
        self.key = ref.key
        self.model: PreTrainedModel | None = None

    def materialize(self) -> PreTrainedModel:
        if self.model is None:
            self.model = checkpoint.load_model(self.folder) if self.folder else models.load(self.ref.source).model
            self.model.config._name_or_path = self.ref.name  # exports name the model (GGUF general.name), not a cache path
        return self.model

    def can_stream(self, step: Step) -> bool:
        """Run ``step`` layer by layer from the shards: it has a streaming form and its input is a checkpoint
        on disk that is not already in memory (float, or for an export also packed)."""
        return (entry(step.config).stream is not None and step.config.streams() and self.model is None and self.folder is not None
                and (step.is_export or not checkpoint.is_packed(self.folder)))


def resolve_device(device: str) -> str:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without CUDA is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("device: cuda was asked but torch sees no CUDA device (or is a CPU-only build); "
                           "use device: cpu or auto")
    return device


def stream_options(memory: MemorySpec, device: str, progress: bool) -> StreamOptions:
    return StreamOptions(device=device, activation_budget_bytes=memory.activations_mb * 2**20,
                         spill_dir=Path(memory.spill_dir) if memory.spill_dir else None,
                         max_shard_bytes=memory.shard_mb * 2**20, progress=progress)


def _step_key(step: Step, input_key: str, recipe: Recipe, versions: dict[str, str], device: str) -> str:
    calib = record(recipe.calibration) if step.reads_calibration else None
    fields = {"input": input_key, "pass": step.name, "config": record(step.config), "calibration": calib,
              "versions": versions}
    if device != "cpu":  # results on an accelerator match the CPU's only within tolerance
        fields["device"] = device
    return sha256_json(fields)


def float_folder(folder: Path | None) -> TypeGuard[Path]:
    """A checkpoint folder of float weights (not a packed artifact): what streams layer by layer from its shards."""
    return folder is not None and not checkpoint.is_packed(folder)


def model_shape(ref: models.ModelRef) -> ModelShape | None:
    from transformers import LlamaConfig

    from toolkit.models.tiny import TINY_CONFIG

    if ref.folder is not None:
        return ModelShape.of_config(read_config(ref.folder))
    if ref.source.startswith("tiny-llama"):
        return ModelShape.of_config(LlamaConfig(**TINY_CONFIG))
    return None  # a hub id or another tiny family: its config is not built just to estimate


def resolve_evaluation(spec: EvaluationSpec, ref: models.ModelRef, shape: ModelShape | None,
                       budget_bytes: int, log: Callable[[str], None]) -> EvaluationSpec:
    """``spec`` with ``streaming`` and ``kl`` decided. Left open, a float checkpoint folder whose in-memory
    evaluation would take a large share of the budget is evaluated one decoder layer at a time, perplexity
    only, and the log says so in one line; an explicit ``streaming`` or ``kl: true`` is kept."""
    if shape is None or not float_folder(ref.folder) or spec.streaming is not None or spec.kl is True:
        return spec.resolved(False)
    streams = budget.evaluation_streams(shape, spec.length, spec.batch_size, budget_bytes)
    if streams:
        need = budget.in_memory_eval_bytes(shape, spec.length, spec.batch_size)
        log(f"evaluation: the float model in memory would take {need / budget.GB:.1f} GB of the "
            f"{budget_bytes / budget.GB:.1f} GB memory budget, so it is evaluated one decoder layer at a time and "
            "KL is off (evaluation: {streaming: false} evaluates in memory, with KL)")
    return spec.resolved(streams)


def check_memory(recipe: Recipe, ref: models.ModelRef, options: StreamOptions,
                 shape: ModelShape | None, budget_bytes: int) -> budget.Estimate | None:
    """Refuse, before anything runs, a recipe whose estimated peak (evaluations included) exceeds its budget."""
    if shape is None:
        return None
    streams, streaming = [], float_folder(ref.folder)
    for step in (s for s in recipe.passes if not s.is_export):
        streaming = streaming and entry(step.config).stream is not None and step.config.streams()
        streams.append(streaming)
    # an export streams from the folder the last pass wrote, or from the input folder (float or packed)
    export_streams = ref.folder is not None and all(streams) and all(
        entry(s.config).stream is not None for s in recipe.passes if s.is_export)
    assert options.activation_budget_bytes is not None
    estimate = budget.estimate_run(recipe, shape, streams, options.activation_budget_bytes, options.max_shard_bytes,
                                   export_streams)
    budget.check(estimate, budget_bytes, recipe.origin)
    return estimate


def _servable(folder: Path, key: str, log: Callable[[str], None]) -> bool:
    """A cache entry is served only when its manifest matches its key and every file's size and sha256."""
    if not folder.exists():
        return False
    problems = manifest.verify_files(folder)
    if not problems and manifest.read_manifest(folder).get("key") != key:
        problems = ["its manifest records another key"]
    if problems:
        log(f"  warning: cache entry {folder} is damaged ({'; '.join(problems[:3])}); recomputing it")
    return not problems


def _run_step(step: Step, state: _State, ctx: PassContext, key: str, log: Callable[[str], None],
              options: StreamOptions) -> StepResult:
    kind = "exports" if step.is_export else "artifacts"
    folder = cache_dir() / kind / key[:32]
    if _servable(folder, key, log):
        log(f"  {step.name}: cached ({folder})")
        meta = manifest.read_manifest(folder).get("step", {})
        result = StepResult(step.name, key, True, folder, meta.get("measure", {}), meta.get("metrics", {}),
                            step.is_export)
    elif state.can_stream(step):
        assert state.folder is not None
        stream = entry(step.config).stream
        assert stream is not None
        log(f"  {step.name}: running layer by layer from {state.folder}")
        with atomic_dir(folder, replace=True) as tmp:
            with Measure() as m:
                src = checkpoint.open_streaming(state.folder, options.device)
                out = stream(src, tmp, step.config, ctx, options)
                metrics = out if step.is_export else {"streaming": out}
                ctx.tokenizer.save_pretrained(tmp)
            info = {"name": step.name, "config": record(step.config), "input_key": state.key,
                    "measure": m.record(), "metrics": metrics}
            manifest.write_manifest(tmp, {"step": info, "key": key})
        result = StepResult(step.name, key, False, folder, m.record(), metrics, step.is_export)
        log(f"  {step.name}: done in {m.seconds:.1f} s, peak RSS {m.peak_rss / 2**20:.0f} MB")
        state.model = None
    else:
        log(f"  {step.name}: running")
        model = state.materialize()
        run_pass = entry(step.config).run
        with atomic_dir(folder, replace=True) as tmp:
            with Measure() as m:
                if step.is_export:
                    metrics = run_pass(model, ctx.tokenizer, step.config, tmp, history=ctx.history) or {}
                else:
                    model = run_pass(model, step.config, ctx)
                    metrics = dict(ctx.findings)
            if not step.is_export:
                checkpoint.save_model(model, ctx.tokenizer, tmp)
            info = {"name": step.name, "config": record(step.config), "input_key": state.key,
                    "measure": m.record(), "metrics": metrics}
            manifest.write_manifest(tmp, {"step": info, "key": key})
        state.model = model
        result = StepResult(step.name, key, False, folder, m.record(), metrics, step.is_export)
        log(f"  {step.name}: done in {m.seconds:.1f} s, peak RSS {m.peak_rss / 2**20:.0f} MB")
    if not step.is_export:
        if result.cache_hit or state.model is None:
            state.model = None  # the in-memory model (if any) is stale; reload lazily from the cache
        state.folder, state.key = folder, key
    return result


def measure(spec: EvaluationSpec, model: models.ModelRef, tokenizer: PreTrainedTokenizerBase,
            reference: str | None, progress: bool, options: StreamOptions | None = None) -> dict[str, Any]:
    """Perplexity (and KL/top-1 against ``reference``) of ``model`` under ``spec``, with its size on disk and
    load time: what every evaluation reports, cached (``_evaluate``) or not (``toolkit eval``). With
    ``spec.streaming`` a float checkpoint folder is evaluated one decoder layer at a time."""
    start = time.perf_counter()
    folder = model.folder
    windows = data.token_windows(tokenizer, spec.windows())
    if spec.streaming and float_folder(folder):
        options = options or StreamOptions()
        src = SkeletonModel(folder, device=options.device)
        load_seconds = time.perf_counter() - start
        metrics: dict[str, Any] = stream_perplexity(src, windows, spec.batch_size, options)
        metrics["bytes"] = dir_bytes(folder)
    else:
        loaded = checkpoint.load_model(folder) if folder else models.load(model.source).model
        load_seconds = time.perf_counter() - start
        ref_model = checkpoint.load(reference).model if reference else None
        metrics = perplexity.evaluate(loaded, windows, ref_model, spec.batch_size, progress)
        metrics["bytes"] = (dir_bytes(folder) if folder
                            else sum(p.numel() * p.element_size() for p in loaded.parameters()))
    metrics["load_seconds"] = load_seconds
    metrics["windows"] = spec.windows().record()
    return metrics


def _cached_metrics(path: Path) -> dict[str, Any] | None:
    """A cached evaluation, or None when it is missing, truncated or lacks a finite perplexity."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    ppl = metrics.get("perplexity")
    finite = isinstance(ppl, int | float) and math.isfinite(ppl) and ppl > 0
    return metrics if finite and isinstance(metrics.get("bytes"), int) and "windows" in metrics else None


def _evaluate(spec: EvaluationSpec, ref: models.ModelRef, folder: Path | None, key: str,
              tokenizer: PreTrainedTokenizerBase, reference: bool, progress: bool,
              log: Callable[[str], None], options: StreamOptions | None = None) -> dict[str, Any]:
    versions = manifest.library_versions()
    use_kl = reference and spec.kl
    eval_key = sha256_json({"model": key, "eval": record(spec), "reference": ref.key if use_kl else None,
                            "versions": versions})
    path = cache_dir() / "evals" / f"{eval_key[:32]}.json"
    cached = _cached_metrics(path)
    if cached is not None:
        return {**cached, "cache_hit": True}
    if path.exists():
        log(f"  warning: evaluation cache entry {path} is unreadable or incomplete; recomputing it")
    target = ref if folder is None else models.ModelRef(str(folder), key, folder)
    metrics = measure(spec, target, tokenizer, ref.source if use_kl else None, progress, options)
    write_text_atomic(path, json.dumps(metrics, indent=2))
    return {**metrics, "cache_hit": False}


def _assemble(output: Path, recipe: Recipe, state: _State, results: list[StepResult],
              before: dict[str, Any], after: dict[str, Any], seconds: float, overwrite: bool) -> None:
    from toolkit.evaluation.report import before_after_table

    check_output(output, _reads(recipe), overwrite)  # again: the folder may have appeared during the run
    with atomic_dir(output, replace=overwrite) as tmp:
        model_steps = [r for r in results if not r.is_export]
        if model_steps and state.folder is not None:
            shutil.copytree(state.folder, tmp / "model")
        exports = [r for r in results if r.is_export]
        if exports:
            shutil.copytree(exports[-1].folder, tmp / "export")
        metrics = {"before": before, "after": after}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "report.md").write_text(before_after_table(before, after) + "\n")
        manifest.write_manifest(tmp, {
            "recipe": recipe.record(),
            "recipe_file": recipe.origin,
            "model": {"source": recipe.model, "key": state.ref.key, "output_key": state.key},
            "steps": [r.record() for r in results],
            "metrics": metrics,
            "seconds": round(seconds, 3),
        })


def _reads(recipe: Recipe) -> list[Path]:
    """What the run reads and its output must never replace: the recipe file and a local model."""
    reads = [Path(recipe.origin)] if Path(recipe.origin).is_file() else []
    model = Path(recipe.model).expanduser()
    if model.exists():
        reads.append(model)
    elif recipe.model == "smollm2":
        reads.append(models.smollm2_gguf_path())
    return reads


def run(recipe: Recipe, output: Path | None = None, progress: bool = True,
        log: Callable[[str], None] = print, overwrite: bool = False) -> RunResult:
    """Run ``recipe``; ``overwrite`` allows replacing a previous toolkit output at ``output``."""
    start = time.perf_counter()
    torch.manual_seed(0)
    output = check_output(Path(output or recipe.output), _reads(recipe), overwrite)
    if recipe.memory.spill_dir:
        check_spill(Path(recipe.memory.spill_dir), output, _reads(recipe))
    ref = models.resolve(recipe.model)
    models.check_lengths(ref, {"evaluation.length": recipe.evaluation.length,
                               **({"calibration.length": recipe.calibration.length}
                                  if any(s.reads_calibration for s in recipe.passes) else {})})
    device = resolve_device(recipe.device)
    options = stream_options(recipe.memory, device, progress)
    if ref.folder is not None:  # before anything is built from its config
        checkpoint.check_weights(ref.folder)
    shape, budget_bytes = model_shape(ref), budget.budget_bytes(recipe.memory.budget_gb)
    recipe = replace(recipe, evaluation=resolve_evaluation(recipe.evaluation, ref, shape, budget_bytes, log))
    check_memory(recipe, ref, options, shape, budget_bytes)
    tokenizer = models.load_tokenizer(ref)
    if recipe.calibration.format == "chat" and any(s.reads_calibration for s in recipe.passes):
        chat.check(tokenizer, chat.origin(ref))
    versions = manifest.library_versions()
    state = _State(ref)
    log(f"model {recipe.model} ({ref.key[:12]}), device {device}")
    before: dict[str, Any] = {}
    if recipe.evaluation.baseline:
        before = _evaluate(recipe.evaluation, ref, ref.folder, ref.key, tokenizer, False, progress, log, options)
        log(f"  baseline perplexity {before['perplexity']:.3f}{' (cached)' if before['cache_hit'] else ''}")
    results: list[StepResult] = []
    for i, step in enumerate(recipe.passes):
        key = _step_key(step, state.key, recipe, versions, device)
        ctx = PassContext(
            tokenizer=tokenizer,
            calibration_loader=lambda: data.token_windows(tokenizer, recipe.calibration.windows()),
            original_loader=lambda: checkpoint.load(recipe.model).model,
            workdir=cache_dir() / "work" / key[:32],
            progress=progress,
            device=device,
            history=tuple(s.config for s in recipe.passes[:i] if not s.is_export),
        )
        results.append(_run_step(step, state, ctx, key, log, options))
    if any(not r.is_export for r in results):
        after = _evaluate(recipe.evaluation, ref, state.folder, state.key, tokenizer, True, progress, log, options)
    elif before:
        after = before
    else:  # export steps only and no baseline: the model itself is what is evaluated
        after = _evaluate(recipe.evaluation, ref, ref.folder, ref.key, tokenizer, False, progress, log, options)
    seconds = time.perf_counter() - start
    _assemble(output, recipe, state, results, before, after, seconds, overwrite)
    return RunResult(output, before, after, results, seconds)


def require_model_steps(recipe: Recipe) -> None:
    if not recipe.passes:
        raise ToolkitError(f"{recipe.origin}: 'passes' is empty; add at least one pass (e.g. '- rtn: {{bits: 4}}')")
