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
    name, ms, plain, draft, verify, one, python, draft_ms, draft_cost, verify_ms, deferred = lines[1].split()
    assert (name, ms, plain) == ("draft", "20.00", "26.00")
    assert (draft, verify, one, python) == ("0.30", "0.60", "0.05", "0.05")  # python: what the phases leave
    assert (draft_ms, draft_cost, verify_ms, deferred) == ("7.50", "0.29", "30.00", "0.03")  # 7.5 / 26
    bench.print_phases({"target": [_run(25.0)]})
    assert capsys.readouterr().out == ""


def test_an_int8_target_runs_plain_with_its_draft_lookup_and_paired_steps_against_its_plain_decode():
    bench = load_benchmark("bench_speculative")
    a = bench.parser().parse_args(["--target", "w8a8", "--draft", "int4", "--target-lookup", "--target-paired"])
    names = bench.configurations(a)
    assert names == ["target", "draft", "target-lookup", "target-paired"]
    assert all(bench.baseline(n) == "target" for n in names[1:])
    assert bench.configurations(bench.parser().parse_args(["--target", "fp32"])) == ["target"]


def test_a_second_draft_is_its_own_configuration_against_the_same_plain_target():
    bench = load_benchmark("bench_speculative")
    a = bench.parser().parse_args(["--target", "fp32", "--draft", "gptq", "--draft", "qat"])
    assert bench.configurations(a) == ["target", "draft", "draft2"]
    assert [str(bench.draft_folder(n, a)) for n in ("draft", "draft2")] == ["gptq", "qat"]
    assert bench.draft_folder("target", a) is None and bench.baseline("draft2") == "target"
    assert bench.baseline("lookup-copy") == "int4-copy" and bench.baseline("int4-copy") == ""


def test_allowed_speedup_is_expected_tokens_over_the_rounds_cost_in_plain_steps(capsys):
    bench = load_benchmark("bench_speculative")
    free = {"decode": 10.0, "paired": 11.0, "draft": 0.0, "verify1": 10.0, "verify2": 10.0}
    assert abs(bench.allowed_speedup(free, 2, 0.5) - 1.75) < 1e-9  # 1 + 0.5 + 0.25 tokens for one step
    third = {**free, "draft": 10.0 / 3, "verify1": 12.0}
    # a draft at a third of a step that is always right: 2 tokens for 1/3 + 1.2 steps
    assert abs(bench.allowed_speedup(third, 1, 1.0) - 2 / (1 / 3 + 1.2)) < 1e-6
    bench.print_costs(free, 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["paired", "11.00", "1.10"]
    assert lines[-1].split()[:2] == ["2", f"{bench.allowed_speedup(free, 2, 0.6):.2f}"]


def test_a_lookup_ngram_sweep_adds_configurations_against_the_same_plain_runs():
    bench = load_benchmark("bench_speculative")
    a = bench.parser().parse_args(["--int4", "int4", "--lookup-ngrams", "1-3", "2-4"])
    assert bench.configurations(a) == ["int4-copy", "lookup-copy", "lookup-copy@1-3", "lookup-copy@2-4",
                                       "int4-nocopy", "lookup-nocopy", "lookup-nocopy@1-3", "lookup-nocopy@2-4"]
    assert bench.baseline("lookup-copy@2-4") == "int4-copy" and bench.baseline("lookup-nocopy@1-3") == "int4-nocopy"
    assert bench.lookup_ngrams("lookup-nocopy@2-4") == (2, 4) and bench.lookup_ngrams("lookup-copy") is None


def test_costs_time_every_call_kind_on_a_tiny_target(tmp_path, monkeypatch):
    from tests.conftest import export_tiny_int4

    bench = load_benchmark("bench_speculative")
    folder = export_tiny_int4(tmp_path / "int4")
    monkeypatch.setattr(bench, "CONTEXT", 20)
    monkeypatch.setattr(bench, "CALLS", 3)
    a = bench.parser().parse_args(["--target", str(folder), "--draft", str(folder), "--costs", "--k", "2"])
    costs = bench.step_costs(a)
    assert set(costs) == {"decode", "paired", "draft", "batch4", "rows4", "verify1", "verify2"}
    assert all(ms > 0 for ms in costs.values())
