"""A copy of an export with every KV-cache scale set to 1.0: the control that shows a consumer reads our scales.

    python benchmarks/kv_scales_one.py runs/smollm2-fp8-modelopt-kv/export /tmp/kv-scales1
    python benchmarks/bench_consumers.py --vllm ours=runs/smollm2-fp8-modelopt-kv/export \
        --vllm scales1=/tmp/kv-scales1 --vllm-kv-cache-dtype fp8

Every ``*.k_scale`` / ``*.v_scale`` tensor of the folder's safetensors files (compressed-tensors'
``self_attn.k_scale``, ModelOpt's ``k_proj.k_scale``) becomes 1.0 with its dtype and shape; everything else is copied
byte for byte. When a consumer's perplexity moves with the scales as ours does (our model reads the copy back too),
the consumer used them; a consumer that ignores them gives the same figure for both folders.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SUFFIXES = (".k_scale", ".v_scale")


def scales_one(export: Path, out: Path) -> int:
    """Copy ``export`` to ``out`` (which must not exist) with the KV scales at 1.0; returns how many were set."""
    if out.exists():
        raise SystemExit(f"{out} exists: give a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp)
    count = 0
    for path in sorted(tmp.glob("*.safetensors")):
        state = load_file(str(path))
        found = [k for k in state if k.endswith(SUFFIXES)]
        for key in found:
            state[key] = torch.ones_like(state[key])
        if found:
            save_file(state, str(path), metadata={"format": "pt"})
        count += len(found)
    if not count:
        shutil.rmtree(tmp)
        raise SystemExit(f"{export} holds no k_scale / v_scale tensors: not an export with an fp8 KV cache")
    tmp.rename(out)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(f"{scales_one(args.export, args.out)} KV-cache scales set to 1.0 in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
