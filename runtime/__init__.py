"""Runtime: loads exported artifacts and runs prefill and decode with a managed KV cache.

    from toolkit.runtime import load, GenerationConfig
    engine = load("runs/smollm2-int4/export")
    result = engine.generate("What is the capital of France?", GenerationConfig(max_new_tokens=32))
    for chunk in engine.stream([{"role": "user", "content": "Hi"}]): print(chunk.text, end="")
"""

from __future__ import annotations

import warnings
from pathlib import Path

from toolkit.models.checkpoint import load_tokenizer
from toolkit.runtime.artifact import ModelSpec, check_external_data, read_spec
from toolkit.runtime.backend import Backend, OrtBackend
from toolkit.runtime.generation import Engine, GenerationConfig, GenerationResult, StreamChunk, Timings

__all__ = [
    "Backend", "Engine", "GenerationConfig", "GenerationResult", "ModelSpec", "OrtBackend", "StreamChunk",
    "Timings", "check_external_data", "load", "read_spec",
]


def load(folder: str | Path, threads: int | None = None, max_batch: int = 8, prefill_chunk: int = 256,
         spin: bool = True) -> Engine:
    """Open an export folder (refusing unsafe external data) and return a ready ``Engine``.

    threads: ORT intra-op threads (default: physical cores); max_batch: cache rows decoded together;
    prefill_chunk: prompt tokens per prefill call (bounds the logits buffer, [1, chunk, vocab]);
    spin: let ORT worker threads spin between ops (onnxruntime's and onnxruntime-genai's default: 1.4x
    faster decode on an idle machine; turn it off where other processes compete for the cores).
    """
    folder = Path(folder)
    backend = OrtBackend(folder, threads=threads, prefill_chunk=prefill_chunk, spin=spin)
    if max_batch > 1 and not backend.supports_ragged_batch():
        warnings.warn(f"{folder}: the graph cannot decode rows of different lengths together (its attention "
                      "bias assumes aligned left padding); sequences run one at a time", stacklevel=2)
        max_batch = 1
    return Engine(backend, load_tokenizer(folder), max_batch=max_batch)
