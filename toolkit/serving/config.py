"""The server's settings, importable without the serve extra (the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.manifest import read_if_any


@dataclass(frozen=True)
class ServeConfig:
    export: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # cache rows decoded together
    max_queue: int = 64  # requests waiting for a row before new ones get 503
    threads: int | None = None  # ORT intra-op threads (default: physical cores)
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    served_model_name: str | None = None  # default: the export folder's name (its run's name for run/export)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 0:
            raise ToolkitError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {self.max_batch}, "
                               f"{self.max_queue})")
        if not 0 <= self.port <= 65535:
            raise ToolkitError(f"--port must be in [0, 65535] (got {self.port})")
        if not self.shutdown_timeout >= 0:  # NaN too
            raise ToolkitError(f"--shutdown-timeout must be >= 0 seconds (got {self.shutdown_timeout})")
        if self.threads is not None and self.threads < 1:
            raise ToolkitError(f"--threads must be >= 1 (got {self.threads})")
        if not (self.export / "model.onnx").is_file():
            raise ToolkitError(f"{self.export} holds no model.onnx: give the folder an ONNX export was written to")

    @property
    def model_name(self) -> str:
        folder = self.export.resolve()
        return self.served_model_name or (folder.parent.name if folder.name == "export" else folder.name)


def source_hash(export: Path) -> str | None:
    """The hash of the model the export was made from, as the run's manifest records it (None when unknown)."""
    for folder in (export, export.parent):
        manifest = read_if_any(folder)
        model = manifest.get("model") if manifest else None
        if isinstance(model, dict) and model.get("key"):
            return str(model["key"])
    return None
