"""GPTQ of a recipe's model in memory against the layer-by-layer (streamed) step that ``toolkit run`` took.

    toolkit run recipes/smollm2-int4-gptq.yaml --output OUT
    .venv/bin/python benchmarks/gptq_paths.py recipes/smollm2-int4-gptq.yaml OUT/model

Loads the recipe's float model whole, runs the recipe's first (GPTQ) pass on it with the recipe's calibration
windows, and compares every packed linear's codes with the streamed output folder's, then prints both
perplexities under the recipe's evaluation windows. Equal codes mean the two paths are one computation on this
machine; a different perplexity on another machine then comes from the machine (``versions.cpu`` in manifests).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolkit import data, manifest, models
from toolkit.evaluation import perplexity
from toolkit.passes import gptq
from toolkit.passes.context import PassContext
from toolkit.pipeline import recipes
from toolkit.quant import checkpoint
from toolkit.quant.modules import quantized_modules


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="a recipe whose first pass is gptq")
    p.add_argument("streamed", type=Path, help="the model/ folder `toolkit run` wrote for that recipe")
    a = p.parse_args(argv)
    recipe = recipes.load(a.recipe)
    config = recipe.passes[0].config
    if not isinstance(config, gptq.GPTQConfig):
        raise SystemExit(f"error: {a.recipe}: the first pass is {config.name}, not gptq")
    ref = models.resolve(recipe.model)
    tokenizer = models.load_tokenizer(ref)
    torch.manual_seed(0)  # as ``runner.run`` does
    model = checkpoint.load_model(ref.folder) if ref.folder else models.load(ref.source).model
    ctx = PassContext(tokenizer=tokenizer, calibration_loader=lambda: data.token_windows(
        tokenizer, recipe.calibration.windows()), original_loader=lambda: None,
        workdir=Path(tempfile.mkdtemp(prefix="gptq-paths-")))
    start = time.perf_counter()
    model = gptq.apply(model, config, ctx)
    seconds = time.perf_counter() - start
    streamed = checkpoint.load_model(a.streamed)
    ours, theirs = quantized_modules(model), quantized_modules(streamed)
    differ = sorted(n for n in ours if n not in theirs or not torch.equal(ours[n].codes(), theirs[n].codes()))
    windows = data.token_windows(tokenizer, recipe.evaluation.windows())
    report = {
        "recipe": str(a.recipe), "cpu": manifest.cpu_kernels(), "in_memory_seconds": round(seconds, 1),
        "linears": len(ours), "linears_with_other_codes": len(differ), "first_differing": differ[:5],
        "perplexity_in_memory": perplexity.evaluate(model, windows, None, 1, False)["perplexity"],
        "perplexity_streamed": perplexity.evaluate(streamed, windows, None, 1, False)["perplexity"],
    }
    print(json.dumps(report, indent=2))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
