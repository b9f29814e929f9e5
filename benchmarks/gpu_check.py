"""GPU check for issue 14 (under 10 minutes on one H100/H200 class GPU):

1. GPTQ int4 g32 of SmolLM2, streamed layer by layer on ``--device`` and on the CPU: perplexity of both
   (same calibration and evaluation windows); the device result must be within 0.5 % of the CPU's.
2. GPTQ int4 g32 of the Llama-3.2-1B shape (synthetic bf16 checkpoint, 16 x 512 calibration tokens) on
   ``--device``: wall time, peak GPU memory (torch.cuda.max_memory_allocated) and peak RSS.

    python benchmarks/gpu_check.py --device cuda --work /tmp/gpu-check
    python benchmarks/gpu_check.py --device cpu --quick --work /tmp/gpu-check   # proves the script works

``--quick``: 4 x 128 calibration tokens, 2 evaluation windows, and the few-MB ``llama-tiny`` shape instead
of the 1B one. Prints one JSON report; exits 1 when the perplexity check fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from synthetic_checkpoint import write_checkpoint  # noqa: E402

from toolkit import models  # noqa: E402
from toolkit.data import WindowSpec, token_windows  # noqa: E402
from toolkit.evaluation import perplexity  # noqa: E402
from toolkit.models.checkpoint import load_tokenizer  # noqa: E402
from toolkit.models.streaming import SkeletonModel  # noqa: E402
from toolkit.passes import gptq  # noqa: E402
from toolkit.passes.context import PassContext  # noqa: E402
from toolkit.quant import checkpoint  # noqa: E402
from toolkit.quant.streaming import StreamOptions  # noqa: E402


def stream_gptq(folder: Path, out: Path, device: str, windows: torch.Tensor) -> dict[str, float]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = load_tokenizer(folder)
    ctx = PassContext(tokenizer, lambda: windows, lambda: None, out.parent / "work")  # type: ignore[arg-type,return-value]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    config = gptq.GPTQConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8)
    stats = gptq.stream(SkeletonModel(folder, device=device), out, config, ctx, StreamOptions(device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"seconds": round(time.perf_counter() - start, 1), "bytes_written": stats["bytes_written"],
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def ppl(folder: Path, windows: torch.Tensor, device: str) -> float:
    model = checkpoint.load_model(folder).to(device)
    return float(perplexity.evaluate(model, windows.to(device))["perplexity"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --device cpu --quick to check the script itself", file=sys.stderr)
        return 2
    count, length, n_eval = (4, 128, 2) if args.quick else (16, 512, 16)
    smollm2 = models.resolve("smollm2").folder
    assert smollm2 is not None
    tokenizer = load_tokenizer(smollm2)
    calib = token_windows(tokenizer, WindowSpec(split="calibration", count=count, length=length, sampling="random"))
    evalw = token_windows(tokenizer, WindowSpec(split="evaluation", count=n_eval, length=length))
    report: dict[str, object] = {"device": args.device, "quick": args.quick,
                                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    runs = {}
    for device in dict.fromkeys((args.device, "cpu")):
        runs[device] = stream_gptq(smollm2, args.work / f"smollm2-{device}", device, calib)
        runs[device]["perplexity"] = ppl(args.work / f"smollm2-{device}", evalw, args.device)
    ratio = runs[args.device]["perplexity"] / runs["cpu"]["perplexity"]
    report["smollm2_gptq"] = {**runs, "ratio_device_to_cpu": round(ratio, 5), "within_0.5%": abs(ratio - 1) <= 0.005}
    shape = "llama-tiny" if args.quick else "llama-3.2-1b"
    synth = args.work / shape
    if not (synth / "config.json").is_file():
        shutil.rmtree(synth, ignore_errors=True)
        write_checkpoint(shape, synth)
    windows = token_windows(tokenizer, WindowSpec(split="calibration", count=count, length=length, sampling="random"))
    report[f"{shape}_gptq"] = stream_gptq(synth, args.work / f"{shape}-out", args.device, windows)
    print(json.dumps(report, indent=2))
    return 0 if report["smollm2_gptq"]["within_0.5%"] else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
