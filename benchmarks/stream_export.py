"""Peak RSS and wall time of the streamed ONNX export (one decoder layer resident) of a float or packed
checkpoint folder, then a few greedy tokens from the export in our runtime and in onnxruntime-genai.

    python benchmarks/stream_quantize.py --method rtn --generate 0 --keep /work/synth/llama-3.2-1b-4l /work/synth/out-1b4-rtn
    python benchmarks/stream_export.py /work/synth/out-1b4-rtn /work/synth/out-1b4-rtn-ort

``export_peak_rss_mb`` is the process maximum (getrusage) when the export (its validation included) ends,
before any runtime is opened; ``write_peak_rss_mb`` / ``write_seconds`` the same when the graph and its data file
are written and validation starts. Greedy tokens: our runtime and onnxruntime-genai run the graph as shipped
(``accuracy_level``, int8 activations at 4) and must agree with each other; our runtime at accuracy_level 0
(float activations, the strict check's setting) is compared with the PyTorch reference, streamed layer by
layer like the validation. Random-weight checkpoints give meaningless text; only agreement matters.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.evaluation.streaming import stream_logits
from toolkit.interop import genai_probe
from toolkit.models.checkpoint import load_tokenizer
from toolkit.passes import onnx as onnx_export
from toolkit.passes.context import PassContext
from toolkit.paths import atomic_dir
from toolkit.quant import checkpoint
from toolkit.quant.streaming import StreamOptions
from toolkit.runtime import BackendOptions, Engine, GenerationConfig, OrtBackend, Tokenizer

PROMPT = "The capital of France is"


def process_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def export(args: argparse.Namespace) -> dict[str, object]:
    tokenizer = load_tokenizer(args.source)
    config = onnx_export.ONNXConfig(target=args.target, dtype=args.dtype, threads=args.threads)
    ctx = PassContext(tokenizer, lambda: None, lambda: None, args.output.parent / "work")  # type: ignore[arg-type,return-value]
    start = time.perf_counter()
    phase: dict[str, float] = {}
    validate = onnx_export._validate

    def timed_validate(*a: object, **kw: object) -> dict[str, object]:  # the graph is written when it starts
        phase.update(write_seconds=round(time.perf_counter() - start, 1), write_peak_rss_mb=round(process_peak_mb()))
        return validate(*a, **kw)  # type: ignore[arg-type]

    onnx_export._validate = timed_validate  # type: ignore[assignment]
    with atomic_dir(args.output) as tmp:
        result = onnx_export.stream(checkpoint.open_streaming(args.source), tmp, config, ctx, StreamOptions())
    seconds = time.perf_counter() - start
    validation = result["export"]["validation"]
    return {"source": str(args.source), "output": str(args.output), "target": args.target, "dtype": args.dtype,
            "export_seconds": round(seconds, 1), "export_peak_rss_mb": round(process_peak_mb()), **phase,
            "size_mb": result["export"]["size_mb"], "max_abs_logit_diff": result["export"]["max_abs_logit_diff"],
            "strict_max_abs": {k: round(m["max_abs"], 5) for k, m in validation["strict"].items()},
            "deployed_rel_rms_median": {k: round(m["rel_rms_median"], 4)
                                        for k, m in validation.get("deployed", {}).items()}}


def _ours(folder: Path, ids: list[int], new: int, level: int | None, threads: int) -> list[int]:
    backend = OrtBackend(folder, BackendOptions(threads=threads, accuracy_level=level))
    engine = Engine(backend, Tokenizer.from_folder(folder), max_batch=1)
    return engine.generate(ids, GenerationConfig(max_new_tokens=new, min_new_tokens=new)).token_ids


def _torch(source: Path, ids: list[int], new: int) -> list[int]:
    src = checkpoint.open_streaming(source)
    seq = list(ids)
    for _ in range(new):
        logits = stream_logits(src, [np.array([seq], np.int64)])[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def generate(args: argparse.Namespace) -> dict[str, object]:
    ids = Tokenizer.from_folder(args.output).encode(PROMPT)
    ours = _ours(args.output, ids, args.generate, None, args.threads)
    report: dict[str, object] = {"prompt_ids": ids, "ours_shipped": ours}
    if (args.output / "genai_config.json").is_file():
        start = time.perf_counter()
        report["genai"] = genai_probe.greedy(args.output, ids, args.generate)
        report["genai_seconds"] = round(time.perf_counter() - start, 1)
        report["ours_equal_genai"] = report["genai"] == ours
    ours_strict = _ours(args.output, ids, args.generate, 0, args.threads)
    reference = _torch(args.source, ids, args.generate)
    report.update({"ours_level0": ours_strict, "torch": reference, "ours_level0_equal_torch": ours_strict == reference})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a float or packed checkpoint folder")
    parser.add_argument("output", type=Path, help="the export folder (must not exist)")
    parser.add_argument("--target", choices=("ort", "standard"), default="ort")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=4, help="greedy tokens in each runtime (0: none)")
    parser.add_argument("--generate-only", action="store_true", help="only run the runtimes on OUTPUT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.generate_only:
        report: dict[str, object] = {"output": str(args.output)}
    elif args.output.exists():
        raise SystemExit(f"error: {args.output} exists; remove it or choose another folder")
    else:
        report = export(args)
        print(json.dumps(report), flush=True)
    if args.generate:
        report.update(generate(args))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
