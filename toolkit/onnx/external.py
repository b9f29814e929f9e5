"""Initializers written to the external-data file as the graph is built: the ModelProto never holds weight bytes.

ONNX's external-data fields (onnx ``docs/ExternalData.md``): a tensor with ``data_location = EXTERNAL`` and
``external_data`` entries ``location`` (a path relative to the model file), ``offset`` and ``length`` (bytes)
reads its raw bytes from that file. ``ExternalData`` appends each tensor as it is made, contiguously, with the
rule ``onnx.save_model(..., save_as_external_data=True, size_threshold=1024)`` applies
(``sys.getsizeof(raw_data) >= threshold``; smaller tensors stay inline) and the same entries in the same order,
so a graph built this way serializes to the same ``model.onnx`` and ``model.onnx.data`` bytes as one built in
memory and saved by onnx, and no model size meets protobuf's 2 GB limit. ``rows`` writes a tensor given as
consecutive row blocks (a 128k-row embedding table), so not even its bytes are held whole; ``InlineData`` is the
same interface keeping every byte in the proto (small graphs, tests).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from onnx import TensorProto, helper

SIZE_THRESHOLD = 1024  # onnx.save_model's default: shape constants and scalars stay inline


class ExternalData:
    """The data file of one export; ``move(tensor)`` writes a large tensor's bytes and returns it weightless."""

    def __init__(self, path: Path, location: str, threshold: int = SIZE_THRESHOLD) -> None:
        self.path, self.location, self.threshold = Path(path), location, threshold
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.offset = 0

    def move(self, tensor: TensorProto) -> TensorProto:
        if not tensor.HasField("raw_data") or sys.getsizeof(tensor.raw_data) < self.threshold:
            return tensor
        data = tensor.raw_data
        self._file.write(data)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.ClearField("raw_data")
        self.offset += len(data)
        return tensor

    def rows(self, name: str, data_type: int, dims: list[int], blocks: Iterable[np.ndarray]) -> TensorProto:
        """Tensor ``name`` from consecutive row blocks, each written as it comes: the same bytes and entries as
        ``move`` of the whole tensor, with one block resident."""
        nbytes = math.prod(dims) * helper.tensor_dtype_to_np_dtype(data_type).itemsize
        if sys.getsizeof(b"") + nbytes < self.threshold:  # the rule ``move`` applies to the joined bytes
            return self.move(InlineData().rows(name, data_type, dims, blocks))
        start = self.offset
        for block in blocks:
            data = np.ascontiguousarray(block).view(np.uint8)
            self._file.write(data.data)
            self.offset += data.nbytes
        if self.offset - start != nbytes:
            raise ValueError(f"{name}: {self.offset - start} bytes written, shape {dims} needs {nbytes}")
        tensor = TensorProto(name=name, data_type=data_type, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", start), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineData:
    """Initializers kept in the proto (``onnx.save_model`` may move them out later)."""

    def move(self, tensor: TensorProto) -> TensorProto:
        return tensor

    def rows(self, name: str, data_type: int, dims: list[int], blocks: Iterable[np.ndarray]) -> TensorProto:
        data = b"".join(np.ascontiguousarray(b).view(np.uint8).tobytes() for b in blocks)
        return helper.make_tensor(name, data_type, dims, data, raw=True)
