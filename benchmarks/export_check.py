"""SmolLM2 ONNX export check: logits, greedy continuations and perplexity against PyTorch; sizes; op census.

    .venv/bin/python benchmarks/export_check.py --variant float --variant int4 --target ort
    .venv/bin/python benchmarks/export_check.py --variant int4 --target standard --windows 4
    .venv/bin/python benchmarks/export_check.py --variant runs/smollm2-int4-gptq/model --new-tokens 32

``float``: float32 SmolLM2. ``int4``: RTN int4 group 32 symmetric (lm_head int8, tied embedding), the
toolkit default. Perplexity uses the default protocol (16 x 512 evaluation windows), the ONNX model running
each window as one prefill with an empty past; PyTorch's figure comes from ``toolkit.evaluation.evaluate``.
Exports go to ``runs/export_check/<variant>-<target>`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit import models
from toolkit.data import WindowSpec, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.onnx.validate import greedy_torch
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.passes.rtn import RTNConfig
from toolkit.passes.rtn import apply as rtn_apply
from toolkit.paths import atomic_dir
from toolkit.runtime import GenerationConfig, OrtBackend, load

PROMPTS = (
    "What is the capital of France?",
    "def fibonacci(n):",
    "The three most important inventions of the twentieth century are",
)


def onnx_perplexity(backend: OrtBackend, windows: torch.Tensor) -> float:
    """Each window as one prefill of an empty cache row, scored at every position (as PyTorch's figure is)."""
    nll, count = 0.0, 0
    backend.allocate(1, windows.shape[1])
    for window in windows:
        logits = torch.from_numpy(backend.prefill(0, window.numpy().astype(np.int64), 0, all_logits=True))[:-1]
        targets = window[1:]
        nll += float(-F.log_softmax(logits, -1).gather(-1, targets[:, None]).sum())
        count += targets.numel()
    return math.exp(nll / count)


def check(variant: str, target: str, windows: int, new_tokens: int, out: Path, level: int = 4) -> dict:
    """``variant``: 'float', 'int4' (RTN g32 sym), or the path of a quantized artifact (e.g. a GPTQ run's model/)."""
    loaded = models.load("smollm2" if variant in ("float", "int4") else variant)
    if variant == "int4":
        rtn_apply(loaded.model, RTNConfig(bits=4, group_size=32, symmetric=True))
    folder = out / f"{Path(variant).parent.name or variant}-{target}"
    start = time.perf_counter()
    with atomic_dir(folder, replace=(folder / "export.json").is_file()) as tmp:  # only a previous export of ours
        result = export(loaded.model, loaded.tokenizer, ONNXConfig(target=target, accuracy_level=level), tmp)["export"]
    row: dict = {"variant": variant, "target": target, "accuracy_level": level, "export_s": round(time.perf_counter() - start, 1),
                 "size_mb": result["size_mb"], "validation": result["validation"], "op_census": result["op_census"]}
    spec = WindowSpec(count=windows or 1)
    engine = load(folder, threads=2, prefill_chunk=spec.length)  # a window is one prefill, as in PyTorch
    greedy = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    same = []
    for prompt in PROMPTS:
        ids = loaded.tokenizer(prompt, return_tensors="np")["input_ids"]
        a, b = engine.generate(ids[0].tolist(), greedy).token_ids, greedy_torch(loaded.model, ids, new_tokens)
        same.append(a == b)
        row.setdefault("continuations", []).append(loaded.tokenizer.decode(a))
    row["greedy_identical"] = f"{sum(same)}/{len(same)} x {new_tokens} tokens"
    if windows:
        w = token_windows(loaded.tokenizer, spec)
        row["ppl_onnx"] = round(onnx_perplexity(engine.backend, w), 4)  # type: ignore[arg-type]
        row["ppl_torch"] = round(evaluate(loaded.model, w)["perplexity"], 4)
        row["ppl_rel_diff_pct"] = round(100 * (row["ppl_onnx"] / row["ppl_torch"] - 1), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append",
                        help="'float', 'int4' (RTN g32 sym) or a quantized artifact folder such as RUN/model (repeatable)")
    parser.add_argument("--target", action="append", choices=["ort", "standard"])
    parser.add_argument("--windows", type=int, default=16, help="512-token evaluation windows (0: skip perplexity)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (0: float activations)")
    parser.add_argument("--out", type=Path, default=Path("runs/export_check"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for variant in args.variant or ["float", "int4"]:
        for target in args.target or ["ort"]:
            rows.append(check(variant, target, args.windows, args.new_tokens, args.out, args.accuracy_level))
            print(json.dumps(rows[-1]), flush=True)  # progress: the slow part is minutes per row
    print("| variant | target | level | size MB | max Δlogits strict | max Δlogits deployed | greedy identical "
          "| ppl ONNX | ppl PyTorch | Δ% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["validation"]
        deployed = max(m["max_abs"] for m in v["deployed"].values()) if "deployed" in v else float("nan")
        strict = max(m["max_abs"] for m in v["strict"].values())
        print(f"| {r['variant']} | {r['target']} | {r['accuracy_level']} | {r['size_mb']} | {strict:.2e} | {deployed:.3f} | {r['greedy_identical']} | {r.get('ppl_onnx', '-')} | {r.get('ppl_torch', '-')} | "
              f"{r.get('ppl_rel_diff_pct', '-')} |")


if __name__ == "__main__":
    main()
