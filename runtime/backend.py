"""Backends run the decoder graph on rows of a KV cache. ONNX Runtime (CPU) is the one we ship.

A backend only knows tensors: ``prefill`` fills one cache row from a chunk of tokens, ``decode``
advances rows [0, n) by one token each. Tokenizing, sampling and scheduling live in generation.py,
so a TensorRT engine plugs in by implementing the same four methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import psutil

from toolkit.errors import ToolkitError
from toolkit.runtime.artifact import (
    ModelSpec,
    check_external_data,
    read_spec,
    resolve_model,
    uses_shared_buffer,
)
from toolkit.runtime.kv_cache import KVCache

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Backend(Protocol):
    spec: ModelSpec

    def allocate(self, slots: int, capacity: int) -> KVCache:
        """Allocate (or reuse, if large enough) the KV cache; the only allocation of the run."""
        ...

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        """token_ids: [S] at positions start..start+S-1 of row ``slot``; returns last logits [V]."""
        ...

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens, lengths: [n] (lengths before this token) for rows 0..n-1; returns logits [n, V]."""
        ...

    def reset(self) -> None:
        """Forget cached bindings (the cache content is overwritten by the next prefill)."""
        ...


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class OrtBackend:
    """GroupQueryAttention graphs with past and present bound to one preallocated buffer (IO binding)."""

    def __init__(self, folder: Path, threads: int | None = None, prefill_chunk: int = 256, spin: bool = True) -> None:
        folder = Path(folder)
        model_path = resolve_model(folder)
        proto = check_external_data(folder, model_path)
        if not uses_shared_buffer(proto):
            raise ToolkitError(
                f"{model_path} has no GroupQueryAttention node: this runtime needs the in-place KV cache "
                "it provides; export with the 'ort' target (GroupQueryAttention + MatMulNBits)"
            )
        del proto
        self.spec = read_spec(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers cut wake-up latency (decode 118 -> 164 tok/s for SmolLM2 int4 on an idle 2-core
        # machine) but burn the cores other processes need (it halved decode on a loaded box): opt-out.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._names = self._kv_names()
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_positions = "position_ids" in inputs
        self.dtype = np.dtype(ORT_DTYPES.get(inputs[self._names[0][0]].type, np.float32))
        self.prefill_chunk = prefill_chunk
        self.cache: KVCache | None = None
        self._decode_bindings: dict[int, ort.IOBinding] = {}

    def _kv_names(self) -> list[tuple[str, str]]:
        names = {i.name for i in self.session.get_inputs()}
        outs = {o.name for o in self.session.get_outputs()}
        pairs = self.spec.cache_names()
        missing = [p for p, q in pairs if p not in names or q not in outs]
        if missing or "input_ids" not in names or "logits" not in outs:
            raise ToolkitError(
                f"the graph does not follow the past_key_values.N.key / present.N.key convention "
                f"(missing e.g. {missing[:2]}): re-export it with toolkit's exporter"
            )
        return pairs

    def allocate(self, slots: int, capacity: int) -> KVCache:
        c = self.cache
        if c is not None and c.slots >= slots and capacity <= c.capacity <= 4 * capacity:
            return c  # reuse: big enough, and not wastefully larger than this budget
        self.reset()
        self.cache = KVCache(self._names, slots, capacity, self.spec.num_kv_heads, self.spec.head_dim, self.dtype)
        V = self.spec.vocab_size
        self._ids = np.zeros((slots, 1), np.int64)  # decode input_ids [SLOTS, 1]
        self._pos = np.zeros((slots, 1), np.int64)
        self._ones = np.ones((1, capacity), np.int64)  # attention mask prefix for one row
        self._decode_logits = np.empty((slots, 1, V), np.float32)  # [SLOTS, 1, V]
        self._prefill_logits = np.empty((1, min(self.prefill_chunk, capacity), V), np.float32)  # [1, CHUNK, V]
        return self.cache

    def reset(self) -> None:
        self._decode_bindings.clear()

    def supports_ragged_batch(self) -> bool:
        """Probe: do rows of different lengths decode together as they do alone?

        GQA itself places each row's query by its own seqlens, but a graph whose attention bias assumes
        left-padded, aligned rows (every row ending in the last column; our exports before the per-row
        query columns, and possibly other exporters' graphs) lets a shorter row see a column
        it never wrote. Two tiny rows (lengths 2 and 1) decoded together vs alone tell the difference.
        """
        cache = self.allocate(2, 16)
        tokens, lengths = np.array([1, 2], np.int64), np.array([2, 1], np.int64)
        for b in cache.buffers:  # a stale, non-zero column exposes a bias that lets it through
            b[:] = 1.0
        self.prefill(0, np.array([3, 4], np.int64), 0)
        self.prefill(1, np.array([5], np.int64), 0)
        snapshot = [b.copy() for b in cache.buffers]
        together = self.decode(tokens, lengths)[1].copy()
        for b, s in zip(cache.buffers, snapshot, strict=True):
            b[:] = s
        alone = self._decode_row(1, 2, 1)
        self.cache, self._decode_bindings = None, {}  # the probe's cache is not a request's cache
        # Judged relative to the logits: int8-activation kernels (accuracy_level 4) may take another path for two
        # rows than for one (SmolLM2 GPTQ g64: relative RMS 0.008, max |Δ| 0.37), while a row that sees the stale
        # column is off by a relative RMS of 0.6-0.9.
        rel = np.sqrt(np.mean((together - alone) ** 2) / max(float(np.mean(alone**2)), 1e-30))
        return bool(rel < 0.1)

    def _decode_row(self, slot: int, token: int, length: int) -> np.ndarray:
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        io.bind_cpu_input("attention_mask", self._mask(np.array([length + 1])))
        if self.has_positions:
            io.bind_cpu_input("position_ids", np.array([[length]], np.int64))
        io.bind_output("logits")
        self._bind_cache(io, slot, slot + 1)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[0, -1]

    def _bind_cache(self, io: ort.IOBinding, start: int, stop: int) -> None:
        assert self.cache is not None
        for (past, present), value in zip(self._names, self.cache.ortvalues(start, stop), strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # same buffer: GQA writes new positions in place

    def _mask(self, lengths_after: np.ndarray) -> np.ndarray:
        # GQA reads seqlens_k = sum(mask) - 1 and total length = mask width; rows are right-padded.
        total = int(lengths_after.max())
        if len(lengths_after) == 1:
            return self._ones[:, :total]
        return (np.arange(total)[None, :] < lengths_after[:, None]).astype(np.int64)

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        assert self.cache is not None, "allocate() the cache before prefill"
        logits = None
        for lo in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[lo : lo + self.prefill_chunk]
            logits = self._prefill_chunk(slot, chunk, start + lo)
        assert logits is not None, "prefill needs at least one token"
        return logits

    def _prefill_chunk(self, slot: int, chunk: np.ndarray, start: int) -> np.ndarray:
        S = len(chunk)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(chunk, np.int64).reshape(1, S))
        io.bind_cpu_input("attention_mask", self._mask(np.array([start + S])))
        if self.has_positions:
            io.bind_cpu_input("position_ids", np.arange(start, start + S, dtype=np.int64).reshape(1, S))
        out = self._prefill_logits[:, :S]  # [1, S, V], a contiguous prefix
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        self._bind_cache(io, slot, slot + 1)
        self.session.run_with_iobinding(io)
        return out[0, -1]

    def _decode_binding(self, n: int) -> ort.IOBinding:
        io = self._decode_bindings.get(n)
        if io is None:  # bound once per batch width; later steps only rebind the mask
            io = self.session.io_binding()
            io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._ids[:n]))
            if self.has_positions:
                io.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(self._pos[:n]))
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._decode_logits[:n]))
            self._bind_cache(io, 0, n)
            self._decode_bindings[n] = io
        return io

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        n = len(tokens)
        io = self._decode_binding(n)
        self._ids[:n, 0] = tokens
        if self.has_positions:
            self._pos[:n, 0] = lengths
        io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask(lengths + 1)))
        self.session.run_with_iobinding(io)
        return self._decode_logits[:n, 0]  # [n, V], valid until the next call
