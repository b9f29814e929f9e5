"""benchmarks/activation_quality.py: its rows run end to end (on the tiny model) and print one table against float
(perplexity, the change, KL)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import load_benchmark

quality = load_benchmark("activation_quality")


def test_every_row_runs_and_prints_one_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["activation_quality.py", "--model", "tiny-llama", "--windows", "1",
                                      "--calib-count", "2", "--calib-length", "32", "--threads", "1", "--alphas", "0.3,0.5"])
    quality.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [r[0].removeprefix("| ") for r in rows]
    assert names == [*quality.ROWS, "w8a8-sq alpha 0.3"]  # alpha 0.5 is the w8a8-sq row, not run twice
    assert rows[0][2] == "-" and all(r[2].endswith(" %") for r in rows[1:])
    assert all(float(r[1]) > 1 for r in rows)
    kl = [float(r[3].removesuffix(" |")) for r in rows]  # KL x 1e-4 against float
    assert kl[0] == 0 and all(k > 0 for k in kl[1:])
