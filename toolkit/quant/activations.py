"""A bounded buffer of calibration activations: batches in memory up to a budget, the rest on disk.

Layer-wise calibration carries the hidden states ``[N, L, H]`` from one decoder layer to the next.
``ActivationBuffer`` holds them as batches ``[B, L, H]``; once ``budget_bytes`` is reached, further
batches are written to files in ``spill_dir`` and read back when used (safetensors: exact bytes, so a
spilled run computes exactly what an in-memory one does). A full disk names the spill folder; ``close`` (also
on errors: the streaming passes close the buffer in ``finally``) removes every file and folder it made.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit.errors import ToolkitError
from toolkit.paths import disk_full


class ActivationBuffer:
    def __init__(self, budget_bytes: int | None = None, spill_dir: Path | None = None) -> None:
        self.budget_bytes = budget_bytes  # None: everything in memory
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self._made: list[Path] = []  # spill folders that did not exist before, innermost first
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
            try:
                if self._spill_root is not None:  # the folders made here are removed again by close()
                    missing = [p for p in (self._spill_root, *self._spill_root.parents) if not p.exists()]
                    self._spill_root.mkdir(parents=True, exist_ok=True)
                    self._made = missing
                self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self._spill_root))
            except OSError as exc:
                raise self._error(exc) from None
        return self._dir / f"{i:06d}.safetensors"

    def _error(self, exc: BaseException) -> ToolkitError:
        where = self._dir or self._spill_root or Path(tempfile.gettempdir())
        if disk_full(exc):
            return ToolkitError(f"the disk is full while spilling calibration activations to {where}; free space "
                                "there, set memory.spill_dir to a larger disk, or raise memory.activations_mb")
        return ToolkitError(f"cannot spill calibration activations to {where} ({exc}); "
                            "set memory.spill_dir to a writable folder, or raise memory.activations_mb")

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
        path = self._spill_path(i)
        try:
            save_file({"hidden": t.detach().to("cpu").contiguous()}, str(path))
        except (OSError, SafetensorError) as exc:
            path.unlink(missing_ok=True)
            raise self._error(exc) from None

    def get(self, i: int) -> torch.Tensor:
        if i in self._memory:
            return self._memory[i]
        return load_file(str(self._spill_path(i)))["hidden"]

    def close(self) -> None:
        """Drop every batch: the ``activations-*`` folder and the spill folders this buffer made (when empty)."""
        self._memory.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        for folder in self._made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made = []
