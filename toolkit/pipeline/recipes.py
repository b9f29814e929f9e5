"""Recipes: YAML -> strict schema -> frozen configs.

    model: smollm2                      # 'smollm2', 'tiny-llama', a folder, a .gguf file, or a hub id
    calibration: {source: pydoc, count: 128, length: 512, sampling: random, seed: 0}
    evaluation: {source: pydoc, count: 16, length: 512}
    passes:                             # run in order; each entry is {pass name: settings}
      - rtn: {bits: 4, group_size: 32, symmetric: true}
      - onnx: {target: ort}             # an export step, if any, comes last
    output: runs/smollm2-int4-rtn       # relative paths resolve against the current directory
    device: auto                        # where every pass computes: auto (CUDA when present), cpu, cuda
    memory: {budget_gb: null, activations_mb: 512}   # refuse runs estimated above the budget
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from toolkit.data import Sampling, TextFormat, WindowSpec
from toolkit.errors import ToolkitError
from toolkit.passes import PASSES, configs
from toolkit.passes.base import PassConfig, QuantPassConfig
from toolkit.schema import brief, build, record


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "pydoc"
    count: int = 128
    length: int = 512
    sampling: Sampling = "random"  # the calibration half holds ~120 non-overlapping 512-token windows
    seed: int = 0
    text_field: str = "text"
    format: TextFormat = "text"  # chat: each document as a conversation in the model's chat template (instruct models)

    def __post_init__(self) -> None:
        self.windows()  # validates

    def windows(self) -> WindowSpec:
        return WindowSpec(source=self.source, split="calibration", length=self.length, count=self.count,
                          sampling=self.sampling, seed=self.seed, text_field=self.text_field, format=self.format)


@dataclass(frozen=True)
class EvaluationSpec:
    source: str = "pydoc"
    count: int = 16
    length: int = 512
    batch_size: int = 1
    # KL divergence and top-1 agreement against the unoptimized model; null: on unless the evaluation streams
    kl: bool | None = None
    text_field: str = "text"
    baseline: bool = True  # evaluate the input model too (off: only the result is evaluated)
    # the baseline (a float checkpoint folder) evaluated one decoder layer at a time, perplexity only (so not with
    # kl: true); null: decided from the memory budget (``budget.evaluation_streams``), said in one line
    streaming: bool | None = None

    def __post_init__(self) -> None:
        self.windows()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.streaming and self.kl:
            raise ValueError("streaming evaluation computes perplexity only: set kl: false with streaming: true")

    def windows(self) -> WindowSpec:
        return WindowSpec(source=self.source, split="evaluation", length=self.length, count=self.count,
                          sampling="sequential", seed=0, text_field=self.text_field)

    def resolved(self, streams: bool) -> EvaluationSpec:
        """This spec with ``streaming`` and ``kl`` decided: an explicit setting wins, then ``streams``."""
        streaming = self.streaming if self.streaming is not None else streams
        return replace(self, streaming=streaming, kl=self.kl if self.kl is not None else not streaming)


Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass(frozen=True)
class MemorySpec:
    budget_gb: float | None = None  # a run whose estimate exceeds it is refused; None: the memory available at start
    activations_mb: int = 512  # calibration activations kept in memory by streaming passes; the rest spill to disk
    shard_mb: int = 1024  # output shard size of streaming passes
    spill_dir: str | None = None  # where activations spill (default: the system temporary folder)

    def __post_init__(self) -> None:
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"budget_gb must be a positive number of GB (or null: the available memory), got {self.budget_gb}")
        if self.activations_mb < 0:
            raise ValueError(f"activations_mb must be >= 0 (0 spills every batch), got {self.activations_mb}")
        if self.shard_mb < 1:
            raise ValueError(f"shard_mb must be >= 1, got {self.shard_mb}")


@dataclass(frozen=True)
class Step:
    config: PassConfig  # a registered pass config (toolkit.passes)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_export(self) -> bool:
        return self.config.kind == "export"

    @property
    def reads_calibration(self) -> bool:
        return self.config.reads_calibration


@dataclass(frozen=True)
class Recipe:
    model: str
    output: str
    passes: tuple[Step, ...] = ()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: Device = "auto"  # where every pass computes: auto (CUDA when present), cpu, cuda
    memory: MemorySpec = field(default_factory=MemorySpec)
    origin: str = "<recipe>"

    def record(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "calibration": record(self.calibration),
            "evaluation": record(self.evaluation),
            "passes": [{s.name: record(s.config)} for s in self.passes],
            "device": self.device,
            "memory": record(self.memory),
        }


TOP_KEYS = ("model", "calibration", "evaluation", "passes", "output", "device", "memory")


def _step(entry: Any, origin: str, index: int) -> Step:
    path = f"passes[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ToolkitError(f"{origin}: {path}: each pass is a one-key mapping like '- rtn: {{bits: 4}}', got {brief(entry)}")
    (name, settings), = entry.items()
    known = configs()
    if name not in known:
        raise ToolkitError(f"{origin}: {path}: unknown pass '{name}'; available: {', '.join(sorted(known))}")
    if isinstance(settings, dict) and "device" in settings:  # one device for the whole recipe
        raise ToolkitError(f"{origin}: {path}.{name}.device: the device is set once for every pass, by the "
                           f"recipe's top-level 'device:' key ({', '.join(DEVICES)}); move it there")
    return Step(build(known[name], settings, origin, f"{path}.{name}"))


def _check_chain(steps: tuple[Step, ...], origin: str) -> None:
    """Passes that cannot follow one another are refused before any pass runs: each pass checks the ones after
    it (``PassConfig.check_followers``), and an export that cannot hold the quantization an earlier pass makes
    refuses it."""
    for i, step in enumerate(steps):
        try:
            step.config.check_followers(tuple(s.config for s in steps[i + 1:]))
        except ValueError as exc:
            raise ToolkitError(f"{origin}: passes[{i}].{step.name}: {exc}") from None
    holds = PASSES[type(steps[-1].config)].holds if steps else None
    if holds is None:
        return
    for i, step in enumerate(steps[:-1]):
        if isinstance(step.config, QuantPassConfig):
            try:
                holds(step.config.scheme, steps[-1].config)
            except ToolkitError as exc:
                raise ToolkitError(f"{origin}: passes[{i}].{step.name} then {steps[-1].name}: {exc}") from None


def parse(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise ToolkitError(f"{origin}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ToolkitError(f"{origin}: unknown key '{unknown[0]}'; allowed keys: {', '.join(TOP_KEYS)}")
    for required in ("model", "output"):
        if not isinstance(data.get(required), str) or not data[required]:
            raise ToolkitError(f"{origin}: '{required}' is required and must be a non-empty string")
    raw_passes = data.get("passes") or []
    if not isinstance(raw_passes, list):
        raise ToolkitError(f"{origin}: 'passes' must be a list of one-key mappings")
    steps = tuple(_step(e, origin, i) for i, e in enumerate(raw_passes))
    device = data.get("device", "auto")
    if device not in DEVICES:
        raise ToolkitError(f"{origin}: device: '{device}' is not one of {', '.join(DEVICES)}")
    for i, step in enumerate(steps[:-1]):
        if step.is_export:
            raise ToolkitError(f"{origin}: passes[{i}]: export step '{step.name}' must be the last pass")
    _check_chain(steps, origin)
    return Recipe(
        model=data["model"],
        output=data["output"],
        passes=steps,
        calibration=build(CalibrationSpec, data.get("calibration"), origin, "calibration"),
        evaluation=build(EvaluationSpec, data.get("evaluation"), origin, "evaluation"),
        device=device,
        memory=build(MemorySpec, data.get("memory"), origin, "memory"),
        origin=origin,
    )


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ToolkitError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8 YAML") from None
    except OSError as exc:
        raise ToolkitError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ToolkitError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse(data, str(path))
