"""benchmarks/bench_serve.py's report on fake timings (no servers), and benchmarks/peers.py's build flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark
from tests.runtime.test_scheduler import folder  # noqa: F401  (the tiny export, built once per module)

load = load_benchmark


bench = load("bench_serve")
peers = load("peers")


def fake(ttft: float, gap: float, tokens: int, prompt: int = 10):
    """A request whose chunks arrive every ``gap`` seconds after the first at ``ttft``."""
    chunks = [ttft + i * gap for i in range(tokens)]
    return bench.Timing(ttft, chunks[-1], chunks, tokens, prompt)


def test_summary_of_known_timings() -> None:
    timings = [fake(0.1, 0.01, 11), fake(0.3, 0.02, 11), fake(0.2, 0.05, 11)]
    row = bench.summarize(timings, wall_s=2.0, ttft_target_s=0.25, tpot_target_s=0.03)
    assert row["requests"] == 3 and row["request_per_s"] == 1.5
    assert row["output_tok_s"] == pytest.approx(33 / 2.0)
    assert row["ttft_p50_ms"] == pytest.approx(200.0)
    assert row["tpot_ms"] == pytest.approx((10 + 20 + 50) / 3)
    assert row["itl_p50_ms"] == pytest.approx(20.0)  # 10 gaps each of 10, 20 and 50 ms
    assert row["itl_p99_ms"] == pytest.approx(50.0)
    # goodput: the first meets both targets; the second misses TTFT, the third TPOT
    assert row["good_requests"] == 1 and row["goodput_req_s"] == pytest.approx(0.5)
    assert row["mean_prompt_tokens"] == 10


def test_single_token_requests_have_no_tpot_but_count_as_good() -> None:
    row = bench.summarize([fake(0.1, 0.01, 1)], wall_s=1.0, ttft_target_s=1.0, tpot_target_s=0.001)
    assert row["tpot_ms"] is None and row["itl_p50_ms"] is None and row["good_requests"] == 1


def test_ratios_compare_ours_with_the_best_peer(tmp_path: Path) -> None:
    def row(tok_s: float, ttft_ms: float) -> dict:
        timings = [fake(ttft_ms / 1000, 0.01, 5)]
        return {**bench.summarize(timings, 1.0, 1.0, 1.0), "output_tok_s": tok_s}

    levels = {"ours": {"1": row(100, 50), "8": row(300, 900)},
              "llama-server": {"1": row(80, 40), "8": row(400, 1000)},
              "vllm": {"1": row(50, 200)}}
    rel = bench.ratios(levels)
    assert rel["1"]["output_tok_s"] == pytest.approx(100 / 80) and rel["1"]["ttft_p99"] == pytest.approx(50 / 40)
    assert rel["8"]["output_tok_s"] == pytest.approx(300 / 400) and rel["8"]["ttft_p99"] == pytest.approx(0.9)
    report = {"levels": levels, "ratios": rel, "max_tokens": 5, "threads": 2,
              "forced_length": {"ours": "max_tokens only", "llama-server": "ignore_eos"},
              "goodput": {"ttft_ms": 1000, "tpot_ms": 100},
              "ttft_long": {"ours": {"short": row(1, 100), "mixed": row(1, 250), "ttft_p99_ratio": 2.5}}}
    md = bench.markdown(report)
    assert "| ours | 8 |" in md and "| 0.75 | 0.90 |" in md and "(2.50x)" in md and "llama-server: ignore_eos" in md
    json.dumps(report)
    pytest.importorskip("matplotlib")
    bench.chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_no_ratio_without_ours_or_peers() -> None:
    row = bench.summarize([fake(0.1, 0.01, 3)], 1.0, 1.0, 1.0)
    assert bench.ratios({"vllm": {"1": row}}) == {} and bench.ratios({"ours": {"1": row}}) == {}


def test_prompts_are_seeded_and_mixed() -> None:
    from toolkit.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    first, again = bench.make_prompts(tok, 12, seed=3), bench.make_prompts(tok, 12, seed=3)
    assert first == again and first != bench.make_prompts(tok, 12, seed=4)
    assert {len(tok.encode(p, add_special_tokens=False)) for p in first} == set(bench.SHORT_TOKENS)


def test_llama_server_takes_install_sh_ggml_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    flags = peers.install_sh_cmake_args()
    assert "-DGGML_AMX_INT8=OFF" in flags and "-DGGML_NATIVE=OFF" in flags
    with pytest.raises(peers.PeerUnavailable, match="no CMAKE_ARGS default"):
        peers.install_sh_cmake_args("echo nothing here")


def test_missing_peers_say_how_to_set_them_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOOLKIT_PEERS", str(tmp_path))
    with pytest.raises(peers.PeerUnavailable, match="peers.py setup --only vllm"):
        peers.vllm_python()
    with pytest.raises(peers.PeerUnavailable, match="peers.py setup --only llama-server"):
        peers.llama_server()


def test_decode_rate_counts_tokens_after_the_first_over_the_decode_span() -> None:
    # two requests sent at 10.0 and 10.5: first tokens at 11.0 and 11.5, last at 13.0 and 12.5 -> span 11.0..13.0
    timings = [bench.Timing(1.0, 3.1, [1.0, 2.0, 3.0], 5, 10, sent=10.0),
               bench.Timing(1.0, 2.1, [1.0, 2.0], 3, 10, sent=10.5)]
    assert bench.server_decode_rate(timings) == pytest.approx((4 + 2) / 2.0)
    assert bench.summarize(timings, 3.0, 1.0, 1.0)["decode_tok_s"] == pytest.approx(3.0)
    assert bench.decode_rate([0.0], [0.0], [1]) is None  # one token each: nothing decoded


def test_the_gate_is_the_servers_decode_rate_over_the_engines() -> None:
    met = bench.gate({"decode_tok_s": 95.0}, {"decode_tok_s": 100.0})
    assert met["ratio"] == pytest.approx(0.95) and met["met"] and met["target"] == 0.90
    missed = bench.gate({"decode_tok_s": 80.0}, {"decode_tok_s": 100.0})
    assert missed["ratio"] == pytest.approx(0.8) and not missed["met"]
    assert not bench.gate({"decode_tok_s": None}, {"decode_tok_s": 100.0})["met"]
    report = {"levels": {}, "ratios": {}, "max_tokens": 5, "threads": 2, "forced_length": {},
              "goodput": {"ttft_ms": 1000, "tpot_ms": 100}, "gate": missed}
    assert "80.0 aggregate decode tok/s vs Engine.generate_batch 100.0" in bench.markdown(report)
    assert "0.80x (target >= 0.90: not met)" in bench.markdown(report)


def test_engine_batch_reports_the_forced_length_on_a_tiny_export(folder: Path) -> None:  # noqa: F811
    args = argparse.Namespace(threads=1, max_tokens=6)
    out = bench.engine_batch(folder, ["hello there", "a longer prompt than that", "x"], args)
    assert out["output_tokens"] == [6, 6, 6] and out["requests"] == 3
    assert out["decode_tok_s"] > 0 and out["output_tok_s"] > 0


def test_vllm_is_asked_for_min_tokens_equal_to_each_requests_max_tokens(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """The warm-up asks for fewer tokens than the levels: a fixed min_tokens above its max_tokens is a 400."""
    monkeypatch.setenv("TOOLKIT_PEERS", str(tmp_path))
    (tmp_path / "vllm" / "bin").mkdir(parents=True)
    (tmp_path / "vllm" / "bin" / "python").touch()
    args = argparse.Namespace(max_tokens=64, threads=2, ttft_long=False)
    server = bench.vllm(tmp_path, 8000, args)
    assert server.body(8) == {"ignore_eos": True, "min_tokens": 8} and server.body(64)["min_tokens"] == 64
    assert server.forced_length == "ignore_eos, min_tokens"
    assert bench.ours(tmp_path, 8000, args).body(8) == {"ignore_eos": True}
