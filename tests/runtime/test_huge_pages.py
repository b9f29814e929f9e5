"""Huge pages for a session's memory: which spans are asked for, that the kernel's answer is read back, and that
the option changes no output."""

from __future__ import annotations

import mmap
import platform
from pathlib import Path

import numpy as np
import pytest

from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime.backend import BackendOptions, OrtBackend
from toolkit.runtime.huge_pages import HUGE_PAGE, anonymous_ranges, back_with_huge_pages, new_huge_spans

MB2 = HUGE_PAGE


def test_only_whole_huge_pages_that_nothing_held_before_are_asked_for():
    before = [(10 * MB2, 11 * MB2 + 4096)]
    after = [(9 * MB2 + 4096, 14 * MB2 + 8192), (20 * MB2, 21 * MB2 - 4096)]
    # the first range grew on both sides of the old one: [9M2+4K, 10M2) has no whole page, [11M2+4K, 14M2+8K)
    # holds [12M2, 14M2); the second is shorter than a page
    assert new_huge_spans(before, after) == [(12 * MB2, 14 * MB2)]
    assert new_huge_spans([], [(0, 3 * MB2)]) == [(0, 3 * MB2)]
    assert new_huge_spans([(0, 3 * MB2)], [(0, 3 * MB2)]) == []


def _collapses() -> bool:
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return enabled.exists() and "[never]" not in enabled.read_text() and (major, minor) >= (6, 1)


@pytest.mark.skipif(not _collapses(), reason="MADV_COLLAPSE needs Linux >= 6.1 with transparent huge pages")
def test_a_touched_anonymous_mapping_is_collapsed_and_listed():
    region = mmap.mmap(-1, 4 * MB2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(region, np.uint8)
    buf[::4096] = 1  # fault every 4 KB page in
    start = buf.ctypes.data
    assert any(s <= start and start + 4 * MB2 <= e for s, e in anonymous_ranges())
    aligned = -(-start // MB2) * MB2
    assert back_with_huge_pages([(aligned, aligned + 2 * MB2)]) == 2 * MB2
    assert int(buf[::4096].sum()) == 4 * MB2 // 4096  # the contents moved with the pages
    del buf
    region.close()


def test_huge_pages_change_no_logits(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        export(tiny_llama(), tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    ids = np.array([5, 17, 42, 99, 3], np.int64)
    logits = []
    for huge in (False, True):
        backend = OrtBackend(out, BackendOptions(threads=1, huge_pages=huge))
        assert huge or backend.huge_page_bytes == 0
        backend.allocate(1, 16)
        logits.append(backend.prefill(0, ids, 0).copy())
    np.testing.assert_array_equal(logits[0], logits[1])
