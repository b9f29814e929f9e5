"""Backends run the decoder graph on rows of a KV cache. ONNX Runtime (CPU) is the one we ship.

A backend only knows tensors: ``prefill`` fills one cache row from a chunk of tokens, ``decode``
advances rows [0, n) by one token each, ``extend`` feeds a few tokens to one row and returns each one's argmax
(a draft's steps, a speculative decoder's verification), ``score`` feeds k tokens to each of several rows.
Rows' lengths belong to the caller and are passed with every call: rolling a row back is passing a shorter
length next time (the columns past it are masked, then overwritten), no copy.
Tokenizing, sampling and scheduling live in generation.py and scheduler.py, so a TensorRT engine plugs
in by implementing the same methods.

``OrtBackend.forward`` is the one place that feeds an ONNX decoder (names from the export contract):
the runtime's prefill and decode, the exporter's validation, perplexity on exports and the benchmarks
all go through it. Two ways to hold the cache, both in buffers allocated once (``# k: [SLOTS, KVH, CAP, D]``):
- shared (GroupQueryAttention graphs, and the standard target's TensorScatter ones): the same buffer is bound as
  past and present, the graph writes the new columns in place (onnxruntime-genai's ``past_present_share_buffer``;
  onnxruntime's TensorScatter skips its copy of past when both are one buffer);
- copied (any graph): past is fed (the used columns, or the whole fixed-capacity row for a TensorScatter graph)
  and the present the graph returns is copied back into the buffer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
import psutil

from toolkit.errors import ToolkitError
from toolkit.runtime.artifact import (
    next_token_node,
    open_export,
    quantizes_activations,
    takes_whole_cache,
    uses_shared_buffer,
)
from toolkit.runtime.contract import NEXT_TOKEN, ExportContract
from toolkit.runtime.huge_pages import anonymous_ranges, back_with_huge_pages, new_huge_spans
from toolkit.runtime.kv_cache import KVCache

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PROVIDERS = ["CPUExecutionProvider"]


class Backend(Protocol):
    contract: ExportContract
    cache: KVCache | None  # the last allocated cache

    def allocate(self, slots: int, capacity: int) -> KVCache:
        """Allocate (or reuse, if large enough) the KV cache; a larger one keeps the old rows' content."""
        ...

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        """token_ids: [S] at positions start..start+S-1 of row ``slot``; returns last logits [V]."""
        ...

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens, lengths: [n] (lengths before this token) for rows 0..n-1; returns logits [n, V]."""
        ...

    def decode_next(self, tokens: np.ndarray, lengths: np.ndarray, with_logits: bool, live: np.ndarray | None = None,
                    rowwise: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``decode``, returning each row's argmax token [n] (numpy's: the first index on ties) and the logits
        [n, V] only ``with_logits`` (a backend whose logits live on a device may then take the token in the graph
        and copy n ids instead of [n, V] floats). ``live``: [n] bool, the rows whose outputs are read (default all;
        the others may be skipped). ``rowwise``: a backend that decodes a batch row by row to give each row the
        bits it has alone (``OrtBackend.pairs``) may run the rows in one batched call when False."""
        ...

    def decode_row(self, token: int, length: int, with_logits: bool) -> tuple[int, np.ndarray | None]:
        """``decode_next`` for row 0 alone (one stream), with Python ints in and out: the same bits, the token and
        the logits [V] only ``with_logits``, valid until the next call."""
        ...

    def score(self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens: [B, k] at positions lengths[b]..lengths[b]+k-1 of row rows[b], written to the cache;
        returns the logits of every position [B, k, V]."""
        ...

    def extend(self, slot: int, tokens: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens: [S] (a few) at positions start..start+S-1 of row ``slot``, written to the cache; returns each
        position's argmax [S] and logits [S, V], valid until the next call (a draft's steps, a row's verify)."""
        ...

    def reset(self) -> None:
        """Forget cached bindings (the cache content is overwritten by the next prefill)."""
        ...


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


MAX_EXTEND = 16  # tokens per ``extend`` call through a kept binding (a draft and its bonus); longer ones prefill
PAD_TOKEN = 0  # fills a call to an even token count (``OrtBackend.pairs``); only its own, discarded, outputs see it
MAX_THREADS = 1024  # onnxruntime takes an int32 and starts them all; more is a typo, not a machine


@dataclass(frozen=True)
class BackendOptions:
    threads: int | None = None  # ORT intra-op threads; None: physical cores
    # Let ORT worker threads spin between ops (onnxruntime's and onnxruntime-genai's default): shorter wake-up
    # latency on an idle machine, but it burns the cores other processes need.
    spin: bool = True
    prefill_chunk: int = 256  # prompt tokens per prefill call (bounds the logits buffer, [1, chunk, V])
    # MatMulNBits (and the standard target's fused DequantizeLinear): 0 keeps activations float, 4 quantizes them
    # to int8 per block; None: the level the graph was exported with
    accuracy_level: int | None = None
    # True: greedy steps read the graph's next-token output (an ArgMax on the logits; added at load where the graph has
    # none). False: the token is numpy's argmax of the logits, which a decode step binds into a preallocated buffer
    # anyway (no copy), and the graph's ArgMax is removed at load, since onnxruntime runs every node whatever outputs a
    # call asks for: its CPU ArgMax takes ~50 us per row (every prompt token of a prefill, every row of a decode step),
    # numpy's ~3 us (49,152 floats, one thread)
    next_token: bool = False
    # stop the intra-op pool's spinning when a call ends: for sessions that take turns on the same cores (a target
    # and its draft), where one pool spinning after its call takes the cores the other's call needs
    stop_spinning: bool = False
    # int8-activation graphs: decode one row as a pair [token, pad] so that a k-token verify and a one-token decode
    # run the same kernels and agree bit for bit (greedy speculation needs no margin); costs ~25 % more CPU per
    # one-row decode step (SmolLM2 int4 GPTQ block 64, 2 threads, median of 12 interleaved rounds), and a batch
    # decodes row by row (one call per row), so it is for targets that speculate
    paired_decode: bool = False
    # onnxruntime's profiler on, writing ``<profile_prefix>_<time>.json`` (``session.end_profiling()`` returns the
    # path); each node's kernel time per call, as ``benchmarks/graph_ab.py`` compares two graphs by
    profile_prefix: str = ""
    # back the memory the session allocates (its prepacked weights) with 2 MB transparent huge pages (Linux; a hint
    # the kernel may refuse): fewer TLB misses while a step streams the weights (runtime/huge_pages.py)
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ToolkitError(f"threads must be in 1..{MAX_THREADS} (got {self.threads})")
        if self.prefill_chunk < 1:
            raise ToolkitError(f"prefill_chunk must be >= 1 (got {self.prefill_chunk})")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise ToolkitError(f"accuracy_level must be 0..4 or None (got {self.accuracy_level})")


def _set_accuracy_level(proto: onnx.ModelProto, level: int) -> bool:
    """Rewrite every MatMulNBits' accuracy_level in the weightless graph; True if any changed."""
    changed = False
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level" and attr.i != level:
                attr.i, changed = level, True
    return changed


def add_next_token(proto: onnx.ModelProto, contract: ExportContract) -> ExportContract:
    """Give a graph without a next-token output (older exports, onnxruntime-genai's builds) the exporter's
    ArgMax over its float32 logits, in the weightless graph; returns the contract that names it (unchanged if
    the graph has one already or its logits are not float32)."""
    names = contract.names
    logits = next((o for o in proto.graph.output if o.name == names.logits), None)
    if names.next_token or logits is None or logits.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return contract
    taken = {o for node in proto.graph.node for o in node.output} | {i.name for i in proto.graph.input}
    name = NEXT_TOKEN
    while name in taken:  # a graph may use the name for something else
        name += "_"
    proto.graph.node.append(next_token_node(names.logits, name, "runtime_next_token"))
    dims = logits.type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value or None for d in dims[:2]] if len(dims) == 3 else None  # [B, S]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, shape))
    return dataclasses.replace(contract, names=dataclasses.replace(names, next_token=name))


