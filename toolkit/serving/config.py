"""The server's settings, importable without the serve extra (the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.manifest import read_if_any
from toolkit.runtime.generation import MAX_DRAFT_TOKENS, GenerationConfig


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
    # speculative decoding for every request (a request may turn it off or shorten it): drafts from another export
    # with the same tokenizer, or from n-gram matches in the prompt and the generated text
    draft: Path | None = None
    prompt_lookup: bool = False
    num_draft_tokens: int | None = None  # the longest draft (None: GenerationConfig's default)
    # an int8-activation target speculates exactly by decoding each row as it is alone (runtime ``batch_exact``):
    # off, it speculates while one request runs and batches several without speculation (throughput)
    batch_exact: bool = False

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
        self._check_speculation()

    def _check_speculation(self) -> None:
        if self.draft is not None and self.prompt_lookup:
            raise ToolkitError("--draft and --prompt-lookup are two draft sources: choose one")
        if self.num_draft_tokens is not None:
            if not self.speculates:
                raise ToolkitError("--num-draft-tokens is the longest draft of --draft or --prompt-lookup: give "
                                   "one of them, or leave it out")
            if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
                raise ToolkitError(f"--num-draft-tokens must be in [1, {MAX_DRAFT_TOKENS}] (got "
                                   f"{self.num_draft_tokens}); to serve without speculation leave --draft and "
                                   "--prompt-lookup out")
        if self.batch_exact and not self.speculates:
            raise ToolkitError("--batch-exact is how --draft or --prompt-lookup decode a batch: give one of them, "
                               "or leave it out")
        if self.draft is not None and not (self.draft / "model.onnx").is_file():
            raise ToolkitError(f"--draft {self.draft} holds no model.onnx: give the folder an ONNX export of a "
                               "model with the served export's tokenizer was written to")

    @property
    def speculates(self) -> bool:
        return self.draft is not None or self.prompt_lookup

    @property
    def max_draft_tokens(self) -> int:
        """The longest draft a request may ask for (0: the server does not speculate)."""
        if not self.speculates:
            return 0
        return self.num_draft_tokens if self.num_draft_tokens is not None else GenerationConfig.num_draft_tokens

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
