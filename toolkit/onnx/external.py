"""Initializers written to the external-data file as the graph is built: the ModelProto never holds weight bytes.

ONNX's external-data fields (onnx ``docs/ExternalData.md``): a tensor with ``data_location = EXTERNAL`` and
``external_data`` entries ``location`` (a path relative to the model file), ``offset`` and ``length`` (bytes)
reads its raw bytes from that file. ``ExternalData`` appends each tensor as it is made, contiguously, with the
rule ``onnx.save_model(..., save_as_external_data=True, size_threshold=1024)`` applies
(``sys.getsizeof(raw_data) >= threshold``; smaller tensors stay inline) and the same entries in the same order,
so a graph built this way serializes to the same ``model.onnx`` and ``model.onnx.data`` bytes as one built in
memory and saved by onnx, and no model size meets protobuf's 2 GB limit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from onnx import TensorProto

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

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
