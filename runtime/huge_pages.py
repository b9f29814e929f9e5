"""Backing the memory a session allocates (its prepacked weights) with 2 MB transparent huge pages (Linux).

A decode step streams every weight once (codes, float32 scales and the block sums MatMulNBits prepacks), in 4 KB
pages unless asked otherwise (transparent_hugepage ``madvise``, a common default): a TLB miss and a page walk every
4 KB. Backed by 2 MB pages, the same graph asks less of the CPU per step (README, "Against onnxruntime-genai on the
same day": it is the memory, not the graph, and onnxruntime-genai's graph gains alike).

``MADV_HUGEPAGE`` marks a range (later faults in it get huge pages); ``MADV_COLLAPSE`` (Linux 6.1) moves what is
already there into huge pages now. Both are hints: where the kernel refuses (older kernel, THP ``never``, another
OS) nothing changes and nothing fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MAPS = Path("/proc/self/maps")

Range = tuple[int, int]  # [start, end) addresses


def anonymous_ranges() -> list[Range]:
    """The process's private writable anonymous mappings (the heap included), as the kernel lists them."""
    if not sys.platform.startswith("linux") or not MAPS.exists():
        return []
    out = []
    for line in MAPS.read_text().splitlines():
        fields = line.split()
        path = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1].endswith("p") and path in ("", "[heap]"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def new_huge_spans(before: list[Range], after: list[Range]) -> list[Range]:
    """The whole 2 MB pages of ``after`` that no range of ``before`` touches (what an allocation added)."""
    spans = []
    for start, end in after:
        pieces = [(start, end)]
        for b0, b1 in before:
            pieces = [p for s, e in pieces for p in ((s, min(e, b0)), (max(s, b1), e)) if p[0] < p[1]]
        for s, e in pieces:
            s, e = -(-s // HUGE_PAGE) * HUGE_PAGE, e // HUGE_PAGE * HUGE_PAGE
            if e > s:
                spans.append((s, e))
    return spans


def back_with_huge_pages(spans: list[Range]) -> int:
    """Ask for huge pages over ``spans`` (2 MB aligned); returns the bytes the kernel collapsed."""
    if not spans:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in spans:
        libc.madvise(start, end - start, MADV_HUGEPAGE)
        if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
    return collapsed
