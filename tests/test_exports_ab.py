"""benchmarks/exports_ab.py on a tiny int4 export: both load orders run, and the tokens of two exports are compared."""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.conftest import export_tiny_int4, load_benchmark


def test_both_load_orders_run_and_other_weights_decode_other_tokens(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("exports_ab")
    a, b = export_tiny_int4(tmp_path / "a", False), export_tiny_int4(tmp_path / "b", True)
    args = ["--processes", "2", "--pairs", "2", "--prompt-tokens", "16", "--new-tokens", "6"]
    assert bench.main([str(a), str(a), *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" (")[1].split(")")[0] for line in lines[:2]] == ["a-first", "b-first"]
    assert all(len(line.split("per pair ")[1].split()) == 2 for line in lines[:2])
    assert lines[-1].endswith("same tokens: True") and "both orders" in lines[-1]
    assert bench.main([str(a), str(b), *args]) == 0
    assert capsys.readouterr().out.strip().endswith("same tokens: False")


def test_an_export_against_itself_times_two_sessions(tmp_path: Path, monkeypatch) -> None:
    """A against A (the noise floor) must time two sessions, not one session twice."""
    import toolkit.runtime as runtime

    bench = load_benchmark("exports_ab")
    a = export_tiny_int4(tmp_path / "a", False)
    calls: list[int] = []
    real = runtime.load

    def counting_load(*args, **kw):
        engine, index = real(*args, **kw), len(calls)
        calls.append(0)
        generate = engine.generate

        def counted(*g_args, **g_kw):
            calls[index] += 1
            return generate(*g_args, **g_kw)

        engine.generate = counted
        return engine

    monkeypatch.setattr(runtime, "load", counting_load)
    args = argparse.Namespace(a=a, b=a, threads=1, prompt_tokens=16, new_tokens=6, pairs=2)
    result = bench.run_one(args, b_first=True)
    assert calls == [3, 3]  # each session: a warm-up and one generation per pair
    assert result["same_tokens"] and len(result["ratios"]) == 2
