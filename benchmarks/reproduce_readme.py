"""Regenerate the README's perplexity figures from an empty cache, with the versions beside them.

    .venv/bin/python benchmarks/reproduce_readme.py                      # the default and the GPTQ recipe
    .venv/bin/python benchmarks/reproduce_readme.py --recipe smollm2-int4-gptq-head4-onnx.yaml

Each recipe runs as ``toolkit run`` in a fresh process with ``TOOLKIT_CACHE`` pointing at a new, empty
folder (so nothing measured earlier, by older code or other versions, can be served), into a temporary
output. The table compares each measured perplexity with the README's figure (±0.5 % passes), and the
versions line says what produced it: the toolkit's source hash, the libraries, and whether they are
exactly those of ``requirements.lock``. Exit code 1 when a figure is outside the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The README's figures that come from recipe runs (float baseline and after), by recipe file.
README = {
    "smollm2-int4-rtn.yaml": 19.867,
    "smollm2-int4-gptq.yaml": 16.557,
    "smollm2-int4-awq.yaml": 17.087,
    "smollm2-int4-awq-gptq.yaml": 15.665,
    "smollm2-int4-gptq-gguf.yaml": 16.463,
    "smollm2-int4-gptq-head4-onnx.yaml": 16.599,
    "smollm2-fp32-onnx.yaml": 14.805,
}
FLOAT = 14.805
TOLERANCE = 0.005


def lock_differences(lock: Path) -> list[str]:
    """Installed versions that differ from the lock (``name: installed != locked``)."""
    out = []
    for line in lock.read_text().splitlines():
        if not line or line.startswith("#") or "==" not in line:
            continue
        name, want = line.split("==", 1)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != want:
            out.append(f"{name}: {have} != {want}")
    return out


def run_recipe(recipe: Path, cache: Path, out: Path) -> dict:
    env = {**os.environ, "TOOLKIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "toolkit", "run", str(recipe), "--output", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: {recipe.name} failed ({proc.returncode}): {tail[0]}")
    return json.loads((out / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=None, help="recipe file name under recipes/ (repeatable)")
    p.add_argument("--keep", type=Path, default=None, help="keep outputs and the cache under this folder")
    a = p.parse_args(argv)
    names = a.recipe or ["smollm2-int4-rtn.yaml", "smollm2-int4-gptq.yaml"]
    unknown = [n for n in names if not (ROOT / "recipes" / n).is_file()]
    if unknown:
        raise SystemExit(f"error: no such recipe: {', '.join(unknown)}")
    work = a.keep or Path(tempfile.mkdtemp(prefix="reproduce-"))
    if (work / "cache").exists():
        raise SystemExit(f"error: {work / 'cache'} exists; the figures must come from an empty cache")
    rows, versions, failed = [], {}, False
    for name in names:
        manifest = run_recipe(ROOT / "recipes" / name, work / "cache", work / "runs" / name.removesuffix(".yaml"))
        versions = manifest["versions"]
        before = manifest["metrics"]["before"]["perplexity"]
        after = manifest["metrics"]["after"]["perplexity"]
        want = README.get(name)
        change = after / want - 1 if want else None
        ok = (change is None or abs(change) <= TOLERANCE) and abs(before / FLOAT - 1) <= TOLERANCE
        failed |= not ok
        rows.append(f"| `{name}` | {before:.3f} | {after:.3f} | {want if want is not None else '-'} | "
                    f"{f'{change:+.2%}' if change is not None else '-'} | {'ok' if ok else 'DIFFERS'} |")
        print(rows[-1], flush=True)
    print()
    print(f"| recipe | float (README {FLOAT}) | measured | README | change | within ±0.5 % |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    drift = lock_differences(ROOT / "requirements.lock")
    print("requirements.lock: " + ("installed versions match exactly" if not drift else "DIFFERS: " + "; ".join(drift)))
    print(f"fresh cache and outputs: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
