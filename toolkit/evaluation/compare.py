"""CI gate: compare a candidate report with a baseline; fail on a perplexity or latency regression.

Report schema (``toolkit-report/1``; ``benchmarks/bench_runtime.py --report`` writes it):

    {
      "schema": "toolkit-report/1",
      "name": "smollm2-int4 (free text)",
      "model": {"source_hash": "...", "recipe": "...", "export_hash": "..."},   # what was measured
      "metrics": {"perplexity": 19.94},                 # optional; lower is better
      "latency": {                                      # repeated samples, milliseconds, lower is better
        "decode_ms_per_token": [5.6, 5.4, ...],         # every decode step of every repeat
        "ttft_ms": [370.1, 365.2, ...]                  # one per repeat
      },
      "latency_groups": {                               # optional: the same samples split by process
        "decode_ms_per_token": [[5.6, ...], [5.9, ...]]
      }
    }

Latency is judged on samples, not on one number: the ratio of medians (candidate / baseline) gets
a bootstrap 95% confidence interval. A metric regresses when the interval's lower end is at least
1 + threshold/2 (the slowdown is surely more than jitter) AND its upper end reaches 1 + threshold
(a slowdown of the threshold's size is plausible). Identical runs and a few percent of run-to-run
jitter have a lower end near 1 and pass; a true slowdown of the threshold's size fails. Noisy
samples widen the interval and pass: the markdown shows the interval so a reviewer sees it. Perplexity is one deterministic
number: the relative increase is compared with its threshold directly.

When both reports split their samples by process (``latency_groups``, two or more each), the bootstrap
resamples processes first and samples within them second: on shared machines a process's speed can differ from
the next one's by more than a token's from the next token's, and resampling tokens alone would call that
difference a regression.

The gate refuses (exit 2) what it cannot judge: a report that is not a JSON object, a non-finite or non-positive
perplexity or latency sample, a metric the baseline has and the candidate lacks, and two reports of different
models (a different source hash or recipe; without a source hash in either, as other tools write them, a different
``name``) unless ``--allow-different-models`` says the comparison is intended. The export hash is
shown, not compared: a candidate is usually a new export of the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.paths import read_json, sha256_file, sha256_json
from toolkit.schema import brief

SCHEMA = "toolkit-report/1"
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class Thresholds:
    max_ppl_increase: float = 0.01  # relative: 0.01 = 1 %
    max_latency_regression: float = 0.10
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.max_ppl_increase < 0 or self.max_latency_regression <= 0:
            raise ToolkitError("thresholds must be positive fractions or percentages, e.g. 1% or 0.01")
        if not (math.isfinite(self.max_ppl_increase) and math.isfinite(self.max_latency_regression)):
            raise ToolkitError("thresholds must be finite, e.g. 1% or 0.01")
        if not 0.5 < self.confidence < 1:
            raise ToolkitError(f"confidence must be in (0.5, 1) (got {self.confidence})")


@dataclass(frozen=True)
class Row:
    metric: str
    baseline: float
    candidate: float
    change: float  # relative, candidate / baseline - 1
    interval: tuple[float, float] | None  # relative change, for latency
    regressed: bool


@dataclass(frozen=True)
class CompareResult:
    rows: list[Row]
    markdown: str

    @property
    def passed(self) -> bool:
        return not any(r.regressed for r in self.rows)


def load_report(source: Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        report = source
    else:
        report = read_json(Path(source), "write it with benchmarks/bench_runtime.py --report")
    where = "report" if isinstance(source, dict) else str(source)
    if not isinstance(report, dict):
        raise ToolkitError(f"{where} holds a JSON {type(report).__name__}, not a {SCHEMA} report (a JSON object); "
                           "write it with benchmarks/bench_runtime.py --report")
    if report.get("schema") != SCHEMA:
        raise ToolkitError(f"{where}: report schema is {brief(report.get('schema'))}, expected {SCHEMA!r}: write it "
                           "with benchmarks/bench_runtime.py --report")
    for key in ("metrics", "latency", "latency_groups", "model"):
        if not isinstance(report.get(key, {}), dict):
            raise ToolkitError(f"{where}: report '{key}' must be a mapping; write the report with "
                               "benchmarks/bench_runtime.py")
    if not isinstance(report.get("name", ""), str):
        raise ToolkitError(f"{where}: report 'name' must be a string, got {brief(report['name'])}")
    return report


IDENTITY_KEYS = ("source_hash", "recipe")  # what makes two reports the same model; export_hash is shown only


def _check_same_name(base: dict[str, Any], cand: dict[str, Any], allow_different: bool) -> list[str]:
    """Reports without a source hash (other tools write them): their names are all that tells the models apart."""
    name_a, name_b = base.get("name"), cand.get("name")
    if name_a == name_b:
        return ["model identity: unknown (no source hash in either report); the gate compares reports of the same "
                "name and cannot tell what was measured"]
    if not allow_different:
        raise ToolkitError(f"the reports carry no source hash and name different models ({brief(name_a)} vs "
                           f"{brief(name_b)}); pass --allow-different-models if that comparison is intended")
    return [f"different models compared on purpose (names {brief(name_a)} vs {brief(name_b)}, no source hash)"]


def check_same_model(base: dict[str, Any], cand: dict[str, Any], allow_different: bool) -> list[str]:
    """Refuse reports of different models unless allowed; notes for the markdown (unknown or allowed identity)."""
    a, b = base.get("model") or {}, cand.get("model") or {}
    named = [] if a.get("source_hash") or b.get("source_hash") else _check_same_name(base, cand, allow_different)
    if not a and not b:
        return named
    if not a or not b:
        if allow_different:
            return ["model identity: only one report records it (allowed by --allow-different-models)"]
        raise ToolkitError(f"only the {'candidate' if b else 'baseline'} report records its model; regenerate both "
                           "with benchmarks/bench_runtime.py, or pass --allow-different-models")
    differs = [k for k in IDENTITY_KEYS if a.get(k) != b.get(k)]
    if differs and not allow_different:
        raise ToolkitError("the reports measure different models (" + ", ".join(
            f"{k}: {str(a.get(k))[:16]} vs {str(b.get(k))[:16]}" for k in differs) + "); pass "
            "--allow-different-models if that comparison is intended")
    notes = named + [f"model: source {str(b.get('source_hash'))[:12]}, recipe {b.get('recipe_file') or b.get('recipe')}, export "
             f"{str(a.get('export_hash'))[:12]} -> {str(b.get('export_hash'))[:12]}"]
    return notes + ([f"different models compared on purpose ({', '.join(differs)})"] if differs else [])


def _finite_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_values(base: dict[str, Any], cand: dict[str, Any]) -> None:
    """Exit-2 refusals: a metric the baseline has and the candidate lacks, or any non-finite figure or sample."""
    for side, report in (("baseline", base), ("candidate", cand)):
        ppl = report.get("metrics", {}).get("perplexity")
        if ppl is not None and not _finite_positive(ppl):
            raise ToolkitError(f"{side} perplexity is {ppl!r}: not a finite positive number; the run that produced "
                               "it is broken, so nothing can be judged")
        for name, samples in report.get("latency", {}).items():
            if not isinstance(samples, list) or not samples:
                raise ToolkitError(f"{side} latency '{name}' has no samples")
            bad = sum(not _finite_positive(x) for x in samples)
            if bad:
                raise ToolkitError(f"{side} latency '{name}' has {bad} of {len(samples)} samples that are not finite "
                                   "positive numbers; rerun the benchmark")
        for name, groups in report.get("latency_groups", {}).items():
            if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                raise ToolkitError(f"{side} latency_groups '{name}' must be a list of sample lists (one per process)")
            bad = sum(not _finite_positive(x) for g in groups for x in g)
            if bad:
                raise ToolkitError(f"{side} latency_groups '{name}' has {bad} samples that are not finite positive "
                                   "numbers; rerun the benchmark")
    if "perplexity" in base.get("metrics", {}) and "perplexity" not in cand.get("metrics", {}):
        raise ToolkitError("the baseline has a perplexity and the candidate has none: record it "
                           "(bench_runtime.py --perplexity PPL)")
    missing = [k for k in base.get("latency", {}) if k not in cand.get("latency", {})]
    if missing:
        raise ToolkitError(f"the candidate lacks latency {', '.join(missing)} that the baseline has; "
                           "measure both with the same benchmark settings")


Groups = list[np.ndarray]


def _medians(groups: Groups, rng: np.random.Generator) -> np.ndarray:
    """BOOTSTRAP_ROUNDS medians: pick groups with replacement, then samples with replacement among theirs."""
    if len(groups) == 1:
        x = groups[0]
        return np.median(rng.choice(x, (BOOTSTRAP_ROUNDS, len(x))), axis=1)
    out = np.empty(BOOTSTRAP_ROUNDS)
    for i in range(BOOTSTRAP_ROUNDS):
        pooled = np.concatenate([groups[j] for j in rng.integers(0, len(groups), len(groups))])
        out[i] = np.median(rng.choice(pooled, len(pooled)))
    return out


def ratio_interval(base: Groups, cand: Groups, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of median(cand) / median(base), resampling each side independently."""
    rng = np.random.default_rng(seed)
    ratios = _medians(cand, rng) / _medians(base, rng)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def _groups(report: dict[str, Any], name: str) -> Groups:
    """The metric's samples split by process when the report has them (and they match the flat list)."""
    flat = np.asarray(report["latency"][name], float)
    groups = report.get("latency_groups", {}).get(name)
    if groups and len(groups) >= 2 and sum(len(g) for g in groups) == len(flat):
        return [np.asarray(g, float) for g in groups]
    return [flat]


