"""onnxruntime-genai as the consumer of an ONNX export folder: greedy token ids, for the checks and benchmarks
that compare our runtime with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def greedy(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy ids after prompt ``ids``, decoded by onnxruntime-genai from ``folder``."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], np.int32))
    tokens: list[int] = []
    while len(tokens) < new_tokens:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens
