"""KV cache: one buffer per layer and kind, allocated at the first request and only ever grown, plus slot/block
accounting.

Layout (what GroupQueryAttention reads and writes in shared-buffer mode):
    # k, v: [SLOTS, KVH, CAP, D]; row r holds sequence r's keys at positions 0..len_r-1
A shared cache binds the same buffer as a layer's past input and present output; GQA writes the new
positions in place (seqlens come from the attention mask), so nothing is copied or reallocated
per step. Graphs without GQA keep the same layout; the backend copies their present back into it.

Paging, honestly: GQA needs each sequence contiguous in its row, so memory cannot be scattered
in pages the way vLLM's PagedAttention kernel does. What we keep from paging is the accounting:
each row is cut into blocks of ``block_size`` tokens, a sequence reserves the blocks its budget
(prompt + max_new_tokens) needs when it is admitted, and a finished sequence returns its blocks
and its row to the pool. Admission refuses, before any compute, a request whose budget exceeds a
row; a request that fits waits for a free row. A paged kernel would swap the row for a block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from toolkit.errors import ToolkitError


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class BlockPool:
    """Rows (slots) of ``capacity`` tokens cut into blocks; tracks which sequence holds what."""

    slots: int
    capacity: int
    block_size: int = 16
    _free: list[int] = field(default_factory=list)
    _reserved: dict[int, int] = field(default_factory=dict)  # slot -> blocks reserved

    def __post_init__(self) -> None:
        if self.capacity % self.block_size:
            raise ToolkitError(f"cache capacity {self.capacity} is not a multiple of block size {self.block_size}")
        self._free = list(range(self.slots - 1, -1, -1))  # pop() hands out the lowest row first

    @property
    def blocks_total(self) -> int:
        return self.slots * self.capacity // self.block_size

    @property
    def blocks_in_use(self) -> int:
        return sum(self._reserved.values())

    def check_fits(self, budget: int) -> None:
        """Refuse at admission a request that could never fit, so nothing fails halfway."""
        if budget > self.capacity:
            raise ToolkitError(
                f"request needs {budget} cache positions (prompt + max_new_tokens) but a cache row holds "
                f"{self.capacity}: shorten the prompt, lower max_new_tokens or raise the cache capacity"
            )

    def has_free_slot(self) -> bool:
        return bool(self._free)

    def admit(self, budget: int) -> int:
        self.check_fits(budget)
        if not self._free:
            raise ToolkitError("no free cache row: wait for a sequence to finish (the scheduler does this)")
        slot = self._free.pop()
        self._reserved[slot] = blocks_for(budget, self.block_size)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._reserved:
            raise ToolkitError(f"cache row {slot} is not in use; releasing it twice is a runtime bug")
        del self._reserved[slot]
        self._free.append(slot)
        self._free.sort(reverse=True)

    def highest_in_use(self) -> int:
        return max(self._reserved, default=-1)


class KVCache:
    """Preallocated key/value buffers and the OrtValues that alias them (made once per row range)."""

    def __init__(self, names: list[tuple[str, str]], slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: np.dtype, shared: bool = True) -> None:
        self.names = names  # (past input name, present output name) per buffer
        self.slots, self.capacity = slots, capacity
        self.shared = shared  # bound as both past and present (else present is copied back)
        # one buffer per (layer, key|value): [SLOTS, KVH, CAP, D]; zeroed so no stale data is ever read
        self.buffers = [np.zeros((slots, kv_heads, capacity, head_dim), dtype) for _ in names]
        self._views: dict[tuple[int, int], list[ort.OrtValue]] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def ortvalues(self, start: int, stop: int) -> list[ort.OrtValue]:
        """OrtValues over rows [start, stop): a contiguous slice of each buffer, no copy."""
        key = (start, stop)
        if key not in self._views:
            self._views[key] = [ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]
        return self._views[key]

    def data_pointers(self) -> list[int]:
        return [b.ctypes.data for b in self.buffers]
