"""``manifest.json``: what every artifact folder says about itself (where it came from, the library versions it
was made with, the size and sha256 of each of its files), written, read and verified here alone.

A manifest lists every file of its folder but itself; ``verify_files`` reports what no longer matches (a
missing, extra, resized or altered file), ``verify_tree`` does so for every manifest under a run's output.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.errors import ToolkitError
from toolkit.paths import code_identity, names_a_file_in, read_json, sha256_file, write_text_atomic

MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    """What a result depends on besides its inputs: library versions and the toolkit's own source hash."""
    import platform

    import numpy
    import onnx
    import onnxruntime
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {
        "toolkit": __version__,
        "toolkit_code": code_identity()[:16],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu_kernels(),
    }


def cpu_kernels() -> str:
    """The vector instruction set torch's CPU kernels (and MKL's, unless overridden) run with. GPTQ's codes depend
    on the summation order of its float reductions, so the same recipe lands on other codes on another one."""
    import torch

    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return torch.backends.cpu.get_cpu_capability() + (f" (MKL {mkl})" if mkl else "")


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(), **(extra or {})}
    manifest["files"] = file_table(folder)
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{folder} has no {MANIFEST}: it is not a toolkit artifact")
    manifest = read_json(path, "re-create the artifact")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ToolkitError(f"{path} is not a toolkit manifest (no file table); re-create the artifact")
    return manifest


def read_if_any(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` when it has a readable one, else None (for folders that need not be artifacts)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_files(folder: Path, hashes: bool = True) -> list[str]:
    """Problems with ``folder`` against its manifest: missing, extra, resized or (``hashes``) altered files."""
    folder = Path(folder)
    try:
        files = read_manifest(folder).get("files", {})
    except ToolkitError as exc:
        return [str(exc)]
    if not files:
        return [f"{folder / MANIFEST} lists no files"]
    problems = []
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(present - set(files)):
        problems.append(f"{name}: not in the manifest")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not names_a_file_in(folder, name):
            problems.append(f"{name}: lies outside the folder (a manifest lists only its own files)")
        elif not isinstance(entry, dict):
            problems.append(f"{name}: no size and sha256 in the manifest")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif hashes and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def verify_tree(folder: Path) -> tuple[int, list[str]]:
    """Check every manifest under ``folder`` (an output holds its own, its model's and its export's)."""
    manifests = sorted(Path(folder).rglob(MANIFEST))
    if not manifests:
        return 0, [f"{folder} has no {MANIFEST}: it is not a toolkit artifact"]
    problems = []
    for manifest in manifests:
        where = manifest.parent.relative_to(folder)
        problems += [f"{where / p if str(where) != '.' else p}" for p in verify_files(manifest.parent)]
    return len(manifests), problems
