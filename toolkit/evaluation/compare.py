"""CI gate: compare a candidate report with a baseline; fail on a perplexity or latency regression.

Report schema (``toolkit-report/1``; ``benchmarks/bench_runtime.py --report`` writes it):

    {
      "schema": "toolkit-report/1",
      "name": "smollm2-int4 (free text)",
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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

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
        path = Path(source)
        if not path.is_file():
            raise ToolkitError(f"report not found: {path}")
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ToolkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if report.get("schema") != SCHEMA:
        raise ToolkitError(f"report schema is {report.get('schema')!r}, expected {SCHEMA!r}: write it with "
                           "benchmarks/bench_runtime.py --report")
    return report


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
            thresholds: Thresholds | None = None) -> CompareResult:
    t = thresholds or Thresholds()
    base, cand = load_report(baseline), load_report(candidate)
    rows = []
    ppl_a, ppl_b = base.get("metrics", {}).get("perplexity"), cand.get("metrics", {}).get("perplexity")
    if ppl_a is not None and ppl_b is not None:
        change = ppl_b / ppl_a - 1
        rows.append(Row("perplexity", ppl_a, ppl_b, change, None, change > t.max_ppl_increase))
    shared = [k for k in base.get("latency", {}) if k in cand.get("latency", {})]
    rows += [latency_row(k, _groups(base, k), _groups(cand, k), t) for k in shared]
    if not rows:
        raise ToolkitError("the reports share no metric (perplexity or latency): nothing to compare")
    return CompareResult(rows, to_markdown(rows, t, base.get("name", "baseline"), cand.get("name", "candidate")))


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
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ToolkitError(f"'{text}' is not a fraction: write e.g. 10% or 0.1") from None