def drop_next_token(proto: onnx.ModelProto, contract: ExportContract) -> ExportContract:
    """Remove the graph's next-token ArgMax and its output from the weightless graph; returns the contract that no
    longer names it (unchanged if the graph has none, or the output is not an ArgMax that only the caller reads)."""
    name = contract.names.next_token
    producers = [n for n in proto.graph.node if name and name in n.output]
    if (len(producers) != 1 or producers[0].op_type != "ArgMax"
            or any(name in n.input for n in proto.graph.node)):
        return contract
    proto.graph.node.remove(producers[0])
    proto.graph.output.remove(next(o for o in proto.graph.output if o.name == name))
    return dataclasses.replace(contract, names=dataclasses.replace(contract.names, next_token=None))


def _session(folder: Path, model_path: Path, proto: onnx.ModelProto, contract: ExportContract,
             options: BackendOptions, rewritten: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads or physical_cores()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    if options.stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    if options.profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, options.profile_prefix
    if takes_whole_cache(proto):  # TensorScatter warns at every call of the copied path that it copies past
        so.log_severity_level = 3
    level = contract.accuracy_level if options.accuracy_level is None else options.accuracy_level
    if level is not None:  # the standard target's DequantizeLinear->MatMul is fused into MatMulNBits at this level
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    if options.accuracy_level is not None and _set_accuracy_level(proto, options.accuracy_level):
        rewritten = True
    if rewritten:
        # the rewritten graph is loaded from memory; its external data still comes from the folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
        return ort.InferenceSession(proto.SerializeToString(), so, providers=PROVIDERS)
    return ort.InferenceSession(str(model_path), so, providers=PROVIDERS)


class OrtBackend:
    """An export folder's decoder on onnxruntime CPU, fed through IO binding from preallocated buffers."""

    def __init__(self, folder: Path, options: BackendOptions | None = None) -> None:
        folder = Path(folder)
        options = options or BackendOptions()
        self.contract, proto, model_path = open_export(folder)
        level = self.contract.accuracy_level if options.accuracy_level is None else options.accuracy_level
        # MatMulNBits at level 4 and W8A8 linears (MatMulInteger, at any level) round activations to int8, so a
        # last-bit difference upstream can move a rounding
        self.int8_activations = (self.contract.weights != "float32" and level == 4) or quantizes_activations(proto)
        self.can_share_buffer = self.contract.share_buffer and uses_shared_buffer(proto)
        # One token is computed by other kernels than k: MLAS's int8 MatMulNBits (block 64) sums a one-row tile's
        # lanes in another order than a two-row tile's, and GroupQueryAttention's M=1 GEMM is MLAS's M=1 kernel.
        # Those last bits grow through 30 int8-requantized layers to ~0.5 in the logits. With ``paired_decode`` a
        # single row decodes as a pair [token, pad] and score feeds an even count: every call takes two-row tiles and M>1
        # GEMMs, and a token's logits and cache columns do not depend on the call (see _run_pair). Rows decoded
        # together cannot be pairs (GroupQueryAttention takes several new tokens after a past only for a batch of
        # one), so with ``pairs`` a decode of several rows runs each row as its own pair (``_decode_rows``).
        self.pairs = options.paired_decode and self.int8_activations and self.can_share_buffer
        self.whole_cache = takes_whole_cache(proto)  # past is the whole [B, KVH, CAP, D] row, not the used columns
        contract = self.contract
        if not options.next_token:
            self.contract = drop_next_token(proto, contract)
        elif self.can_share_buffer:  # the decode path that reads it binds a shared cache
            self.contract = add_next_token(proto, contract)
        before = anonymous_ranges() if options.huge_pages else None
        self.session = _session(folder, model_path, proto, self.contract, options, self.contract is not contract)
        # bytes of the memory the session added that the kernel moved to 2 MB pages
        self.huge_page_bytes = 0 if before is None else back_with_huge_pages(new_huge_spans(before, anonymous_ranges()))
        del proto
        self.names = self.contract.names
        self._pairs = self._check_names(model_path)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_positions = bool(self.names.position_ids) and self.names.position_ids in inputs
        self.has_next_token = bool(self.names.next_token)  # _check_names made sure the graph has it
        self.dtype = np.dtype(ORT_DTYPES.get(inputs[self._pairs[0][0]].type, np.float32))
        self.prefill_chunk = options.prefill_chunk
        self.cache: KVCache | None = None
        self._decode_bindings: dict[tuple[int, bool], ort.IOBinding] = {}  # (rows, logits bound) -> binding; rows -1: the pair, -2: decode_row
        self._extend_bindings: dict[tuple[int, int], ort.IOBinding] = {}  # (row, tokens) -> binding

    def _check_names(self, model_path: Path) -> list[tuple[str, str]]:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        pairs = self.names.cache_pairs(self.contract.num_layers)
        missing = [n for n in (self.names.input_ids, self.names.attention_mask, *(p for p, _ in pairs))
                   if n not in inputs]
        missing += [n for n in (self.names.logits, self.names.next_token, *(q for _, q in pairs))
                    if n is not None and n not in outputs]
        if missing:
            raise ToolkitError(
                f"{model_path} has no tensor {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which its "
                "export description names: re-export the model (or fix its description)"
            )
        return pairs

    # --- the cache -------------------------------------------------------------------------------
    def allocate(self, slots: int, capacity: int, share_buffer: bool | None = None) -> KVCache:
        """``share_buffer``: bind the cache as past and present (None: whenever the graph can)."""
        shared = self.can_share_buffer if share_buffer is None else share_buffer
        if shared and not self.can_share_buffer:
            raise ToolkitError("this graph cannot write its cache in place (no GroupQueryAttention, or its description "
                               "says past and present are separate): allocate with share_buffer=False")
        c = self.cache
        if c is not None and c.shared == shared and c.slots >= slots and capacity <= c.capacity <= 4 * capacity:
            return c  # reuse: big enough, and not wastefully larger than this budget
        self.reset()
        d = self.contract
        self.cache = KVCache(self._pairs, slots, capacity, d.num_kv_heads, d.head_dim, self.dtype, shared)
        if c is not None:  # a grown cache goes on serving the rows in use: copy what fits
            rows, columns = min(slots, c.slots), min(capacity, c.capacity)
            for new, old in zip(self.cache.buffers, c.buffers, strict=True):
                new[:rows, :, :columns] = old[:rows, :, :columns]
        self._ids = np.zeros((slots, 1), np.int64)  # decode input_ids [SLOTS, 1]
        self._pos = np.zeros((slots, 1), np.int64)
        self._ones = np.ones((1, capacity), np.int64)  # attention mask prefix for one row
        self._one_row_masks: dict[int, ort.OrtValue] = {}  # _one_row_mask's OrtValues over prefixes of _ones
        # decode_row's mask, bound at the cache's full width: ones over row 0's columns (the first _row_mask_ones)
        self._row_mask, self._row_mask_ones = np.zeros((1, capacity), np.int64), 0
        self._columns = np.arange(capacity, dtype=np.int64)
        self._mask_buffer = np.empty(slots * capacity, np.int64)  # a decode step's mask [n, M] is a prefix of it
        self._decode_logits = np.empty((slots, 1, d.vocab_size), np.float32)  # [SLOTS, 1, V]
        self._decode_next = np.empty((slots, 1), np.int64)  # [SLOTS, 1], the graph's argmax
        # a paired one-row decode: [token, pad] at [length, length+1]; the pad's column is overwritten next step
        self._pair_ids, self._pair_pos = np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64)
        self._pair_logits = np.empty((1, 2, d.vocab_size), np.float32)  # [1, 2, V]
        self._pair_next = np.empty((1, 2), np.int64)
        self._prefill_logits = np.empty((1, min(self.prefill_chunk, capacity), d.vocab_size), np.float32)
        # extend: [1, E] ids, positions and next-token ids; its logits are a prefix of _prefill_logits
        width = min(MAX_EXTEND, self.prefill_chunk, capacity)
        self._ext_ids, self._ext_pos = np.zeros((1, width), np.int64), np.zeros((1, width), np.int64)
        self._ext_next = np.empty((1, width), np.int64)
        return self.cache

    def reset(self) -> None:
        self._decode_bindings.clear()
        self._extend_bindings.clear()

    def _require_cache(self) -> KVCache:
        if self.cache is None:
            raise ToolkitError("no KV cache: call allocate(slots, capacity) before prefill, decode or forward")
        return self.cache

    def _bind_shared(self, io: ort.IOBinding, start: int, stop: int) -> None:
        cache = self._require_cache()
        for (past, present), value in zip(self._pairs, cache.ortvalues(start, stop), strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # same buffer: GQA writes new positions in place

    def _mask(self, lengths_after: np.ndarray) -> np.ndarray:
        # Rows are right-padded: row r uses columns [0, lengths_after[r]). GQA reads seqlens_k = sum(mask) - 1.
        total = int(lengths_after.max())
        if len(lengths_after) == 1:
            return self._ones[:, :total]
        return (np.arange(total)[None, :] < lengths_after[:, None]).astype(np.int64)

    # --- the feed loop ---------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None, row: int = 0) -> np.ndarray:
        """One graph call on cache rows [row, row+B) -> logits [B, S, V] (a new array).

        ids, positions: int64 [B, S]; mask: int64 [B, M], the cache columns each row uses after this call. Shared
        cache: M may reach the capacity (zeros after a row's last column). Copied cache: the first M-S columns
        are fed as past and the present that comes back replaces them.
        """
        cache = self._require_cache()
        B, S = ids.shape
        io = self.session.io_binding()
        io.bind_cpu_input(self.names.input_ids, np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input(self.names.attention_mask, np.ascontiguousarray(mask, np.int64))
        if self.has_positions:
            if positions is None:
                raise ToolkitError("this graph reads position_ids: pass positions to forward()")
            io.bind_cpu_input(self.names.position_ids, np.ascontiguousarray(positions, np.int64))  # type: ignore[arg-type]
        io.bind_output(self.names.logits)  # first, so it is output 0
        if cache.shared:
            self._bind_shared(io, row, row + B)
            self.session.run_with_iobinding(io)
            return io.copy_outputs_to_cpu()[0]
        past = cache.capacity if self.whole_cache else mask.shape[1] - S
        for (past_name, present_name), buffer in zip(self._pairs, cache.buffers, strict=True):
            io.bind_cpu_input(past_name, np.ascontiguousarray(buffer[row : row + B, :, :past]))  # [B, KVH, P, D]
            io.bind_output(present_name)
        self.session.run_with_iobinding(io)
        logits, *presents = io.copy_outputs_to_cpu()
        for buffer, present in zip(cache.buffers, presents, strict=True):  # present: [B, KVH, P+S, D]
            if present.shape[2] > cache.capacity:
                raise ToolkitError(f"the step needs {present.shape[2]} cache columns but a row holds {cache.capacity}: "
                                   "allocate a larger cache")
            buffer[row : row + B, :, : present.shape[2]] = present
        return logits

    # --- prefill ---------------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Logits of the last token [V], or of every token [S, V] with ``all_logits`` (perplexity, validation)."""
        cache = self._require_cache()
        if len(token_ids) == 0:
            raise ToolkitError("prefill needs at least one token")
        if start + len(token_ids) > cache.capacity:
            raise ToolkitError(f"{start + len(token_ids)} positions do not fit a cache row of {cache.capacity}")
        chunks = []
        for lo in range(0, len(token_ids), self.prefill_chunk):
            logits = self._prefill_chunk(slot, token_ids[lo : lo + self.prefill_chunk], start + lo)  # [S, V]
            chunks.append(logits.copy() if all_logits else logits)
        return np.concatenate(chunks) if all_logits else chunks[-1][-1]

    def score(self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens [B, k] after each row's past -> logits [B, k, V] (a new array); writes the k columns per row.

        One call per row (``extend``): GroupQueryAttention takes several new tokens after a past only for a batch
        of one.
        """
        if tokens.ndim != 2 or len(rows) != len(tokens) or len(lengths) != len(tokens):
            raise ToolkitError(f"score takes tokens [B, k] and B rows and lengths (got tokens {tokens.shape}, "
                               f"{len(rows)} rows, {len(lengths)} lengths)")
        return np.stack([self.extend(int(r), tokens[b], int(n))[1].copy()  # a view, overwritten by the next row's
                         for b, (r, n) in enumerate(zip(rows, lengths, strict=True))])

    def extend(self, slot: int, tokens: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [S] at positions start..start+S-1 of row ``slot`` -> (argmax [S], logits [S, V]), views of
        buffers allocated once, valid until the next call. Up to MAX_EXTEND tokens on a shared cache go through a
        binding kept per (row, S) that writes the logits in place (the argmax: the graph's next-token output where
        it has one, else numpy's of the bound logits; a greedy caller reads nothing else); longer calls, or other
        graphs, prefill. With ``pairs`` an odd S gets a pad token where the row has room (its
        column is past the row's length), so a verify runs the kernels of a paired decode.
        """
        cache = self._require_cache()
        S = len(tokens)
        if self.pairs and S % 2 and start + S < cache.capacity:
            tokens = np.append(np.asarray(tokens, np.int64), PAD_TOKEN)
        n = len(tokens)
        if not cache.shared or n > self._ext_ids.shape[1]:
            logits = self.prefill(slot, np.asarray(tokens, np.int64), start, all_logits=True)[:S]  # [S, V]
            return logits.argmax(axis=1), logits
        if start + n > cache.capacity:
            raise ToolkitError(f"{start + n} positions do not fit a cache row of {cache.capacity}")
        io = self._extend_binding(slot, n)
        self._ext_ids[0, :n] = tokens
        self._ext_pos[0, :n] = np.arange(start, start + n)
        io.bind_ortvalue_input(self.names.attention_mask, self._one_row_mask(start + n))
        self.session.run_with_iobinding(io)
        logits = self._prefill_logits[0, :S]  # [S, V]
        return (self._ext_next[0, :S] if self.has_next_token else logits.argmax(axis=1)), logits

    def _extend_binding(self, slot: int, n: int) -> ort.IOBinding:
        io = self._extend_bindings.get((slot, n))
        if io is None:  # inputs and outputs are prefixes of buffers allocated once: later calls write them in place
            io = self.session.io_binding()
            io.bind_ortvalue_input(self.names.input_ids, ort.OrtValue.ortvalue_from_numpy(self._ext_ids[:, :n]))
            if self.has_positions:
                io.bind_ortvalue_input(self.names.position_ids, ort.OrtValue.ortvalue_from_numpy(self._ext_pos[:, :n]))  # type: ignore[arg-type]
            io.bind_ortvalue_output(self.names.logits, ort.OrtValue.ortvalue_from_numpy(self._prefill_logits[:, :n]))
            if self.has_next_token:
                io.bind_ortvalue_output(self.names.next_token, ort.OrtValue.ortvalue_from_numpy(self._ext_next[:, :n]))  # type: ignore[arg-type]
            self._bind_shared(io, slot, slot + 1)
            self._extend_bindings[slot, n] = io
        return io

    def _prefill_chunk(self, slot: int, chunk: np.ndarray, start: int) -> np.ndarray:
        S = len(chunk)
        ids = np.ascontiguousarray(chunk, np.int64).reshape(1, S)
        positions = np.arange(start, start + S, dtype=np.int64).reshape(1, S)
        mask = self._mask(np.array([start + S]))
        if not self._require_cache().shared:
            return self.forward(ids, mask, positions, row=slot)[0]
        io = self.session.io_binding()
        io.bind_cpu_input(self.names.input_ids, ids)
        io.bind_cpu_input(self.names.attention_mask, mask)
        if self.has_positions:
            io.bind_cpu_input(self.names.position_ids, positions)  # type: ignore[arg-type]
        out = self._prefill_logits[:, :S]  # [1, S, V], a contiguous prefix
        io.bind_ortvalue_output(self.names.logits, ort.OrtValue.ortvalue_from_numpy(out))
        self._bind_shared(io, slot, slot + 1)
        self.session.run_with_iobinding(io)
        return out[0]

    # --- decode ----------------------------------------------------------------------------------
    def _step_binding(self, key: int, logits: bool, ids: np.ndarray, positions: np.ndarray, logits_out: np.ndarray,
                      next_out: np.ndarray, rows: int, mask: np.ndarray | None = None) -> ort.IOBinding:
        """A decode call's binding, made once per ``key`` (batch width; -1 the pair, -2 decode_row) and output set:
        inputs and outputs are buffers allocated once, which later steps write and read in place; ``mask`` too
        where it is given (otherwise each step binds its own)."""
        io = self._decode_bindings.get((key, logits))
        if io is None:
            io = self.session.io_binding()
            io.bind_ortvalue_input(self.names.input_ids, ort.OrtValue.ortvalue_from_numpy(ids))
            if self.has_positions:
                io.bind_ortvalue_input(self.names.position_ids, ort.OrtValue.ortvalue_from_numpy(positions))  # type: ignore[arg-type]
            if logits:
                io.bind_ortvalue_output(self.names.logits, ort.OrtValue.ortvalue_from_numpy(logits_out))
            if self.has_next_token:
                io.bind_ortvalue_output(self.names.next_token, ort.OrtValue.ortvalue_from_numpy(next_out))  # type: ignore[arg-type]
            self._bind_shared(io, 0, rows)
            if mask is not None:
                io.bind_ortvalue_input(self.names.attention_mask, ort.OrtValue.ortvalue_from_numpy(mask))
            self._decode_bindings[key, logits] = io
        return io

    def _decode_binding(self, n: int, logits: bool) -> ort.IOBinding:
        """Rows 0..n-1, one token each; a step rebinds the mask."""
        return self._step_binding(n, logits, self._ids[:n], self._pos[:n], self._decode_logits[:n], self._decode_next[:n], n)

    def _one_row_mask(self, total: int) -> ort.OrtValue:
        """One row's mask [1, total]: an OrtValue over a prefix of the ones row, made once per length, so that a
        step binds it without building a numpy view and an OrtValue (Python calls between two steps run on caches
        the step has flushed: README, "the host loop between two steps")."""
        mask = self._one_row_masks.get(total)
        if mask is None:
            mask = self._one_row_masks[total] = ort.OrtValue.ortvalue_from_numpy(self._ones[:, :total])
        return mask

    def _decode_mask(self, lengths_after: np.ndarray) -> ort.OrtValue:
        """The step's mask [n, M] written into the preallocated buffer (M grows by one a step: a new view, no
        allocation); one row binds ``_one_row_mask``."""
        if len(lengths_after) == 1:
            return self._one_row_mask(int(lengths_after[0]))
        total = int(lengths_after.max())
        mask = self._mask_buffer[: len(lengths_after) * total].reshape(len(lengths_after), total)
        np.less(self._columns[:total], lengths_after[:, None], out=mask, casting="unsafe")
        return ort.OrtValue.ortvalue_from_numpy(mask)

    def _paired(self, lengths: np.ndarray) -> bool:
        """Decode this step as a pair: one row, ``pairs`` on, and room for the pad column."""
        return self.pairs and len(lengths) == 1 and int(lengths[0]) + 2 <= self._require_cache().capacity

    def _pair_binding(self, logits: bool) -> ort.IOBinding:
        return self._step_binding(-1, logits, self._pair_ids, self._pair_pos, self._pair_logits, self._pair_next, 1)

    def _run_pair(self, token: int, length: int, logits: bool) -> None:
        """Row 0's token at ``length`` and a pad after it, in one call (the rows of a ``score``'s tiles)."""
        io = self._pair_binding(logits)
        self._pair_ids[0] = token, PAD_TOKEN
        self._pair_pos[0] = length, length + 1
        io.bind_ortvalue_input(self.names.attention_mask, self._decode_mask(np.array([length + 2])))
        self.session.run_with_iobinding(io)

    def _rowwise(self, lengths: np.ndarray) -> bool:
        """Decode this step row by row, each as a pair: several rows, ``pairs`` on, a shared cache."""
        return self.pairs and len(lengths) > 1 and self._require_cache().shared

    def _decode_rows(self, tokens: np.ndarray, lengths: np.ndarray, logits: bool, live: np.ndarray | None) -> None:
        """Each live row alone as a pair (``extend``: the kernels of a one-row decode and of a verify), into the
        decode buffers a batched call fills: a token of a batch is computed as it is alone, at one call per row."""
        for row, (token, length) in enumerate(zip(tokens.tolist(), lengths.tolist(), strict=True)):
            if live is not None and not live[row]:
                continue  # a free row or one mid-prefill: a batched call computes a throwaway token there
            ids, row_logits = self.extend(row, np.array([token], np.int64), length)
            self._decode_next[row, 0] = ids[0]
            if logits:
                self._decode_logits[row, 0] = row_logits[0]

    def _run_decode(self, tokens: np.ndarray, lengths: np.ndarray, logits: bool) -> None:
        n = len(tokens)
        io = self._decode_binding(n, logits)
        self._ids[:n, 0] = tokens
        if self.has_positions:
            self._pos[:n, 0] = lengths
        io.bind_ortvalue_input(self.names.attention_mask, self._decode_mask(lengths + 1))
        self.session.run_with_iobinding(io)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, rowwise: bool = True) -> np.ndarray:
        if not self._require_cache().shared:
            return self._decode_at(0, tokens, lengths)
        if self._paired(lengths):
            self._run_pair(int(tokens[0]), int(lengths[0]), logits=True)
            return self._pair_logits[:, 0]  # [1, V], valid until the next call
        if rowwise and self._rowwise(lengths):
            self._decode_rows(tokens, lengths, logits=True, live=None)
            return self._decode_logits[: len(tokens), 0]
        self._run_decode(tokens, lengths, logits=True)
        return self._decode_logits[: len(tokens), 0]  # [n, V], valid until the next call

    def decode_next(self, tokens: np.ndarray, lengths: np.ndarray, with_logits: bool, live: np.ndarray | None = None,
                    rowwise: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The graph's next-token output where it has one (a shared cache); otherwise the logits' argmax here."""
        if rowwise and self._rowwise(lengths):
            self._decode_rows(tokens, lengths, logits=with_logits, live=live)
            n = len(tokens)
            return self._decode_next[:n, 0], self._decode_logits[:n, 0] if with_logits else None
        if not (self.has_next_token and self._require_cache().shared):
            logits = self.decode(tokens, lengths, rowwise)
            return logits.argmax(axis=1), logits if with_logits else None
        if self._paired(lengths):
            self._run_pair(int(tokens[0]), int(lengths[0]), logits=with_logits)
            return self._pair_next[:, 0], self._pair_logits[:, 0] if with_logits else None
        n = len(tokens)
        self._run_decode(tokens, lengths, logits=with_logits)
        return self._decode_next[:n, 0], self._decode_logits[:n, 0] if with_logits else None  # valid until next call

    def decode_row(self, token: int, length: int, with_logits: bool) -> tuple[int, np.ndarray | None]:
        """``decode_next`` for row 0 alone, with the same bits and fewer Python calls: between two steps each numpy
        call or binding runs on caches the step has flushed (``benchmarks/profile_decode.py --gaps``). The
        binding holds the mask at the cache's full width (ones over the row's columns, zeros after:
        GroupQueryAttention reads the row's length from it, as it does a batch's shorter rows), so a step writes
        three scalars into bound buffers and rebinds nothing. Paired or copied caches go through ``decode_next``."""
        cache = self._require_cache()
        if self.pairs or not cache.shared:
            ids, logits = self.decode_next(np.array([token], np.int64), np.array([length], np.int64), with_logits)
            return int(ids[0]), None if logits is None else logits[0]
        total = length + 1
        if total > cache.capacity:
            raise ToolkitError(f"{total} positions do not fit a cache row of {cache.capacity}")
        bind_logits = with_logits or not self.has_next_token
        io = self._step_binding(-2, bind_logits, self._ids[:1], self._pos[:1], self._decode_logits[:1],
                                self._decode_next[:1], 1, mask=self._row_mask)
        self._ids[0, 0] = token
        if self.has_positions:
            self._pos[0, 0] = length
        ones = self._row_mask_ones
        if total == ones + 1:  # the usual step: one more column
            self._row_mask[0, ones] = 1
        elif total != ones:  # another sequence in the row
            self._row_mask[0, :total], self._row_mask[0, total:] = 1, 0
        self._row_mask_ones = total
        self.session.run_with_iobinding(io)
        token = int(self._decode_next[0, 0]) if self.has_next_token else int(self._decode_logits[0, 0].argmax())
        return token, self._decode_logits[0, 0] if with_logits else None

    def _decode_at(self, row: int, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token for each of rows [row, row+n) through ``forward`` -> logits [n, V]."""
        ids, positions = tokens.reshape(-1, 1).astype(np.int64), lengths.reshape(-1, 1).astype(np.int64)
        if self._require_cache().shared:
            return self.forward(ids, self._mask(lengths + 1), positions, row)[:, 0]
        if self.can_share_buffer and not self.whole_cache and len(set(lengths.tolist())) > 1:
            raise ToolkitError("GroupQueryAttention rotates keys by cache column: rows of different lengths decode "
                               "together only with a shared cache (allocate with share_buffer=True)")
        # The graph appends the new column at P = the longest row; a shorter row sees its own columns, a masked
        # gap and the new column, at its own position_ids. The column is then moved to the row's own position.
        P = int(lengths.max())
        mask = np.concatenate([np.arange(P)[None, :] < lengths[:, None], np.ones((len(ids), 1), bool)], axis=1)
        logits = self.forward(ids, mask.astype(np.int64), positions, row)[:, 0]
        for buffer in self._require_cache().buffers:
            for r, length in enumerate(lengths.tolist()):
                buffer[row + r, :, length] = buffer[row + r, :, P]
        return logits

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
        alone = self._decode_at(1, tokens[1:], lengths[1:])[0]
        self.cache = None  # the probe's cache is not a request's cache
        self.reset()
        # Judged relative to the logits: int8-activation kernels (accuracy_level 4) may take another path for two
        # rows than for one (a small relative RMS), while a row that sees the stale column is off by a relative
        # RMS of order one.
        rel = np.sqrt(np.mean((together - alone) ** 2) / max(float(np.mean(alone**2)), 1e-30))
        return bool(rel < 0.1)
