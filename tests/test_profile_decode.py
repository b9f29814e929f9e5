"""benchmarks/profile_decode.py on a tiny export: the cProfile table and the ``--gaps`` figure, the host loop's CPU
between two decode steps, which is measured around the calls the steps make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import export_tiny_int4, load_benchmark


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_int4(tmp_path_factory.mktemp("profile-decode") / "int4")


def test_gaps_prints_one_median_per_generate(tiny_export, capsys):
    bench = load_benchmark("profile_decode")
    assert bench.main([str(tiny_export), "--tokens", "16", "--gaps", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    figures = re.fullmatch(r"host loop between decode steps .*: (\d+), (\d+), (\d+) us; median (\d+) us", line)
    assert figures, line
    per_generate = sorted(int(g) for g in figures.groups()[:3])
    assert int(figures.group(4)) == per_generate[1] and per_generate[0] > 0


def test_the_profile_counts_one_decode_call_per_step(tiny_export, capsys):
    assert load_benchmark("profile_decode").main([str(tiny_export), "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "15 decode steps" in out
    assert re.search(r"^\s+15\s.*scheduler.py:\d+\(decode_one_token\)", out, re.MULTILINE), out
