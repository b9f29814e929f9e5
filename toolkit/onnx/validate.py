"""Proving an ONNX export: the runtime's backend on the export against the PyTorch model it came from, on several shapes.

Checks (each records max |Δlogits| over the compared positions):
- ``prefill_7``, ``prefill_13``: one sequence, empty past (odd lengths on purpose);
- ``decode``: prefill 13 then 4 single-token steps feeding ``present`` back as ``past``;
- ``left_pad_batch2`` / ``right_pad_batch2``: lengths 13 and 8 padded into one batch, prefill then 2 decode
  steps, compared only at real tokens, against each sequence run alone (no padding) in PyTorch (right padding:
  every row writes from column 0 and GroupQueryAttention places its queries by ``seqlens_k``; left padding needs
  the export's attention bias, ``left_padding: true``);
- ``shared_buffer_*`` (GroupQueryAttention only): the padded batch again, past and present bound to one
  preallocated ``[B, KVH, capacity, D]`` buffer through IO binding, the attention_mask either spanning the whole
  capacity (``capacity_mask``) or only the ``P+S`` columns in use (``current_mask``).
Every check feeds the graph through ``OrtBackend.forward``, the loop the runtime decodes with: the first ones
with present copied back into the cache, the ``shared_buffer_*`` ones with one buffer bound as both.
The reference is always a PyTorch forward over the whole sequence without a cache: the model in memory
(``model_reference``) or, for a streamed export, one decoder layer resident at a time
(``toolkit.evaluation.streaming.stream_logits``); the longest probe is 17 tokens, so either holds little more
than its weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
import torch
from transformers import PreTrainedModel

from toolkit.runtime.backend import OrtBackend

SHARED_CAPACITY = 32
MaskFn = Callable[[int, int], np.ndarray]  # (columns written so far, mask width) -> attention_mask [B, width]
Runner = Callable[[OrtBackend, list[np.ndarray], MaskFn], list[np.ndarray]]
Reference = Callable[[list[np.ndarray]], list[np.ndarray]]  # token ids [1, S] each -> float32 logits [1, S, V]


def left_padded(pads: np.ndarray) -> MaskFn:
    """Row r starts at column pads[r]; every row ends at the last column written."""
    return lambda seen, width: ((np.arange(width)[None, :] >= pads[:, None])
                                & (np.arange(width)[None, :] < seen)).astype(np.int64)


def right_padded(lengths: np.ndarray, first: int) -> MaskFn:
    """Row r holds lengths[r] tokens once ``first`` columns are written, then one more per later step."""
    return lambda seen, width: (np.arange(width)[None, :] < (lengths + seen - first)[:, None]).astype(np.int64)


@dataclass(frozen=True)
class Probe:
    vocab_limit: int  # draw test tokens below this id (avoids special tokens of tiny vocabularies)
    seed: int = 0


def op_census(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


@torch.no_grad()
def reference_logits(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def run_steps(backend: OrtBackend, chunks: list[np.ndarray], mask_at: MaskFn, shared: bool = False,
              capacity_mask: bool = False) -> list[np.ndarray]:
    """Feed ``chunks`` ([B, S_j] each) one after another on fresh cache rows; returns logits per chunk.

    ``shared``: past and present are one ``[B, KVH, SHARED_CAPACITY, D]`` buffer (GroupQueryAttention writes in
    place) and ``capacity_mask`` makes the mask span the whole capacity (zeros after the last token), else only
    ``P+S`` columns. Otherwise present comes back and is copied into the cache for the next chunk.
    """
    batch = chunks[0].shape[0]
    capacity = SHARED_CAPACITY if shared else sum(c.shape[1] for c in chunks)
    cache = backend.allocate(batch, capacity, share_buffer=shared)
    for buffer in cache.buffers:  # a reused cache: start from zeros, as a fresh one does
        buffer.fill(0)
    seen, out = 0, []
    for chunk in chunks:
        seen += chunk.shape[1]
        mask = mask_at(seen, SHARED_CAPACITY if capacity_mask else seen)
        positions = np.clip(np.cumsum(mask[:, :seen], axis=1) - 1, 0, None)[:, -chunk.shape[1]:]
        out.append(backend.forward(chunk, mask, positions))
    return out


def _chunks(tokens: np.ndarray, prefill: int) -> list[np.ndarray]:
    return [tokens[:, :prefill]] + [tokens[:, j:j + 1] for j in range(prefill, tokens.shape[1])]


def _rows(got: list[np.ndarray], ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vocab = ref.shape[-1]
    return np.concatenate(got, axis=1).reshape(-1, vocab), ref.reshape(-1, vocab)


def metrics(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Over rows (positions) ``[R, V]``: ``max_abs``: max |Δlogits|; ``rel_rms``: RMS(Δ) / RMS(reference)
    pooled; ``rel_rms_median``: the median over positions of each position's RMS(Δ) / RMS(reference), which
    one atypical position cannot dominate; ``top1``: argmax agreement."""
    delta = got - ref
    per_row = np.sqrt(np.mean(delta**2, axis=-1) / np.maximum(np.mean(ref**2, axis=-1), 1e-30))
    return {
        "max_abs": float(np.abs(delta).max()),
        "rel_rms": float(np.sqrt(np.mean(delta**2) / np.mean(ref**2))),
        "rel_rms_median": float(np.median(per_row)),
        "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
    }


