"""benchmarks/bench_speculative.py: the per-phase table of a speculating configuration."""

from __future__ import annotations

from tests.conftest import load_benchmark


def _run(ms: float, **kw: float) -> dict[str, float]:
    return {"tok_s": 1e3 / ms, "ms_per_token": ms, "acceptance": 0.0, "tokens_per_call": 1.0, "draft_share": 0.0,
            "verify_share": 0.0, "plain_share": 1.0, "draft_ms_per_token": 0.0, "verify_ms": 0.0, "deferred": 0.0,
            **kw}


def test_phases_show_where_a_speculating_round_went_beside_plain_decode(capsys):
    bench = load_benchmark("bench_speculative")
    spec = _run(20.0, draft_share=0.3, verify_share=0.6, plain_share=0.05, draft_ms_per_token=7.5, verify_ms=30.0,
                deferred=0.03)
    bench.print_phases({"target": [_run(25.0), _run(27.0)], "draft": [spec, spec]})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "phases"  # the plain configuration has no phases row
    name, ms, plain, draft, verify, one, python, draft_ms, verify_ms, deferred = lines[1].split()
    assert (name, ms, plain) == ("draft", "20.00", "26.00")
    assert (draft, verify, one, python) == ("0.30", "0.60", "0.05", "0.05")  # python: what the phases leave
    assert (draft_ms, verify_ms, deferred) == ("7.50", "30.00", "0.03")
    bench.print_phases({"target": [_run(25.0)]})
    assert capsys.readouterr().out == ""
