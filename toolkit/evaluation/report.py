"""Human-readable tables of run results."""

from __future__ import annotations

from typing import Any


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    if not before:  # the baseline evaluation was turned off
        return after_table(after)
    rows = [
        ("perplexity", f"{before['perplexity']:.3f}", f"{after['perplexity']:.3f}",
         f"{100 * (after['perplexity'] / before['perplexity'] - 1):+.1f} %"),
        ("size on disk", _mb(before["bytes"]), _mb(after["bytes"]), f"{100 * after['bytes'] / before['bytes']:.1f} % of before"),
        ("load time", f"{before['load_seconds']:.2f} s", f"{after['load_seconds']:.2f} s", ""),
    ]
    if "kl_divergence" in after:
        rows.append(("KL vs original", "0", f"{after['kl_divergence']:.4f}", ""))
        rows.append(("top-1 agreement", "100 %", f"{100 * after['top1_agreement']:.1f} %", ""))
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def after_table(after: dict[str, Any]) -> str:
    rows = [("perplexity", f"{after['perplexity']:.3f}"), ("size on disk", _mb(after["bytes"])),
            ("load time", f"{after['load_seconds']:.2f} s")]
    if "kl_divergence" in after:
        rows += [("KL vs original", f"{after['kl_divergence']:.4f}"),
                 ("top-1 agreement", f"{100 * after['top1_agreement']:.1f} %")]
    lines = ["| metric | after (baseline not evaluated) |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])


def describe_manifest(manifest: dict[str, Any]) -> str:
    """The manifest in readable form: where it came from, what ran, what it measured, what it holds."""
    lines = [f"created: {manifest.get('created', '?')}"]
    if "recipe" in manifest:
        recipe = manifest["recipe"]
        lines.append(f"recipe: {manifest.get('recipe_file', '?')} (model {recipe.get('model')})")
    if "step" in manifest:
        step = manifest["step"]
        lines.append(f"pass: {step.get('name')} {step.get('config')}")
    for step in manifest.get("steps", []):
        state = "cached" if step.get("cache_hit") else f"{step.get('seconds', 0):.1f} s, peak {step.get('peak_rss_mb', 0):.0f} MB"
        lines.append(f"  step {step['name']}: {state}")
    metrics = manifest.get("metrics")
    if metrics and "before" in metrics:
        lines += ["", before_after_table(metrics["before"], metrics["after"])]
    versions = manifest.get("versions", {})
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    files = manifest.get("files", {})
    lines.append(f"files ({len(files)}, {sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB):")
    lines += [f"  {name:<36} {f['bytes']:>13,d}  sha256 {f['sha256'][:16]}" for name, f in sorted(files.items())]
    return "\n".join(lines)
