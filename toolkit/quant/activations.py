"""A bounded buffer of calibration activations: batches in memory up to a budget, the rest on disk.

Layer-wise calibration carries the hidden states ``[N, L, H]`` from one decoder layer to the next.
``ActivationBuffer`` holds them as batches ``[B, L, H]``; once ``budget_bytes`` is reached, further
batches are written to files in ``spill_dir`` and read back when used (safetensors: exact bytes, so a
spilled run computes exactly what an in-memory one does).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ActivationBuffer:
    def __init__(self, budget_bytes: int | None = None, spill_dir: Path | None = None) -> None:
        self.budget_bytes = budget_bytes  # None: everything in memory
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self._memory: dict[int, torch.Tensor] = {}
        self._spilled: set[int] = set()
        self._count = 0
        self.resident_bytes = 0
        self.spilled_bytes = 0

    @classmethod
    def of(cls, batches: Iterable[torch.Tensor]) -> ActivationBuffer:
        """An in-memory buffer holding ``batches``."""
        buf = cls()
        for b in batches:
            buf.append(b)
        return buf

    def __len__(self) -> int:
        return self._count

    def _spill_path(self, i: int) -> Path:
        if self._dir is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self._spill_root))
        return self._dir / f"{i:06d}.safetensors"

    def _fits(self, nbytes: int) -> bool:
        return self.budget_bytes is None or self.resident_bytes + nbytes <= self.budget_bytes

    def append(self, t: torch.Tensor) -> None:
        self._count += 1
        self.put(self._count - 1, t)

    def put(self, i: int, t: torch.Tensor) -> None:
        """Store batch ``i`` (replacing it): kept in memory if it was there or still fits, else spilled."""
        nbytes = t.numel() * t.element_size()
        if i in self._memory:
            self.resident_bytes -= self._memory[i].numel() * self._memory[i].element_size()
        if i in self._memory or (i not in self._spilled and self._fits(nbytes)):
            self._memory[i] = t.detach()
            self.resident_bytes += nbytes
            return
        if i not in self._spilled:
            self.spilled_bytes += nbytes
        self._spilled.add(i)
        save_file({"hidden": t.detach().to("cpu").contiguous()}, str(self._spill_path(i)))

    def get(self, i: int) -> torch.Tensor:
        if i in self._memory:
            return self._memory[i]
        return load_file(str(self._spill_path(i)))["hidden"]

    def close(self) -> None:
        self._memory.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
