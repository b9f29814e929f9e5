"""benchmarks/fp8_error_sources.py --groups: every fused group of every layer scored on calibration text, ranked."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import load_benchmark

sources = load_benchmark("fp8_error_sources")


def test_groups_ranks_the_layers_and_the_groups_searched_and_keeps_the_costliest(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["fp8_error_sources.py", "--model", "tiny-llama", "--windows", "2",
                                      "--threads", "1", "--groups", "--share", "0.6"])
    sources.main()
    out = capsys.readouterr().out
    layers = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(int(r[0][2:]) for r in layers) == [0, 1]
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| model.layers.")]
    groups = {r[0].removeprefix("| ") for r in rows}
    every = {f"model.layers.{i}.{{{g}}}" for i in range(2) for g in (
        "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj,mlp.up_proj",
        "mlp.down_proj")}
    assert groups and groups <= every  # tiny-llama: 2 layers x (q/k/v, o, gate/up, down), as far as searched
    kl = [float(r[1]) for r in rows]
    assert kl == sorted(kl, reverse=True) and kl[0] > 0
    kept = out.split("kept float within 60 % of the weights (")[1]
    assert 0 < float(kept.split(" %")[0]) <= 60
    first = rows[0][0].removeprefix("| model.layers.")  # the costliest group is kept when it fits
    if float(rows[0][3].split()[0]) <= 60:
        assert f"model.layers.{first.split('.')[0]}." in kept.split(": ", 1)[1]
    assert "calibration windows" in out


def test_subnormals_splits_the_rounding_into_normal_and_subnormal_codes(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["fp8_error_sources.py", "--model", "tiny-llama", "--windows", "1",
                                      "--threads", "1", "--subnormals"])
    sources.main()
    rows = {r[0].removeprefix("| "): r for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and (r := line.split(" | "))[0] in ("| all", "| normal", "| subnormal")}
    kl = {k: float(r[1]) for k, r in rows.items()}
    assert set(kl) == {"all", "normal", "subnormal"}
    assert kl["all"] > 0 and kl["normal"] > 0 and kl["subnormal"] < kl["all"]
    assert all(r[2].endswith("% |") for r in rows.values())
