"""benchmarks/fp8_error_sources.py --groups: every fused group of every layer scored on calibration text, ranked."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import load_benchmark

sources = load_benchmark("fp8_error_sources")


def test_groups_ranks_every_fused_group_of_every_layer(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["fp8_error_sources.py", "--model", "tiny-llama", "--windows", "1",
                                      "--threads", "1", "--groups"])
    sources.main()
    out = capsys.readouterr().out
    layers = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(int(r[0][2:]) for r in layers) == [0, 1]
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| model.layers.")]
    groups = {r[0].removeprefix("| ") for r in rows}
    # tiny-llama: 2 layers x (q/k/v, o, gate/up, down)
    assert groups == {f"model.layers.{i}.{{{g}}}" for i in range(2) for g in (
        "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj,mlp.up_proj",
        "mlp.down_proj")}
    kl = [float(r[1]) for r in rows]
    assert kl == sorted(kl, reverse=True) and kl[0] > 0
    assert 80 < float(rows[-1][2].split()[0]) < 120  # every layer's groups: about the layers' sum (KL nearly adds)
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
