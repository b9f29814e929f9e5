"""Where caches live and how folders are written atomically."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from toolkit.errors import ToolkitError


def cache_dir() -> Path:
    """``$TOOLKIT_CACHE``, else ``$XDG_CACHE_HOME/llm-toolkit``, else ``~/.cache/llm-toolkit``."""
    env = os.environ.get("TOOLKIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-toolkit"


_HASHED: dict[tuple[str, int, int, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes; remembered per process while its size, inode and timestamps are unchanged."""
    st = os.stat(path)
    stamp = (str(Path(path).resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if stamp in _HASHED:
        return _HASHED[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _HASHED[stamp] = h.hexdigest()
    return _HASHED[stamp]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (safetensors, shutil.copytree) wraps it in its own exception."""
    return getattr(exc, "errno", None) in DISK_FULL or "No space left on device" in str(exc) or "os error 28" in str(exc)


def disk_error(where: Path) -> ToolkitError:
    """A full disk or quota as one line that says where the write failed and what to do."""
    return ToolkitError(f"no space left on the device while writing {where}; "
                        "free some space (or point TOOLKIT_CACHE elsewhere) and run again")


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds.

    A failure or interruption removes the temporary folder, so ``final`` is either absent, the
    previous complete version, or the new complete version: never half-written. An existing
    ``final`` is replaced only when the caller says so (``replace``), after checking that it is
    the toolkit's own; otherwise it is an error and nothing is touched.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise ToolkitError(f"{final} already exists; refusing to replace it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        if disk_full(exc):
            raise disk_error(final) from None
        raise ToolkitError(f"cannot create the folder {final}: {exc.strerror}") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise disk_error(final) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a unique temporary sibling and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(exc):
            raise disk_error(path) from None
        raise


CODE_PACKAGES = ("toolkit", "toolkit.passes", "toolkit.runtime")


def read_json(path: Path, fix: str) -> Any:
    """The JSON value in ``path``; a file that is missing, unreadable or not JSON is one ToolkitError ending in
    ``fix`` (what the user should do: re-create the artifact, re-export the model, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"{path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise ToolkitError(f"{path} cannot be read ({type(exc).__name__}); {fix}") from None


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """sha256 over the toolkit's own source files (``toolkit/``, ``passes/``, ``runtime/``).

    Part of every cache key and manifest: a changed pass (or anything it calls) is never served from
    a cache entry that older code wrote, whatever ``__version__`` says.
    """
    import importlib

    h = hashlib.sha256()
    for name in CODE_PACKAGES:
        root = Path(importlib.import_module(name).__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            h.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def names_a_file_in(folder: Path, name: object) -> bool:
    """``name`` (read from a manifest or an index) is a relative path to a file of ``folder``: no absolute path,
    no ``..``, no symbolic link (of the file or a folder on its way) that leads out."""
    if not isinstance(name, str) or not name:
        return False
    relative = PurePosixPath(name)
    if relative.is_absolute() or Path(name).is_absolute() or ".." in relative.parts:
        return False
    return is_within(Path(folder) / name, folder)


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine gets an answer at once, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
