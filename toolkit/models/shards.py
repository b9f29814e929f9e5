"""Sharded safetensors on disk, one tensor at a time in both directions.

Reading: ``ShardedWeights`` maps tensor names to shard files (``model.safetensors.index.json`` as the hub
writes it, or a single ``model.safetensors``) and opens the file for each read, so only the tensor asked
for is ever resident. Writing: ``ShardWriter`` streams each tensor's bytes to disk as it is added, starts a new
shard whenever the next tensor would overflow ``max_shard_bytes``, then writes the index; ``write_planned_shard`` streams a shard whose
shapes are known in advance (the header first, then each tensor's bytes), so not even one shard is buffered.

Every read is checked, for the streaming and the in-memory paths alike: ``check_stored`` compares the headers
with the model's tensors (names, shapes, dtypes) before anything is read, and ``get``/``rows`` refuse NaN or Inf
values by tensor name. Float64 tensors are read as float32 (nothing computes or writes float64).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from toolkit.errors import ToolkitError
from toolkit.paths import names_a_file_in

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
    torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # fp8 weights are codes: stored exactly as written
}


FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
READ_AS = {torch.float64: torch.float32}  # float64 checkpoints load in float32, as transformers loads them


def listed(names: Iterable[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def non_finite(where: Path, names: Iterable[str]) -> ToolkitError:
    bad = list(names)
    return ToolkitError(f"{where}: non-finite (NaN or Inf) values in {len(bad)} tensor(s): {listed(bad)}; "
                        "the checkpoint is corrupt, re-create it")


def checked(where: Path, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as read from the checkpoint, refused when it holds NaN or Inf; float64 comes back as float32."""
    if not finite(t):
        raise non_finite(where, [name])
    return t.to(READ_AS.get(t.dtype, t.dtype))


def finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (integer tensors always; fp8, which has no ``isfinite``, through float16)."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.to(torch.float16) if t.element_size() == 1 else t).all())


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWeights:
    """Tensor names -> shard files of a checkpoint folder; ``get`` reads one tensor, ``meta`` its shape and dtype."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._headers: dict[str, tuple[list[int], str]] | None = None
        index = self.folder / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise ToolkitError(f"{index} is not a safetensors index ({exc}); re-create the checkpoint") from None
            if not isinstance(self.weight_map, dict):
                raise ToolkitError(f"{index}: 'weight_map' is not a mapping; re-create the checkpoint")
            outside = sorted({str(f) for f in self.weight_map.values() if not names_a_file_in(self.folder, f)})
            if outside:
                raise ToolkitError(f"{index} names {listed(outside)}, not a file of {self.folder} (an index names "
                                   "only its own shards); re-create the checkpoint")
        elif (self.folder / SINGLE).is_file():
            with self._open(SINGLE) as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise ToolkitError(f"{self.folder} has neither {INDEX} nor {SINGLE}: not a safetensors checkpoint")

    def _open(self, file: str):  # type: ignore[no-untyped-def]
        path = self.folder / file
        if not path.is_file():
            raise ToolkitError(f"{path} is missing (named by {INDEX}); re-create or re-download the checkpoint")
        try:
            return safe_open(str(path), "pt")
        except SafetensorError as exc:
            raise ToolkitError(f"{path} is truncated or corrupt ({exc}); re-create it") from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype; the file is mapped only while it is copied out."""
        if name not in self.weight_map:
            raise ToolkitError(f"{self.folder}: tensor '{name}' is not in the checkpoint")
        with self._open(self.weight_map[name]) as f:
            return checked(self.folder, name, f.get_tensor(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (only those bytes are read), checked as ``get`` checks."""
        with self._open(self.weight_map[name]) as f:
            return checked(self.folder, name, f.get_slice(name)[start:stop])

    def meta(self, name: str) -> tuple[list[int], str]:
        with self._open(self.weight_map[name]) as f:
            sl = f.get_slice(name)
            return list(sl.get_shape()), str(sl.get_dtype())

    def headers(self) -> dict[str, tuple[list[int], str]]:
        """Every tensor's shape and stored dtype, from the shard headers alone (no tensor data is read)."""
        if self._headers is not None:
            return self._headers
        out: dict[str, tuple[list[int], str]] = {}
        for file in sorted(set(self.weight_map.values())):
            with self._open(file) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if self.weight_map.get(name) == file:
                        sl = f.get_slice(name)
                        out[name] = (list(sl.get_shape()), str(sl.get_dtype()))
        self._headers = out
        return out

    def check_stored(self, expected: dict[str, torch.Tensor], optional: Iterable[str] = (),
                     where: Path | None = None) -> None:
        """Refuse, before any tensor is read, a checkpoint whose tensors do not fit the model built from its
        config: ``expected`` maps names to the model's tensors (on meta is enough); ``optional`` may be absent
        (a tied head stored once). A float tensor must be stored as F32, F16, BF16 or F64; others exactly."""
        where = where or self.folder
        stored = self.headers()
        listed_in_index = set(self.weight_map)
        may_lack = set(optional)
        missing = [n for n in expected if n not in listed_in_index and n not in may_lack]
        unexpected = [n for n in listed_in_index if n not in expected]
        absent = [n for n in listed_in_index if n not in stored]  # the index names a tensor its shard lacks
        shapes, dtypes = [], []
        for name, (shape, dtype) in stored.items():
            want = expected.get(name)
            if want is None:
                continue
            if shape != list(want.shape):
                shapes.append(f"{name} {shape} (expected {list(want.shape)})")
            codes = not want.is_floating_point() or want.dtype == torch.float8_e4m3fn
            fits = dtype == DTYPE_NAMES.get(want.dtype) if codes else dtype in FLOAT_DTYPES
            if not fits:
                dtypes.append(f"{name} {dtype}")
        if absent:
            raise ToolkitError(f"{where}: {listed(absent)} named by {INDEX} but not in its shard; "
                               "re-create or re-download the checkpoint")
        wrong = [f"{what} {listed(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names]
        if wrong:
            raise ToolkitError(f"{where} does not match its config.json: {'; '.join(wrong)}; "
                               "re-create the checkpoint (missing tensors would run as random weights)")
        if dtypes:
            raise ToolkitError(f"{where}: unsupported dtype {listed(dtypes)}; float weights must be stored as "
                               "float32, float16, bfloat16 or float64 (packed tensors as written by the toolkit)")

    def files(self) -> list[Path]:
        return [self.folder / f for f in sorted(set(self.weight_map.values()))]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())


class ShardWriter:
    """Write tensors in order into ``model-0000x-of-0000y.safetensors`` shards plus the index.

    Each tensor's bytes go to disk as soon as it is added (a shard's data file; the header is written in
    front of it when the shard closes), so the writer holds no tensor: a shard is opened whenever the
    next tensor would overflow ``max_shard_bytes``. Shards get their final names once the count is known.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {}
        self._header: dict[str, dict[str, object]] = {}
        self._data: BinaryIO | None = None
        self._offset = 0
        self._shards: list[list[str]] = []
        self.bytes_written = 0

    def _data_path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.data.tmp"

    def _begin(self, nbytes: int) -> BinaryIO:
        if self._data is not None and self._offset and self._offset + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(len(self._shards)), "wb")  # noqa: SIM115 (closed in _flush)
        return self._data

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_chunks(name, list(tensor.shape), tensor.dtype, [tensor])

    def add_chunks(self, name: str, shape: list[int], dtype: torch.dtype, chunks: Iterable[torch.Tensor]) -> None:
        """Add tensor ``name`` given as consecutive row chunks (written as they come)."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        data = self._begin(nbytes)
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"{name}: chunk of {chunk.dtype}, declared {dtype}")
            data.write(chunk.detach().cpu().contiguous().view(torch.uint8).numpy())  # no bytes copy
            written += tensor_bytes(chunk)
        if written != nbytes:
            raise ValueError(f"{name}: {written} bytes written, shape {shape} needs {nbytes}")
        self._header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape,
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    def _flush(self) -> None:
        assert self._data is not None
        self._data.close()
        i = len(self._shards)
        raw = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to an 8-byte boundary
        path = self.folder / f"shard-{i:05d}.tmp"
        with open(path, "wb") as out, open(self._data_path(i), "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self._data_path(i).unlink()
        self.bytes_written += path.stat().st_size
        self._shards.append(list(self._header))
        self._header, self._data, self._offset = {}, None, 0

    def close(self) -> dict[str, str]:
        """Write the last shard and the index; returns the weight map."""
        if self._data is None and not self._shards:
            self._begin(0)
        if self._data is not None:
            self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = shard_name(i, count)
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.bytes_written, **self.metadata}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        return weight_map


def write_planned_shard(path: Path, plan: Iterable[tuple[str, list[int], torch.dtype]],
                        produce: Callable[[str], Iterable[torch.Tensor]], metadata: dict[str, str]) -> int:
    """Write one safetensors file whose tensors ``(name, shape, dtype)`` are known in advance.

    The header goes first; ``produce(name)`` then yields the tensor in contiguous row chunks that are
    written and dropped, so resident memory is one chunk. Returns the bytes written.
    """
    plan = list(plan)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in plan:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to an 8-byte boundary
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in plan:
            written = 0
            for chunk in produce(name):
                if chunk.dtype != dtype:
                    raise ValueError(f"{name}: produced {chunk.dtype}, planned {dtype}")
                f.write(chunk.contiguous().view(torch.uint8).numpy())
                written += tensor_bytes(chunk)
            expected = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if written != expected:
                raise ValueError(f"{name}: produced {written} bytes, planned {expected}")
    return 8 + len(raw) + offset


def load_single(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s single safetensors file; a truncated or corrupt file is one line."""
    try:
        return load_file(str(Path(folder) / SINGLE))
    except (SafetensorError, OSError) as exc:
        raise ToolkitError(f"{folder}/{SINGLE}: unreadable (truncated or corrupt): {exc}") from None
