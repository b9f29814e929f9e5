"""Distillation study on SmolLM2: what KD buys over plain next-token training, and int4 recovery.

  shallow:   a student with every other layer (15 of 30) trained with KD, and the same student trained
             for the same steps on the same text with next-token cross-entropy only.
  quantized: RTN int4 g32 sym SmolLM2 whose norms and scales are trained with KD from the float model.

Checkpoints live under --workdir, so an interrupted study resumes where it stopped. Perplexity follows
the default protocol (16 x 512 evaluation windows); training text is the calibration half only.

    python benchmarks/distill_study.py shallow --steps 80 --batch-size 4 --seq-len 256
    python benchmarks/distill_study.py quantized --steps 60 --batch-size 4 --seq-len 256

Measured 2026-11-21 on the shared 2-core machine (load 10-17, --threads 1; walls inflated), eval 16 x 512:
  quantized --steps 16 --batch-size 2 --seq-len 256 --lr 3e-3 (8,192 tokens, 772 s):
      RTN int4 g32 sym 19.867 -> 16.614; 64 % of the gap to float (14.805) recovered
  quantized --steps 32 ... (16,384 tokens, 550 s): 19.867 -> 16.271; 71 % recovered
  shallow --steps 16 --batch-size 2 --seq-len 256 (8,192 tokens each; lr 3e-4):
      KD 2472 (167x teacher, 593 s) vs next-token CE 3251 (220x, 359 s): KD/CE = 0.76
  shallow --steps 40 ... (20,480 tokens each): KD 577 (39x, 528 s) vs CE 616 (42x, 238 s): KD/CE = 0.94
  Far too few tokens to heal a 15-of-30-layer student; rerun with a real budget (e.g. --steps 600
  --batch-size 4 --grad-accum 2, ~1.2 M tokens) to judge the shallow student itself.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from toolkit import models
from toolkit.data import WindowSpec, documents, split_text, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.passes import distill, rtn
from toolkit.passes.context import PassContext

WINDOW = 512


def calibration_windows(tokenizer) -> torch.Tensor:
    """Every whole 512-token window of the calibration half, in order (the held-out tail is the last ones)."""
    available = len(tokenizer(split_text(documents("pydoc"), "calibration"), add_special_tokens=False)["input_ids"])
    return token_windows(tokenizer, WindowSpec(split="calibration", length=WINDOW, count=available // WINDOW))


def run(name: str, student, config: distill.DistillConfig, calib: torch.Tensor, workdir: Path,
        eval_windows: torch.Tensor, teacher_ppl: float) -> dict[str, float]:
    tokenizer = models.load("smollm2").tokenizer
    ctx = PassContext(tokenizer, lambda: calib, lambda: models.load("smollm2").model, workdir / name, progress=True,
                      device="cuda" if torch.cuda.is_available() else "cpu")
    (workdir / name).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained = distill.apply(student, config, ctx)
    wall = time.perf_counter() - start
    ppl = evaluate(trained, eval_windows)["perplexity"]
    tokens = config.steps * config.batch_size * config.grad_accum * (config.seq_len or WINDOW)
    row = {"run": name, "perplexity": ppl, "ratio_to_teacher": ppl / teacher_ppl, "train_tokens": tokens,
           "wall_s": wall}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("shallow", "quantized"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-4 shallow, 1e-3 quantized")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--checkpoint-every", type=int, default=0, help="default: steps / 2 (a shallow "
                        "student's checkpoint holds weights and AdamW moments, ~1 GB)")
    parser.add_argument("--heldout-windows", type=int, default=2, help="512-token calibration windows held out")
    parser.add_argument("--teacher-ppl", type=float, default=None, help="skip measuring the float model (14.805)")
    parser.add_argument("--rtn-ppl", type=float, default=None, help="skip measuring the RTN model (19.867)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/distill_study"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = models.load("smollm2")
    calib = calibration_windows(loaded.tokenizer)
    eval_windows = token_windows(loaded.tokenizer, WindowSpec())
    teacher_ppl = args.teacher_ppl or evaluate(loaded.model, eval_windows)["perplexity"]
    print(json.dumps({"teacher_perplexity": teacher_ppl, "calibration_windows": list(calib.shape)}), flush=True)
    base = distill.DistillConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        temperature=args.temperature, divergence=args.divergence, warmup_steps=max(1, args.steps // 10),
        eval_every=max(1, args.steps // 2), checkpoint_every=args.checkpoint_every or max(1, args.steps // 2),
        heldout_windows=args.heldout_windows,
    )
    tag = f"s{args.steps}-b{args.batch_size}x{args.grad_accum}-l{args.seq_len}"
    if args.study == "shallow":
        cfg = replace(base, student="shallow", keep_every=2, lr=args.lr or 3e-4)
        kd = run(f"shallow-kd-{tag}", models.load("smollm2").model, cfg, calib, args.workdir, eval_windows, teacher_ppl)
        ce = run(f"shallow-ce-{tag}", models.load("smollm2").model, replace(cfg, kd_weight=0.0, ce_weight=1.0),
                 calib, args.workdir, eval_windows, teacher_ppl)
        print(json.dumps({"kd_perplexity": kd["perplexity"], "ce_perplexity": ce["perplexity"],
                          "kd_over_ce": kd["perplexity"] / ce["perplexity"]}))
        return
    quant = rtn.apply(models.load("smollm2").model, rtn.RTNConfig(bits=4, group_size=32, symmetric=True))
    before = args.rtn_ppl or evaluate(quant, eval_windows)["perplexity"]
    print(json.dumps({"rtn_int4_g32_sym_perplexity": before}), flush=True)
    kd = run(f"quantized-kd-{tag}", quant, replace(base, student="quantized", lr=args.lr or 1e-3), calib,
             args.workdir, eval_windows, teacher_ppl)
    recovered = (before - kd["perplexity"]) / (before - teacher_ppl)
    print(json.dumps({"before": before, "after": kd["perplexity"], "gap_recovered": recovered}))


if __name__ == "__main__":
    main()
