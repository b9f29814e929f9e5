"""GPU check for issue 14 (under 10 minutes on one H100/H200 class GPU):

1. GPTQ int4 g32 of SmolLM2, streamed layer by layer on ``--device`` and on the CPU: perplexity of both
   (same calibration and evaluation windows); the device result must be within 0.5 % of the CPU's.
2. GPTQ int4 g32 of the Llama-3.2-1B shape (synthetic bf16 checkpoint, 16 x 512 calibration tokens) on
   ``--device``: wall time, peak GPU memory (torch.cuda.max_memory_allocated) and peak RSS.

    python benchmarks/gpu_check.py --device cuda --work /tmp/gpu-check
    python benchmarks/gpu_check.py --device cpu --quick --work /tmp/gpu-check   # proves the script works

3. FP8 (issue 23): SmolLM2's linears as recipe smollm2-fp8-dynamic makes them (fp8 e4m3 per-channel weights,
   fp8 per-token dynamic activations), each run with ``torch._scaled_mm`` (rowwise scales, bfloat16 out) on the GPU
   on the inputs the model gives it, against our CPU module's float32 output: max |Δ| / max |ref| within
   ``FP8_TOLERANCE`` (bfloat16 output rounding). Needs compute capability 8.9 or newer (Hopper, Ada); elsewhere the
   GPU half is skipped with the reason, and the CPU half (the operands rebuild our module's output) still runs.

    python benchmarks/gpu_check.py --device cuda --sections fp8 --work /tmp/gpu-check   # FP8 only, about a minute

``--quick``: 4 x 128 calibration tokens, 2 evaluation windows, and the few-MB ``llama-tiny`` shape instead
of the 1B one. Prints one JSON report; exits 1 when a check fails.
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
from toolkit.passes import gptq, rtn  # noqa: E402
from toolkit.passes.context import PassContext  # noqa: E402
from toolkit.quant import checkpoint  # noqa: E402
from toolkit.quant.arithmetic import FP8, FP8_MAX  # noqa: E402
from toolkit.quant.modules import FP8Linear  # noqa: E402
from toolkit.quant.spec import ActivationSpec  # noqa: E402
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


FP8_TOLERANCE = 1e-2  # max |Δ| / max |ref|: bfloat16 output holds 8 significant bits (2^-8 ≈ 4e-3 a value)
FP8_DYNAMIC = rtn.RTNConfig(bits=8, group_size=-1, symmetric=True, type="float", lm_head_bits=None,
                            input_activations=ActivationSpec("float", 8, "token", dynamic=True))
SCALED_MM_CAPABILITY = (8, 9)  # torch._scaled_mm's fp8 kernels: Ada and Hopper or newer


def fp8_operands(module: FP8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch._scaled_mm``'s operands for ``module(x)``, ``x: [M, K]``: fp8 activations ``[M, K]`` with their
    per-token scales ``[M, 1]`` (as ``fake_quantize_activations`` rounds them), and the fp8 weight as ``[K, N]``
    (column-major, the layout _scaled_mm takes) with per-channel scales ``[1, N]``."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    x_scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    x8 = (xf / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, x_scale, module.weight.t(), module.weight_scale.float().reshape(1, -1)


def dequantized_product(x8: torch.Tensor, x_scale: torch.Tensor, w8t: torch.Tensor, w_scale: torch.Tensor
                        ) -> torch.Tensor:
    """What _scaled_mm computes, in float32 on any device: ``(x8 · x_scale) @ (w8ᵀ · w_scale)``."""
    return (x8.float() * x_scale) @ (w8t.float() * w_scale)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def fp8_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each FP8 linear's input ``[M, K]`` on ``ids`` (a CPU forward with hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].reshape(
        -1, args[0].shape[-1]).detach().clone())) for name, m in model.named_modules() if isinstance(m, FP8Linear)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def scaled_mm_skip_reason(device: str) -> str | None:
    """Why the GPU half cannot run here, or None."""
    if device != "cuda" or not torch.cuda.is_available():
        return "no CUDA device: torch._scaled_mm's fp8 kernels need an NVIDIA GPU (compute capability 8.9+)"
    if torch.cuda.get_device_capability() < SCALED_MM_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {torch.cuda.get_device_capability()}: "
                "torch._scaled_mm's fp8 kernels need 8.9 or newer (Ada, Hopper)")
    return None


def fp8_check(model: torch.nn.Module, ids: torch.Tensor, device: str) -> dict[str, object]:
    """Our FP8 linears on the CPU (float32, the reference) against their operands' float rebuild (CPU half) and
    ``torch._scaled_mm`` on ``device`` (GPU half, or the reason it was skipped)."""
    linears = dict(model.named_modules())
    rebuild, scaled = {}, {}
    skip = scaled_mm_skip_reason(device)
    for name, x in fp8_inputs(model, ids).items():
        module = linears[name]
        assert isinstance(module, FP8Linear)
        with torch.no_grad():
            ref = module(x)
        x8, x_scale, w8t, w_scale = fp8_operands(module, x)
        rebuild[name] = relative_error(dequantized_product(x8, x_scale, w8t, w_scale), ref)
        if skip is None:
            got = torch._scaled_mm(x8.to(device), w8t.to(device), scale_a=x_scale.to(device),
                                   scale_b=w_scale.to(device), out_dtype=torch.bfloat16)
            scaled[name] = relative_error(got, ref)
    report: dict[str, object] = {"linears": len(rebuild), "cpu_rebuild_max_rel_error": max(rebuild.values()),
                                 "tolerance": FP8_TOLERANCE}
    ok = report["cpu_rebuild_max_rel_error"] <= 1e-5  # type: ignore[operator]
    if skip is not None:
        report["scaled_mm"] = {"skipped": skip}
    else:
        worst = max(scaled, key=scaled.__getitem__)
        report["scaled_mm"] = {"gpu": torch.cuda.get_device_name(), "max_rel_error": scaled[worst], "worst": worst}
        ok = ok and scaled[worst] <= FP8_TOLERANCE
    report["ok"] = ok
    return report


def fp8_model(source: str, tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """``source`` quantized as recipe smollm2-fp8-dynamic quantizes SmolLM2, and evaluation tokens ``[1, tokens]``
    to drive its linears."""
    loaded = models.load(source)
    rtn.apply(loaded.model, FP8_DYNAMIC)
    ids = token_windows(loaded.tokenizer, WindowSpec(split="evaluation", count=1, length=tokens))
    return loaded.model, ids


def gptq_check(args: argparse.Namespace) -> dict[str, object]:
    """Sections 1 and 2: GPTQ of SmolLM2 on the device against the CPU, and of a synthetic checkpoint's shape."""
    count, length, n_eval = (4, 128, 2) if args.quick else (16, 512, 16)
    smollm2 = models.resolve("smollm2").folder
    assert smollm2 is not None
    tokenizer = load_tokenizer(smollm2)
    calib = token_windows(tokenizer, WindowSpec(split="calibration", count=count, length=length, sampling="random"))
    evalw = token_windows(tokenizer, WindowSpec(split="evaluation", count=n_eval, length=length))
    report: dict[str, object] = {}
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
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("gpu-check"))
    parser.add_argument("--sections", nargs="+", choices=("gptq", "fp8"), default=["gptq", "fp8"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --device cpu --quick to check the script itself", file=sys.stderr)
        return 2
    report: dict[str, object] = {"device": args.device, "quick": args.quick,
                                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    ok = True
    if "gptq" in args.sections:
        report.update(gptq_check(args))
        ok = bool(report["smollm2_gptq"]["within_0.5%"])  # type: ignore[index]
    if "fp8" in args.sections:
        model, ids = fp8_model("smollm2", 32 if args.quick else 256)
        report["smollm2_fp8_scaled_mm"] = fp8_check(model, ids, args.device)
        ok = ok and bool(report["smollm2_fp8_scaled_mm"]["ok"])  # type: ignore[index]
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
