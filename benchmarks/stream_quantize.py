"""Peak RSS, wall time and bytes written of streaming (layer-at-a-time) RTN or GPTQ on a checkpoint folder,
then the packed artifact reloaded and a few greedy tokens generated.

    python benchmarks/synthetic_checkpoint.py llama-3.1-8b /work/synth/llama-3.1-8b
    python benchmarks/stream_quantize.py --method rtn /work/synth/llama-3.1-8b /work/synth/out-8b-rtn
    python benchmarks/stream_quantize.py --method gptq --count 16 /work/synth/llama-3.2-1b /work/synth/out-1b-gptq

Targets (issue 14): RTN int4 of the 8B shape <= 4 GB peak RSS; GPTQ int4 g32 of the 1B shape with 16 x 512
calibration tokens <= 3.5 GB on 2 cores. ``quantize_peak_rss_mb`` is the process maximum (getrusage) when
the pass ends, so nothing sampled can be missed; the reload is reported separately (sampled).
Calibration windows are the pydoc calibration half, tokenized by the checkpoint's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

from toolkit.data import WindowSpec, token_windows
from toolkit.models.checkpoint import load_tokenizer
from toolkit.models.streaming import SkeletonModel, greedy_generate
from toolkit.passes import gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.pipeline.monitor import Measure
from toolkit.quant import checkpoint
from toolkit.quant.streaming import StreamOptions, stream_rtn


def process_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def quantize(args: argparse.Namespace) -> dict[str, object]:
    options = StreamOptions(device=args.device, activation_budget_bytes=args.activation_budget_mb * 2**20,
                            spill_dir=args.output.parent / "spill", max_shard_bytes=args.shard_mb * 2**20,
                            progress=True)
    src = SkeletonModel(args.source, device=args.device)
    args.output.mkdir(parents=True)
    with Measure() as m:
        if args.method == "rtn":
            head = args.lm_head_bits or None
            stats = stream_rtn(src, args.output, rtn.RTNConfig(args.bits, args.group_size, lm_head_bits=head), options)
        else:
            tokenizer = load_tokenizer(args.source)
            spec = WindowSpec(split="calibration", count=args.count, length=args.length, sampling="random")
            windows = token_windows(tokenizer, spec)
            config = gptq.GPTQConfig(args.bits, args.group_size, lm_head_bits=args.lm_head_bits or None,
                                     batch_size=args.batch_size)
            ctx = PassContext(tokenizer, lambda: windows, lambda: None, args.output.parent / "work")  # type: ignore[arg-type,return-value]
            stats = gptq.stream(src, args.output, config, ctx, options)
    return {"method": args.method, "source": str(args.source), "source_bytes": src.stored_bytes(),
            "threads": torch.get_num_threads(), "seconds": round(m.seconds, 1),
            "quantize_peak_rss_mb": round(process_peak_mb()), "sampled_peak_rss_mb": round(m.peak_rss / 2**20),
            **stats}


def reload_and_generate(output: Path, new_tokens: int) -> dict[str, object]:
    tokenizer = load_tokenizer(output)
    with Measure() as m:
        model = checkpoint.load_model(output, dtype=torch.bfloat16)
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    with Measure() as g:
        tokens = greedy_generate(model, prompt, new_tokens, vocab_limit=len(tokenizer))
    return {"reload_seconds": round(m.seconds, 1), "reload_peak_rss_mb": round(m.peak_rss / 2**20),
            "generate_seconds": round(time.perf_counter() - start, 1),
            "generate_peak_rss_mb": round(g.peak_rss / 2**20),
            "generated": tokenizer.decode(tokens[0, prompt.shape[1]:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--lm-head-bits", type=int, default=8, help="the head's bits (0: keep it float)")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--activation-budget-mb", type=int, default=512)
    parser.add_argument("--shard-mb", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=4, help="greedy tokens after reloading (0: no reload)")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    parser.add_argument("--reload-only", action="store_true", help="only reload OUTPUT (kept by --keep) and generate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reload_only:
        report: dict[str, object] = {"output": str(args.output),
                                     "bytes": sum(p.stat().st_size for p in args.output.glob("*.safetensors"))}
    elif args.output.exists():
        raise SystemExit(f"error: {args.output} exists; remove it or choose another folder")
    else:
        report = quantize(args)
    print(json.dumps(report), flush=True)
    if args.generate:
        report.update(reload_and_generate(args.output, args.generate))
    print(json.dumps(report))
    if not (args.keep or args.reload_only):
        shutil.rmtree(args.output)


if __name__ == "__main__":
    main()
