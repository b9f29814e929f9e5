"""Where a run may write: every check happens before the first pass, so a refused output costs nothing.
The same holds for the folder calibration activations spill to (``memory.spill_dir``).

An output folder is replaced only when it is a previous output of the toolkit (its ``manifest.json``
lists every file in it, nothing else is there) and the user asked for it (``--overwrite``). It may not
be, contain or lie inside what the run reads (the model, the recipe) or the cache it writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.manifest import MANIFEST, read_if_any
from toolkit.paths import cache_dir, is_within


def _foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that its manifest does not list (all of them when there is no valid manifest)."""
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    manifest = read_if_any(folder)
    if manifest is None:
        return present or [f"(no {MANIFEST})"]
    try:
        listed = set(manifest["files"]) if "toolkit" in manifest.get("versions", {}) else set()
    except (KeyError, TypeError):
        return present or [f"(no {MANIFEST})"]
    return [p for p in present if Path(p).name != MANIFEST and p not in listed]


def _creatable(path: Path, what: str, flag: str) -> None:
    """``path`` can be made: its nearest existing ancestor is a writable folder."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ToolkitError(f"{what} {path} lies under {ancestor}, which is a file, not a folder; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ToolkitError(f"{what} {path}: {ancestor} is not writable; choose another {flag}")


def check_output(output: Path, reads: list[Path], overwrite: bool) -> Path:
    """Refuse an output that would destroy anything the toolkit did not write; return it resolved."""
    output = Path(output).expanduser().absolute()
    protected = [(p, "input") for p in reads] + [(cache_dir(), "cache")]
    for path, role in protected:
        if not path.exists():
            continue
        if is_within(output, path) or is_within(path, output):
            raise ToolkitError(f"output {output} would overwrite the {role} {path}: "
                               "choose an output folder outside it (e.g. --output runs/NAME)")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ToolkitError(f"output {output} exists and is not a folder; choose another --output")
    if output.exists():
        foreign = _foreign_files(output)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ToolkitError(f"output {output} exists and is not a toolkit output ({shown} not in its manifest); "
                               "choose another --output or move it away")
        if not overwrite:
            raise ToolkitError(f"output {output} holds a previous run; pass --overwrite to replace it")
    _creatable(output, "output", "--output")
    return output


def check_spill(spill: Path, output: Path, reads: list[Path]) -> Path:
    """Refuse, before any work, a spill folder (``memory.spill_dir``) that is or lies inside the output, what
    the run reads or the cache (the output would be refused after all the work, an input or a cache entry would
    hold scratch files), or that cannot be made; return it resolved. Only an ``activations-*`` folder is made
    in it (and removed), so it may hold any of them."""
    spill = Path(spill).expanduser().absolute()
    protected = [(output, "output")] + [(p, "input") for p in reads] + [(cache_dir(), "cache")]
    for other, role in protected:  # the output does not exist yet: compare the paths themselves
        if is_within(spill, other):
            raise ToolkitError(f"memory.spill_dir {spill} would mix scratch files with the {role} {other}: "
                               "choose a spill folder outside it (e.g. /tmp or a large scratch disk)")
    if spill.exists() and not spill.is_dir():
        raise ToolkitError(f"memory.spill_dir {spill} exists and is not a folder; choose another memory.spill_dir")
    _creatable(spill, "memory.spill_dir", "memory.spill_dir")
    return spill