def latency_row(name: str, base: Groups, cand: Groups, t: Thresholds) -> Row:
    if sum(map(len, base)) < 3 or sum(map(len, cand)) < 3:
        raise ToolkitError(f"latency '{name}' needs at least 3 samples per report (repeat the benchmark)")
    if (len(base) > 1) != (len(cand) > 1):  # judge both sides the same way
        base, cand = [np.concatenate(base)], [np.concatenate(cand)]
    lo, hi = ratio_interval(base, cand, t.confidence)
    # the slowdown is surely at least half the threshold, and the threshold itself is plausible
    regressed = lo >= 1.0 + t.max_latency_regression / 2 and hi >= 1.0 + t.max_latency_regression
    ma, mb = float(np.median(np.concatenate(base))), float(np.median(np.concatenate(cand)))
    return Row(name, ma, mb, mb / ma - 1, (lo - 1, hi - 1), regressed)


def compare(baseline: Path | dict[str, Any], candidate: Path | dict[str, Any],
            thresholds: Thresholds | None = None, allow_different_models: bool = False) -> CompareResult:
    t = thresholds or Thresholds()
    base, cand = load_report(baseline), load_report(candidate)
    check_values(base, cand)
    notes = check_same_model(base, cand, allow_different_models)
    rows = []
    ppl_a, ppl_b = base.get("metrics", {}).get("perplexity"), cand.get("metrics", {}).get("perplexity")
    if ppl_a is not None and ppl_b is not None:
        change = ppl_b / ppl_a - 1
        rows.append(Row("perplexity", ppl_a, ppl_b, change, None, change > t.max_ppl_increase))
    shared = [k for k in base.get("latency", {}) if k in cand.get("latency", {})]
    rows += [latency_row(k, _groups(base, k), _groups(cand, k), t) for k in shared]
    if not rows:
        raise ToolkitError("the reports share no metric (perplexity or latency): nothing to compare")
    markdown = to_markdown(rows, t, base.get("name", "baseline"), cand.get("name", "candidate"))
    return CompareResult(rows, markdown + "".join(f"\nNote: {n}\n" for n in notes))


