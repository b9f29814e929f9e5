"""The runtime installs alone: ``pip install .`` (no extras) runs ``toolkit generate EXPORT`` without torch.

A subprocess in which every module outside the core dependencies (and what they pull in) is unimportable stands
in for that install; the commands that make exports then refuse in one line that says how to add the compiler
extra. The real check is a fresh virtual environment (the README's install section gives the command).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import cli
from toolkit.errors import ToolkitError

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml takes Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normal(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in requirements}  # type: ignore[union-attr]


def _runtime_distributions(extras: tuple[str, ...] = ()) -> set[str]:
    """The core dependencies (plus those of ``extras``) and everything they require (their own extras left out),
    as installed here."""
    from packaging.requirements import Requirement

    wanted = PYPROJECT["dependencies"] + [r for extra in extras for r in PYPROJECT["optional-dependencies"][extra]]
    todo, seen = list(_requirement_names(wanted)), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normal(req.name))
    return seen


def _blocked_modules(extras: tuple[str, ...] = ()) -> set[str]:
    """Top-level modules that only distributions outside the runtime's install (with ``extras``) provide."""
    runtime = _runtime_distributions(extras)
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if not {_normal(d) for d in dists} & runtime and module != "toolkit"}


BLOCKER = """
import importlib.abc, sys
class RuntimeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, RuntimeOnly())
from toolkit.cli import main
sys.exit(main(ARGV))
"""


def runtime_only_code(*argv: str, extras: tuple[str, ...] = ()) -> str:
    """Python code running ``toolkit ARGV`` where only the runtime's (and ``extras``') distributions can be imported."""
    return f"BLOCKED = {sorted(_blocked_modules(extras))!r}\nARGV = {list(argv)!r}\n{BLOCKER}"


def toolkit_runtime_only(*argv: str) -> subprocess.CompletedProcess[str]:
    """``toolkit ARGV`` where only the runtime's distributions can be imported."""
    code = runtime_only_code(*argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit import models
    from toolkit.manifest import write_manifest
    from toolkit.passes.onnx import ONNXConfig
    from toolkit.passes.onnx import export as export_onnx
    from toolkit.paths import atomic_dir

    loaded = models.load("tiny-llama")
    folder = tmp_path_factory.mktemp("runtime-only") / "export"
    with atomic_dir(folder) as tmp:
        export_onnx(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
        write_manifest(tmp, {"source": {"model": "tiny-llama"}})
    return folder


def test_the_stand_in_install_leaves_the_compiler_side_out() -> None:
    blocked = _blocked_modules()
    assert set(cli.COMPILER_MODULES) - {"yaml", "tqdm"} <= blocked  # tokenizers pulls pyyaml and tqdm in
    assert not {"onnxruntime", "onnx", "numpy", "tokenizers", "jinja2", "psutil"} & blocked


def test_generate_and_help_run_from_the_runtime_alone(export: Path) -> None:
    done = toolkit_runtime_only("generate", str(export), "--prompt", "hi", "--max-new-tokens", "4",
                                "--threads", "1", "--no-spin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    assert re.search(r"\[\d+ prompt tokens, \d+ generated", done.stderr), done.stderr
    done = toolkit_runtime_only("inspect", str(export), "--verify")  # what a deployment asks of a folder it received
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every file of 1 manifest(s) matches" in done.stdout
    for argv in (["--help"], ["generate", "--help"], ["compare", "--help"], ["serve", "--help"]):
        done = toolkit_runtime_only(*argv)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "usage: toolkit" in done.stdout


@pytest.mark.parametrize(("argv", "what"), [
    (["run", "recipes/smollm2-int4-rtn.yaml"], ""), (["eval", "tiny-llama"], ""), (["eval", "--help"], ""),
    (["generate", "tiny-llama", "--prompt", "hi"], " for tiny-llama (it holds no model.onnx, so it is not an ONNX export)"),
])
def test_compiler_commands_refuse_in_one_line_without_the_extra(argv: list[str], what: str) -> None:
    done = toolkit_runtime_only(*argv)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    line, = done.stderr.splitlines()
    assert line.startswith(f"error: `toolkit {argv[0]}` needs the compiler side{what}, which this runtime-only install")
    assert line.endswith("install the compiler extra, in the toolkit's checkout pip install '.[compiler]' (or bash install.sh)")


def test_compiler_side_refuses_only_the_compiler_extra_missing() -> None:
    refused = pytest.raises(ToolkitError, match=r"`toolkit run` needs the compiler side, .*\(torch is not installed\)")
    with refused, cli.compiler_side("run"):
        raise ModuleNotFoundError("No module named 'torch.nn'", name="torch.nn")
    # a core dependency missing is a broken install, not a choice: it propagates
    with pytest.raises(ModuleNotFoundError, match="onnxruntime"), cli.compiler_side("generate"):
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")


def test_serve_refuses_in_one_line_without_the_serve_extra(export: Path) -> None:
    done = toolkit_runtime_only("serve", str(export), "--port", "0")
    assert done.returncode == 2, done.stderr[-2000:]
    line, = done.stderr.splitlines()
    assert line.startswith("error: `toolkit serve` needs the serve extra (")
    assert "pip install 'llm-toolkit[serve]'" in line


def test_serve_runs_from_the_runtime_and_the_serve_extra_alone(export: Path) -> None:
    """What a deployment installs (``pip install 'llm-toolkit[serve]'``): the server starts, answers, and drains
    on SIGTERM with no torch importable."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = runtime_only_code("serve", str(export), "--port", str(port), "--threads", "1", extras=("serve",))
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.monotonic() + 60, 0
        while status != 200 and time.monotonic() < deadline and process.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status
            except OSError:
                time.sleep(0.2)
        assert status == 200, "the server did not start"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.communicate()[1]
    assert "Traceback" not in stderr, stderr[-2000:]


def test_serve_modules_are_the_serve_extra() -> None:
    extra = _requirement_names(PYPROJECT["optional-dependencies"]["serve"])
    assert {_normal(d) for d in cli.SERVE_MODULES.values()} == extra
    provides = importlib.metadata.packages_distributions()
    for module, dist in cli.SERVE_MODULES.items():
        assert _normal(dist) in {_normal(d) for d in provides[module]}, module


def test_compiler_modules_are_the_compiler_extra() -> None:
    extra = _requirement_names(PYPROJECT["optional-dependencies"]["compiler"])
    assert {_normal(d) for d in cli.COMPILER_MODULES.values()} == extra
    provides = importlib.metadata.packages_distributions()
    for module, dist in cli.COMPILER_MODULES.items():
        assert _normal(dist) in {_normal(d) for d in provides[module]}, module


def test_the_lock_holds_every_dependency_install_sh_installs() -> None:
    """install.sh installs requirements.lock with --no-deps: the core, the compiler and serve extras and the tools
    must be in it."""
    lock = {_normal(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")}
    extras = PYPROJECT["optional-dependencies"]
    wanted = _requirement_names(PYPROJECT["dependencies"] + [r for name in extras for r in extras[name]])
    assert wanted - lock == set()
    assert 'install -q --no-deps -e ".[compiler,serve]"' in (ROOT / "install.sh").read_text()
