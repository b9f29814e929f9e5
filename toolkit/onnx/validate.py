"""Proving an ONNX export: onnxruntime CPU against the PyTorch model it came from, on several shapes.

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
The reference is always a PyTorch forward over the whole sequence without a cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from toolkit.onnx.decoder import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, POSITION_IDS, PRESENT
from toolkit.onnx.graph import Dims

SHARED_CAPACITY = 32
MaskFn = Callable[[int, int], np.ndarray]  # (columns written so far, mask width) -> attention_mask [B, width]
Runner = Callable[[ort.InferenceSession, list[np.ndarray], MaskFn, Dims], list[np.ndarray]]


def left_padded(pads: np.ndarray) -> MaskFn:
    """Row r starts at column pads[r]; every row ends at the last column written."""
    return lambda seen, width: ((np.arange(width)[None, :] >= pads[:, None])
                                & (np.arange(width)[None, :] < seen)).astype(np.int64)


def right_padded(lengths: np.ndarray, first: int) -> MaskFn:
    """Row r holds lengths[r] tokens once ``first`` columns are written, then one more per later step."""
    return lambda seen, width: (np.arange(width)[None, :] < (lengths + seen - first)[:, None]).astype(np.int64)


@dataclass(frozen=True)
class Probe:
    dims: Dims
    vocab_limit: int  # draw test tokens below this id (avoids special tokens of tiny vocabularies)
    seed: int = 0


def session(path: str, accuracy_level: int, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # the standard target's DequantizeLinear->MatMul is fused into MatMulNBits at this accuracy level
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def op_census(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


@torch.no_grad()
def reference_logits(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def _feed(ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray], dims: Dims) -> dict[str, np.ndarray]:
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]
    feed = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions.astype(np.int64)}
    for i in range(dims.layers):
        feed[PAST.format(i=i, kv="key")] = past[2 * i]
        feed[PAST.format(i=i, kv="value")] = past[2 * i + 1]
    return feed


def _empty_past(batch: int, dims: Dims) -> list[np.ndarray]:
    return [np.zeros((batch, dims.kv_heads, 0, dims.head_dim), np.float32) for _ in range(2 * dims.layers)]


def run_steps(sess: ort.InferenceSession, chunks: list[np.ndarray], mask_at: MaskFn, dims: Dims) -> list[np.ndarray]:
    """Feed ``chunks`` ([B, S_j] each) one after another, present -> past; returns logits per chunk."""
    batch = chunks[0].shape[0]
    past, seen, out = _empty_past(batch, dims), 0, []
    for chunk in chunks:
        seen += chunk.shape[1]
        mask = mask_at(seen, seen)
        results = sess.run(None, _feed(chunk, mask, past, dims))
        out.append(results[0])
        past = results[1:]
    return out


def run_shared_buffer(sess: ort.InferenceSession, chunks: list[np.ndarray], mask_at: MaskFn, dims: Dims,
                      capacity_mask: bool, capacity: int = SHARED_CAPACITY) -> list[np.ndarray]:
    """Past and present bound to the same ``[B, KVH, capacity, D]`` buffers (GroupQueryAttention writes in place).

    ``capacity_mask``: the mask spans the whole capacity (zeros after the last token), else only ``P+S`` columns.
    """
    batch = chunks[0].shape[0]
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, dims.kv_heads, capacity, dims.head_dim), np.float32))
               for _ in range(2 * dims.layers)]
    seen, out = 0, []
    for chunk in chunks:
        seen += chunk.shape[1]
        mask = mask_at(seen, capacity if capacity_mask else seen)
        io = sess.io_binding()
        io.bind_cpu_input(INPUT_IDS, chunk)
        io.bind_cpu_input(ATTENTION_MASK, mask)
        positions = np.clip(np.cumsum(mask[:, :seen], axis=1) - 1, 0, None)[:, -chunk.shape[1]:]
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        io.bind_output(LOGITS)  # first, so it is output 0
        for i in range(dims.layers):
            for j, kv in enumerate(("key", "value")):
                io.bind_ortvalue_input(PAST.format(i=i, kv=kv), buffers[2 * i + j])
                io.bind_ortvalue_output(PRESENT.format(i=i, kv=kv), buffers[2 * i + j])
        sess.run_with_iobinding(io)
        out.append(io.copy_outputs_to_cpu()[0])
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


def run_checks(sess: ort.InferenceSession, model: PreTrainedModel, probe: Probe,
               shared_buffer: bool, left_padding: bool = True) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(probe.seed)
    d = probe.dims

    def tokens(n: int) -> np.ndarray:
        return rng.integers(0, probe.vocab_limit, (1, n), dtype=np.int64)

    no_pad = left_padded(np.zeros(1, np.int64))
    results: dict[str, dict[str, float]] = {}
    for n in (7, 13):
        t = tokens(n)
        results[f"prefill_{n}"] = metrics(*_rows(run_steps(sess, [t], no_pad, d), reference_logits(model, t)))
    t = tokens(17)
    got, ref = _rows(run_steps(sess, _chunks(t, 13), no_pad, d), reference_logits(model, t))
    results["decode"] = metrics(got[13:], ref[13:])  # the 4 one-token steps after a 13-token prefill
    a, b = tokens(15), tokens(10)
    side = "left" if left_padding else "right"
    results[f"{side}_pad_batch2"] = metrics(*_padded_rows(run_steps, sess, model, a, b, d, left_padding))
    if shared_buffer:
        for capacity_mask in (True, False):
            def shared(s: ort.InferenceSession, c: list[np.ndarray], m: MaskFn, dd: Dims,
                       cm: bool = capacity_mask) -> list[np.ndarray]:
                return run_shared_buffer(s, c, m, dd, cm)
            key = "shared_buffer_" + ("capacity_mask" if capacity_mask else "current_mask")
            results[key] = metrics(*_padded_rows(shared, sess, model, a, b, d, left_padding))
    return results


def _padded_rows(runner: Runner, sess: ort.InferenceSession, model: PreTrainedModel, a: np.ndarray,
                 b: np.ndarray, d: Dims, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences (15 and 10 tokens: prompts 13 and 8, then 2 decode steps each) padded into one batch;
    the real positions of both rows against each sequence run alone."""
    steps, pad = 2, a.shape[1] - b.shape[1]
    prompt = a.shape[1] - steps
    if left:
        batch = np.concatenate([a, np.concatenate([np.zeros((1, pad), np.int64), b], axis=1)])
        got = np.concatenate(runner(sess, _chunks(batch, prompt), left_padded(np.array([0, pad])), d), axis=1)
        rows = [got[0], got[1, pad:]]
    else:  # row b: prompt, pad, then its decode tokens where row a's are (the pad columns are overwritten)
        b_prompt = b.shape[1] - steps
        row_b = np.concatenate([b[:, :b_prompt], np.zeros((1, pad), np.int64), b[:, b_prompt:]], axis=1)
        mask_at = right_padded(np.array([prompt, b_prompt]), prompt)
        got = np.concatenate(runner(sess, _chunks(np.concatenate([a, row_b]), prompt), mask_at, d), axis=1)
        rows = [got[0], np.concatenate([got[1, :b_prompt], got[1, prompt:]])]
    ref = np.concatenate([reference_logits(model, a)[0], reference_logits(model, b)[0]])
    return np.concatenate(rows), ref


def greedy_onnx(sess: ort.InferenceSession, contract: dict, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt [1, L]``: prefill, then one token a step feeding present back as past."""
    layers, kvh, hd = contract["num_layers"], contract["num_kv_heads"], contract["head_dim"]
    past = [np.zeros((1, kvh, 0, hd), np.float32) for _ in range(2 * layers)]
    ids, out, seen = prompt.astype(np.int64), [], 0
    for _ in range(new_tokens):
        seen += ids.shape[1]
        feed = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, seen), np.int64),
                POSITION_IDS: np.arange(seen - ids.shape[1], seen, dtype=np.int64)[None]}
        for i in range(layers):
            feed[PAST.format(i=i, kv="key")], feed[PAST.format(i=i, kv="value")] = past[2 * i], past[2 * i + 1]
        results = sess.run(None, feed)
        past = results[1:]
        out.append(int(results[0][0, -1].argmax()))
        ids = np.array([[out[-1]]], np.int64)
    return out


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