def probe_sequences(probe: Probe) -> list[np.ndarray]:
    """The token ids ``[1, S]`` the checks feed: prefills of 7 and 13, 17 for decode, 15 and 10 for the batch."""
    rng = np.random.default_rng(probe.seed)
    return [rng.integers(0, probe.vocab_limit, (1, n), dtype=np.int64) for n in (7, 13, 17, 15, 10)]


def model_reference(model: PreTrainedModel) -> Reference:
    return lambda sequences: [reference_logits(model, ids) for ids in sequences]


def run_checks(backend: OrtBackend, sequences: list[np.ndarray], refs: list[np.ndarray],
               left_padding: bool = True) -> dict[str, dict[str, float]]:
    """The checks on ``probe_sequences`` against their reference logits ``refs`` (one ``[1, S, V]`` each)."""
    no_pad = left_padded(np.zeros(1, np.int64))
    results: dict[str, dict[str, float]] = {}
    for t, ref in zip(sequences[:2], refs[:2], strict=True):
        results[f"prefill_{t.shape[1]}"] = metrics(*_rows(run_steps(backend, [t], no_pad), ref))
    got, ref = _rows(run_steps(backend, _chunks(sequences[2], 13), no_pad), refs[2])
    results["decode"] = metrics(got[13:], ref[13:])  # the 4 one-token steps after a 13-token prefill
    pair = (sequences[3], sequences[4]), np.concatenate([refs[3][0], refs[4][0]])
    side = "left" if left_padding else "right"
    results[f"{side}_pad_batch2"] = metrics(*_padded_rows(run_steps, backend, *pair, left_padding))
    if backend.can_share_buffer:
        for capacity_mask in (True, False):
            shared = partial(run_steps, shared=True, capacity_mask=capacity_mask)
            key = "shared_buffer_" + ("capacity_mask" if capacity_mask else "current_mask")
            results[key] = metrics(*_padded_rows(shared, backend, *pair, left_padding))
    return results


def _padded_rows(runner: Runner, backend: OrtBackend, seqs: tuple[np.ndarray, np.ndarray], ref: np.ndarray,
                 left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences (15 and 10 tokens: prompts 13 and 8, then 2 decode steps each) padded into one batch;
    the real positions of both rows against each sequence run alone (``ref``: both rows' reference logits)."""
    a, b = seqs
    steps, pad = 2, a.shape[1] - b.shape[1]
    prompt = a.shape[1] - steps
    if left:
        batch = np.concatenate([a, np.concatenate([np.zeros((1, pad), np.int64), b], axis=1)])
        got = np.concatenate(runner(backend, _chunks(batch, prompt), left_padded(np.array([0, pad]))), axis=1)
        rows = [got[0], got[1, pad:]]
    else:  # row b: prompt, pad, then its decode tokens where row a's are (the pad columns are overwritten)
        b_prompt = b.shape[1] - steps
        row_b = np.concatenate([b[:, :b_prompt], np.zeros((1, pad), np.int64), b[:, b_prompt:]], axis=1)
        mask_at = right_padded(np.array([prompt, b_prompt]), prompt)
        got = np.concatenate(runner(backend, _chunks(np.concatenate([a, row_b]), prompt), mask_at), axis=1)
        rows = [got[0], np.concatenate([got[1, :b_prompt], got[1, prompt:]])]
    return np.concatenate(rows), ref


@torch.no_grad()
def greedy_torch(model: PreTrainedModel, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """The same greedy loop in PyTorch (full forward each step, no cache: the plainest reference)."""
    ids = torch.from_numpy(prompt.astype(np.int64))
    out: list[int] = []
    for _ in range(new_tokens):
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
