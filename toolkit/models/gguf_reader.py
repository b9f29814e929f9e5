"""A GGUF file read whole or refused in one line: every count of its header against the bytes it holds, the keys
and tensors a model needs, each tensor's bytes against its shape, before ``gguf``'s reader (or transformers, which
builds the model from the header's sizes) trusts any of it. The intake (``sources``) checks a GGUF here before it
converts one; the GGUF exporter reads its own file back through it.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from toolkit.errors import ToolkitError

REQUIRED_KEYS = ("general.architecture", "{arch}.block_count", "{arch}.embedding_length", "{arch}.attention.head_count",
                 "tokenizer.ggml.model", "tokenizer.ggml.tokens")


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


# bytes of the smallest item each count declares (GGUF v3): a kv pair (key length, empty key, type, a uint8),
# a tensor info (name length, empty name, n_dims, type, offset), an array item of each type (a string: its length)
MIN_KV_BYTES, MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
ITEM_BYTES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
              gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
              gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
              gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8, gguf.GGUFValueType.STRING: 8,
              gguf.GGUFValueType.ARRAY: 12}


class _Counts:
    """Walks a GGUF's header checking every declared count against the bytes left, before gguf's reader (which
    loops over a lying array length without end: reads past the end are empty, not errors) builds anything."""

    def __init__(self, data: bytes | mmap.mmap, path: Path) -> None:
        self.data, self.path, self.offs = data, path, 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.offs + size > len(self.data):
            raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): the header ends early")
        (value,) = struct.unpack_from(fmt, self.data, self.offs)
        self.offs += size
        return int(value)

    def count(self, what: str, item_bytes: int) -> int:
        n = self.take("<Q")
        if n * item_bytes > len(self.data) - self.offs:
            raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): it declares {n} {what}, "
                               f"more than its {len(self.data)} bytes can hold")
        return n

    def skip(self, n: int) -> None:
        if self.offs + n > len(self.data):
            raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): the header ends early")
        self.offs += n

    def value(self, vtype: int) -> None:
        if vtype == gguf.GGUFValueType.STRING:
            self.skip(self.count("string bytes", 1))
        elif vtype == gguf.GGUFValueType.ARRAY:
            item = self.take("<I")
            if item not in ITEM_BYTES:
                raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): unknown value type {item}")
            n = self.count("array items", ITEM_BYTES[gguf.GGUFValueType(item)])
            if item in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
                for _ in range(n):
                    self.value(item)
            else:
                self.skip(n * ITEM_BYTES[gguf.GGUFValueType(item)])
        elif vtype in ITEM_BYTES:
            self.skip(ITEM_BYTES[gguf.GGUFValueType(vtype)])
        else:
            raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): unknown value type {vtype}")

    def check(self) -> None:
        """Magic, version, then every count: tensors, keys, string and array lengths, dimensions."""
        if self.take("<I") != gguf.GGUF_MAGIC:
            raise ToolkitError(f"{self.path}: not a readable GGUF (truncated or corrupt): no GGUF magic")
        self.take("<I")
        tensors, keys = self.count("tensors", MIN_TENSOR_BYTES), self.count("metadata keys", MIN_KV_BYTES)
        for _ in range(keys):
            self.value(gguf.GGUFValueType.STRING)
            self.value(self.take("<I"))
        for _ in range(tensors):
            self.value(gguf.GGUFValueType.STRING)
            dims = self.take("<I")
            self.skip(8 * dims + 4 + 8)


def read(path: Path) -> gguf.GGUFReader:
    """Open a GGUF and check it is whole: the header parses, the required keys exist, every layer has its
    tensors and every tensor's bytes fit its shape. Raises ToolkitError with one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"GGUF file not found: {path}")
    if path.stat().st_size == 0:
        raise ToolkitError(f"{path}: not a readable GGUF (truncated or corrupt): the file is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _Counts(data, path).check()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError) as exc:
        raise ToolkitError(f"{path}: not a readable GGUF (truncated or corrupt): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    arch = str(_value(reader, "general.architecture")) if "general.architecture" in reader.fields else "?"
    missing = [k.format(arch=arch) for k in REQUIRED_KEYS if k.format(arch=arch) not in reader.fields]
    if missing:
        raise ToolkitError(f"{path}: incomplete GGUF: metadata key '{missing[0]}' is missing")
    names = {t.name for t in reader.tensors}
    blocks = int(_value(reader, f"{arch}.block_count"))
    layer = sorted(n[len("blk.0."):] for n in names if n.startswith("blk.0."))  # every layer holds what layer 0 does
    fixed = ["token_embd.weight", "output_norm.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"]
    per_layer = (f"blk.{i}.{n}" for i in range(blocks) for n in layer)  # lazy: a lying count stops at its first gap
    absent = next((n for n in itertools.chain(fixed, per_layer) if n not in names), None)
    if absent is not None or blocks < 1:
        raise ToolkitError(f"{path}: inconsistent GGUF: {arch}.block_count is {blocks} but tensor "
                           f"'{absent or 'blk.0.*'}' is missing")
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if int(t.n_elements) // block * type_size != int(t.n_bytes) or t.data.nbytes != int(t.n_bytes):
            raise ToolkitError(f"{path}: inconsistent GGUF: tensor '{t.name}' holds {t.data.nbytes} bytes, "
                               f"its shape {list(map(int, t.shape))} as {t.tensor_type.name} needs {t.n_bytes}")
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if int(embd.shape[-1]) != tokens:
        raise ToolkitError(f"{path}: inconsistent GGUF: {tokens} tokens but token_embd.weight has {int(embd.shape[-1])} rows")
    _check_sizes(reader, arch, path)
    return reader


def _check_sizes(reader: gguf.GGUFReader, arch: str, path: Path) -> None:
    """The sizes transformers builds the model from (for real, before loading a tensor) against the tensors: a
    lying embedding_length or feed_forward_length would allocate a model of that size first."""
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}  # GGUF order: [in, out]
    hidden = shapes["token_embd.weight"][0]
    sizes = {"embedding_length": hidden, "feed_forward_length": shapes["blk.0.ffn_down.weight"][0]}
    for key, stored in sizes.items():
        value = _value(reader, f"{arch}.{key}") if f"{arch}.{key}" in reader.fields else stored
        if value != stored:
            raise ToolkitError(f"{path}: inconsistent GGUF: {arch}.{key} is {value} but the tensors have {stored}")
    heads = _value(reader, f"{arch}.attention.head_count")
    kv = _value(reader, f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads
    if not all(isinstance(h, int) and 0 < h <= hidden for h in (heads, kv)):
        raise ToolkitError(f"{path}: inconsistent GGUF: {heads} attention heads ({kv} key/value) for "
                           f"embedding_length {hidden}")


def dequantized_tensor(t: Any) -> np.ndarray:
    """A ``ReaderTensor`` as float32 ``[rows, cols]`` (numpy order), dequantized by gguf-py's own ``quants``."""
    shape = tuple(reversed([int(d) for d in t.shape]))
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)


def metadata(reader: gguf.GGUFReader, keys: list[str]) -> dict[str, Any]:
    return {k: _value(reader, k) for k in keys if k in reader.fields}