def to_markdown(rows: list[Row], t: Thresholds, base_name: str, cand_name: str) -> str:
    verdict = "FAIL: regression" if any(r.regressed for r in rows) else "PASS"
    lines = [f"# Compare: {cand_name} vs {base_name}: {verdict}", "",
             f"Thresholds: perplexity +{t.max_ppl_increase:.1%}, latency +{t.max_latency_regression:.1%} "
             f"({t.confidence:.0%} bootstrap interval of the median ratio).", "",
             "| metric | baseline | candidate | change | interval | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        interval = f"[{r.interval[0]:+.1%}, {r.interval[1]:+.1%}]" if r.interval else "-"
        lines.append(f"| {r.metric} | {r.baseline:.4g} | {r.candidate:.4g} | {r.change:+.1%} | {interval} | "
                     f"{'regressed' if r.regressed else 'ok'} |")
    return "\n".join(lines) + "\n"


def parse_fraction(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ToolkitError(f"'{text[:40]}' is not a fraction: write e.g. 10% or 0.1")
    return value


def model_identity(export: Path) -> dict[str, Any]:
    """What a benchmark measured: the export's bytes, and the source model and recipe its manifests name."""
    from toolkit.manifest import MANIFEST, read_if_any  # deferred: comparing reports needs no torch

    export = Path(export)
    files = sorted(p for p in export.rglob("*") if p.is_file() and p.name != MANIFEST)
    identity: dict[str, Any] = {"export_hash": sha256_json({str(p.relative_to(export)): sha256_file(p) for p in files}),
                                "source_hash": None, "recipe": None}
    for folder in (export.parent, export):  # a run's output names its recipe and model; an export its input
        manifest = read_if_any(folder)
        if manifest is not None and isinstance(manifest.get("model"), dict) and isinstance(manifest.get("recipe"), dict):
            settings = {k: v for k, v in manifest["recipe"].items() if k != "output"}
            identity.update(source_hash=manifest["model"].get("key"), recipe=sha256_json(settings)[:16],
                            recipe_file=manifest.get("recipe_file"))
            break
    return identity
