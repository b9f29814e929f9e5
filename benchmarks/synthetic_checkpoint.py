"""Random bf16 checkpoints with the exact shapes and config of a named public model, sharded like the hub's.

    python benchmarks/synthetic_checkpoint.py llama-3.1-8b /work/synth/llama-3.1-8b
    python benchmarks/synthetic_checkpoint.py llama-3.2-1b /work/synth/llama-3.2-1b
    python benchmarks/synthetic_checkpoint.py --list

Scale can then be measured with no download. Tensor names and shapes come from the transformers model
built on the meta device from the config (so any family transformers knows works); weights are
N(0, 0.02) (norm weights 1), written tensor by tensor in row chunks behind a pre-computed header, so the
generator stays at a few hundred MB of resident memory even for the 16 GB checkpoint.

Tokenizer: SmolLM2's (49152 tokens) is copied in, and the config's special-token ids are set to its ids.
The config keeps the model's real ``vocab_size`` (the embedding and head have the real shapes); ids
beyond the tokenizer are never fed, and generation masks their logits (``toolkit.models.streaming``
suppresses ids >= len(tokenizer)), so decoding never emits an id the tokenizer cannot print.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from toolkit.models.shards import INDEX, SINGLE, shard_name, write_planned_shard

GB = 10**9
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# Values from the models' published config.json files; shard size as the hub splits them.
MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "shard_bytes": 5 * GB,
        "config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                   "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0}},
    },
    "llama-3.2-3b": {
        "shard_bytes": 5 * GB,
        "config": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                   "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                   "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0}},
    },
    "llama-3.1-8b": {
        "shard_bytes": 5 * GB,
        "config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                   "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0}},
    },
    # not a public model: a few-MB Llama for quick checks of the scripts themselves
    "llama-tiny": {
        "shard_bytes": 4 * 2**20,
        "config": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    },
    "qwen2.5-3b": {
        "shard_bytes": 4 * GB,
        "config": {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    },
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
ROW_CHUNK_ELEMENTS = 1 << 24  # 16 M values (32 MB of bf16) generated at a time


def tokenizer_folder() -> Path:
    from toolkit.models import resolve

    folder = resolve("smollm2").folder
    assert folder is not None
    return folder


def make_config(name: str, tokenizer_dir: Path) -> Any:
    fields = dict(MODELS[name]["config"])
    special = json.loads((tokenizer_dir / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields[key] = special.get(key)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = torch.bfloat16
    return config


def tensor_plan(config: Any) -> list[tuple[str, list[int], torch.dtype]]:
    """``(name, shape, dtype)`` of every stored tensor, in module order, from the model built on meta."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.architectures = [type(model).__name__]
    state = model.state_dict()
    if config.tie_word_embeddings:  # stored once, under the embedding's name (as save_pretrained does)
        state.pop("lm_head.weight", None)
    return [(n, list(t.shape), torch.bfloat16) for n, t in state.items()]


def random_rows(name: str, shape: list[int], gen: torch.Generator) -> Iterator[torch.Tensor]:
    if len(shape) == 1:
        yield (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        return
    cols = int(torch.Size(shape[1:]).numel())
    step = max(1, ROW_CHUNK_ELEMENTS // cols)
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        yield (torch.randn(rows, *shape[1:], generator=gen) * 0.02).to(torch.bfloat16)


def split_shards(plan: list[tuple[str, list[int], torch.dtype]], max_bytes: int) -> list[list[tuple[str, list[int], torch.dtype]]]:
    shards: list[list[tuple[str, list[int], torch.dtype]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = int(torch.Size(entry[1]).numel()) * 2
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_checkpoint(name: str, folder: Path, seed: int = 0, shard_bytes: int | None = None,
                     layers: int | None = None) -> dict[str, Any]:
    """Write the synthetic checkpoint ``name`` into ``folder`` (created); returns sizes and time.
    ``layers`` keeps every shape but the number of decoder layers (a quick proxy: per-layer costs and the
    peak memory of layer-at-a-time passes do not depend on it)."""
    start = time.perf_counter()
    tok_dir = tokenizer_folder()
    config = make_config(name, tok_dir)
    if layers is not None:
        config.num_hidden_layers = layers
    plan = tensor_plan(config)  # also sets config.architectures
    folder.mkdir(parents=True, exist_ok=False)
    config.save_pretrained(folder)
    for file in TOKENIZER_FILES:
        if (tok_dir / file).is_file():
            shutil.copy(tok_dir / file, folder / file)
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: s for n, s, _ in plan}
    shards = split_shards(plan, shard_bytes or MODELS[name]["shard_bytes"])
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        file = SINGLE if len(shards) == 1 else shard_name(i, len(shards))
        total += write_planned_shard(folder / file, shard, lambda n: random_rows(n, shapes[n], gen), {"format": "pt"})
        weight_map.update({n: file for n, _, _ in shard})
    if len(shards) > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    params = sum(int(torch.Size(s).numel()) for _, s, _ in plan)
    return {"model": name, "folder": str(folder), "parameters": params, "bytes": total, "shards": len(shards),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", choices=sorted(MODELS))
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=None, help="override the hub's shard size")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers, same shapes otherwise")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list or args.model is None:
        for name, spec in MODELS.items():
            print(name, json.dumps(spec["config"]))
        return 0
    if args.folder is None:
        parser.error("give the output folder")
    if args.folder.exists():
        print(f"error: {args.folder} exists; remove it or choose another folder", file=sys.stderr)
        return 2
    print(json.dumps(write_checkpoint(args.model, args.folder, args.seed, args.shard_bytes, args.layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
