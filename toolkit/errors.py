"""The one exception type users see: its message is a single line that says what to do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ToolkitError(Exception):
    """A problem with the user's input or environment, reported as one line with a non-zero exit."""


def is_panic(exc: BaseException) -> bool:
    """A panic inside a Rust extension (tokenizers, safetensors): pyo3's ``PanicException`` derives from
    ``BaseException``, not ``Exception``, and each extension has its own class, so it is known by name."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


@contextmanager
def panics_as_errors(what: str) -> Iterator[None]:
    """A Rust panic inside the block as one ToolkitError line: ``what`` failed, with the panic's message."""
    try:
        yield
    except BaseException as exc:
        if not is_panic(exc):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else "no message"
        raise ToolkitError(f"{what} (a library panicked: {detail})") from None
