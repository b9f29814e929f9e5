"""The packages form layers: each module imports only from its own package or from layers below it.

Read with ``ast`` (every import, lazy ones inside functions included), so a cycle between packages cannot come
back through a deferred import. The table is the README's "Layers" block, parsed here so the two cannot drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folders outside toolkit/ that the distribution maps into the namespace (pyproject's package-dir)
MAPPED = {"passes": "toolkit.passes", "runtime": "toolkit.runtime"}
# the third-party packages only the compiler side may import (the runtime and the base layer stay torch-free)
COMPILER_ONLY = ("torch", "transformers", "safetensors", "accelerate", "datasets", "gguf", "compressed_tensors")


def layers() -> dict[str, int]:
    """Unit (``toolkit.models``, ``toolkit.errors``, ...) -> its layer, from the README (``N  unit unit ...``)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```text\n# layers, bottom to top\n(.*?)```", text, re.S)
    assert block, "README.md has no '# layers, bottom to top' block"
    table: dict[str, int] = {}
    for line in block.group(1).splitlines():
        level, *units = line.split("#")[0].split()
        for unit in units:
            table["toolkit" if unit == "toolkit" else "toolkit." + unit.removesuffix("/").removesuffix(".py")] = int(level)
    return table


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "toolkit").rglob("*.py")):
        found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    for folder, name in MAPPED.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[name + "." + path.stem] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def _nodes(tree: ast.AST, deferred: bool):
    """Every node, or (``deferred=False``) those that run at import time: function bodies left out."""
    if deferred:
        yield from ast.walk(tree)
        return
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield node
            yield from _nodes(node, deferred)


def imports(module: str, path: Path, deferred: bool = True) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in _nodes(ast.parse(path.read_text()), deferred):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def unit_of(module: str, table: dict[str, int]) -> str | None:
    """The longest table entry that ``module`` is or lies under."""
    if module == "toolkit":
        return module if module in table else None
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in table:
            return ".".join(parts[:n])
    return None


def test_every_module_belongs_to_a_layer() -> None:
    table = layers()
    assert sorted(m for m in modules() if unit_of(m, table) is None) == []


def test_no_import_runs_upward_or_sideways_into_a_cycle() -> None:
    table = layers()
    upward, edges = [], set()
    for module, path in modules().items():
        source = unit_of(module, table)
        for name in imports(module, path):
            target = unit_of(name, table) if name.startswith("toolkit") else None
            if target is None or target == source or source is None:
                continue
            if table[target] > table[source]:
                upward.append(f"{path.relative_to(ROOT)} (layer {table[source]}) imports {name} (layer {table[target]})")
            edges.add((source, target))
    assert upward == []
    # within one layer, packages may use each other only without a cycle
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert sorted(f"{a} <-> {b}" for a, b in edges if reaches(b, a, {b})) == []


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_base_the_runtime_and_the_server_import_no_compiler_package(layer: int) -> None:
    """The runtime and the server never do; the base may inside a function that only the compiler side calls (the
    manifest writer asks torch for its version and CPU kernels), never when it is imported."""
    table = layers()
    found = []
    for module, path in modules().items():
        unit = unit_of(module, table)
        if unit is not None and table[unit] == layer:
            found += [f"{path.relative_to(ROOT)}: {name}" for name in imports(module, path, deferred=layer > 0)
                      if name.split(".")[0] in COMPILER_ONLY]
    assert found == []


def test_the_checker_sees_an_upward_edge(tmp_path: Path) -> None:
    """The reader resolves relative and lazy imports, so a deferred upward import is caught too."""
    path = tmp_path / "streaming.py"
    path.write_text("def f():\n    from ..quant import modules\n    from toolkit.interop import gguf_file\n")
    assert imports("toolkit.models.streaming", path) == {"toolkit.quant", "toolkit.interop"}
    assert imports("toolkit.models.streaming", path, deferred=False) == set()
    table = layers()
    assert table[unit_of("toolkit.interop.gguf_file", table)] > table[unit_of("toolkit.models.streaming", table)]
