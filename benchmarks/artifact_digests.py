"""SHA-256 of every file each shipped recipe writes, from an empty cache: the check that a refactoring changed no byte.

    .venv/bin/python benchmarks/artifact_digests.py --out digests.json [recipe.yaml ...]
    .venv/bin/python benchmarks/artifact_digests.py --compare before.json after.json

Each recipe runs as ``toolkit run`` in a fresh process with a new, empty ``TOOLKIT_CACHE``, its evaluation cut to one
short window without baseline (the artifacts do not depend on it; perplexities are ``reproduce_readme.py``'s job).
Manifests and the run's report (``metrics.json``, ``report.md``) are left out: they record the source hash and
timings, which differ by design. ``--compare`` prints every
file whose digest differs or that only one side wrote, and exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the shipped recipes whose passes finish in minutes on two cores (the distillation recipes train for far longer)
DEFAULT = ["smollm2-int4-rtn.yaml", "smollm2-int8-rtn.yaml", "smollm2-int4-rtn-onnx.yaml", "smollm2-int8-rtn-onnx.yaml",
           "smollm2-int4-rtn-head4-onnx.yaml", "smollm2-int4-rtn-onnx-standard.yaml", "smollm2-fp32-onnx.yaml",
           "smollm2-fp32-gguf.yaml", "smollm2-int4-gptq.yaml", "smollm2-int4-gptq-gguf.yaml",
           "smollm2-int4-gptq-compressed-tensors.yaml", "smollm2-int4-gptq-head4-onnx.yaml", "smollm2-int4-awq.yaml",
           "smollm2-int4-awq-gptq.yaml"]
SKIP = {"manifest.json", "metrics.json", "report.md"}


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIP):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out


def run(recipe: Path, scratch: Path) -> dict[str, str]:
    spec = yaml.safe_load(recipe.read_text())
    spec["evaluation"] = {**spec.get("evaluation", {}), "count": 1, "length": 64, "baseline": False}
    edited = scratch / recipe.name
    edited.write_text(yaml.safe_dump(spec))
    out = scratch / "out"
    env = {**os.environ, "TOOLKIT_CACHE": str(scratch / "cache")}
    proc = subprocess.run([sys.executable, "-m", "toolkit", "run", str(edited), "--output", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{recipe.name} failed:\n{proc.stderr[-2000:]}")
    return digests(out)


def compare(before: dict, after: dict) -> int:
    bad = 0
    for recipe in sorted(set(before) | set(after)):
        a, b = ({n: d for n, d in side.get(recipe, {}).items() if Path(n).name not in SKIP} for side in (before, after))
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                bad += 1
                print(f"{recipe}: {name}: {a.get(name, 'absent')[:16]} -> {b.get(name, 'absent')[:16]}")
        if recipe in before and recipe in after:
            print(f"{recipe}: {len(set(a) & set(b)) - sum(a[n] != b.get(n) for n in a if n in b)} files identical")
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=DEFAULT)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*(json.loads(p.read_text()) for p in args.compare)))
    table = {}
    for name in args.recipes:
        with tempfile.TemporaryDirectory() as scratch:
            table[name] = run(ROOT / "recipes" / name, Path(scratch))
            print(f"{name}: {len(table[name])} files", flush=True)
    text = json.dumps(table, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
