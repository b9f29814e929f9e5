"""Runtime: loads exported artifacts and runs prefill and decode with a managed KV cache.

    from toolkit.runtime import load, GenerationConfig
    engine = load("runs/smollm2-int4/export")
    result = engine.generate("What is the capital of France?", GenerationConfig(max_new_tokens=32))
    for chunk in engine.stream([{"role": "user", "content": "Hi"}]): print(chunk.text, end="")

What a deployment imports: onnxruntime, onnx (graph checks), numpy, tokenizers and jinja2; never torch.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.runtime.artifact import check_external_data, open_export
from toolkit.runtime.backend import Backend, BackendOptions, OrtBackend
from toolkit.runtime.contract import ExportContract, TensorNames, read_contract
from toolkit.runtime.engine import Engine
from toolkit.runtime.generation import GenerationConfig, GenerationResult, StreamChunk, Timings
from toolkit.runtime.scheduler import Handle
from toolkit.runtime.speculative import SpecStats
from toolkit.runtime.tokenizer import Tokenizer

__all__ = [
    "Backend", "BackendOptions", "Engine", "SpecStats", "ExportContract", "GenerationConfig", "GenerationResult", "Handle", "OrtBackend",
    "StreamChunk", "TensorNames", "Timings", "Tokenizer", "check_external_data", "load", "open_export",
    "read_contract",
]


def load(folder: str | Path, threads: int | None = None, max_batch: int = 8, prefill_chunk: int = 256,
         spin: bool = True, draft: str | Path | None = None, accuracy_level: int | None = None,
         paired_decode: bool | None = None, batch_exact: bool = True) -> Engine:
    """Open an export folder (refusing unsafe external data) and return a ready ``Engine``.

    threads: ORT intra-op threads (default: physical cores); max_batch: cache rows decoded together;
    prefill_chunk: prompt tokens per prefill call (bounds the logits buffer, [1, chunk, vocab]) and per scheduler
    step (running rows decode between the chunks of a long prompt);
    spin: let ORT worker threads spin between ops (faster decode on an idle machine; turn it off where
    other processes compete for the cores);
    draft: an export with the same tokenizer that drafts tokens for speculative decoding (checked before loading);
    accuracy_level: the target's MatMulNBits activation precision (0 float, 4 int8; None: the export's);
    paired_decode: with int8 activations (accuracy_level 4, or a W8A8 graph), decode one row as a pair, and a batch
    row by row as pairs, so that verify and decode agree bit for bit and greedy speculation keeps every position (see
    ``BackendOptions``); None: on when a draft is given. Without it an int8 target's verify defers close calls
    (``VERIFY_MARGIN_INT8``) and speculation gains little.
    batch_exact: with paired decode, a speculating batch decodes row by row so that each row's greedy output equals
    its output alone (one call per row); False: speculation runs while one sequence does, and several sequences
    decode in one batched call without it (``toolkit serve``'s default: throughput under concurrency).
    """
    folder = Path(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if draft is not None:
        check_same_tokenizer(tokenizer, Tokenizer.from_folder(Path(draft)), folder, Path(draft))
    paired = draft is not None if paired_decode is None else paired_decode
    # a target and its draft take turns on the same cores: neither pool may spin on past the end of its call
    options = BackendOptions(threads=threads, prefill_chunk=prefill_chunk, spin=spin, accuracy_level=accuracy_level,
                             stop_spinning=draft is not None)
    backend = OrtBackend(folder, replace(options, paired_decode=paired))
    if max_batch > 1 and not backend.supports_ragged_batch():
        warnings.warn(f"{folder}: the graph cannot decode rows of different lengths together (its attention "
                      "bias assumes aligned left padding); sequences run one at a time", stacklevel=2)
        max_batch = 1
    draft_backend = OrtBackend(Path(draft), replace(options, accuracy_level=None)) if draft is not None else None
    return Engine(backend, tokenizer, max_batch=max_batch, step_tokens=prefill_chunk, draft=draft_backend,
                  batch_exact=batch_exact)


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, target_folder: Path, draft_folder: Path) -> None:
    """A draft proposes token ids: they mean the same text only under the same vocabulary."""
    a, b = target.core.get_vocab(with_added_tokens=True), draft.core.get_vocab(with_added_tokens=True)
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()))
        raise ToolkitError(f"{draft_folder} cannot draft for {target_folder}: their tokenizers differ ({len(differ)} "
                           f"vocabulary entries, e.g. {differ[0]}); use a draft exported from the same model family")
