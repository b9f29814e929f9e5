"""benchmarks/bench_consumers.py's vLLM comparison logic, without vLLM: divergence and margins, format refusals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("bench_consumers", BENCH / "bench_consumers.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_consumers"] = bench
spec.loader.exec_module(bench)


def test_equal_runs_have_no_divergence() -> None:
    assert bench.divergence([1, 2, 3], [1, 2, 3], [], []) == {"equal": True}


def test_first_divergence_and_both_margins() -> None:
    logits = [torch.zeros(6) for _ in range(3)]
    logits[1][4], logits[1][5] = 2.5, 2.0  # we chose 4 over vLLM's 5 by 0.5
    top = [{}, {"5": -0.6, "4": -0.9}, {}]
    got = bench.divergence([1, 4, 0], [1, 5, 2], logits, top)
    assert got["first_divergence"] == 1 and (got["ours"], got["vllm"]) == (4, 5)
    assert got["our_margin"] == pytest.approx(0.5) and got["vllm_margin"] == pytest.approx(0.3)
    assert bench.divergence([1, 4], [1, 5], logits, [{}, {"5": -0.1}])["vllm_margin"] is None


def test_our_greedy_is_argmax_and_ignores_eos() -> None:
    from toolkit.models.tiny import tiny_model

    model = tiny_model("llama")
    tokens, steps = bench.greedy(model, [256, 10, 20], 5)
    assert len(tokens) == 5 and [int(s.argmax()) for s in steps] == tokens
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[256, 10, 20]])).logits[0, -1]
    assert torch.equal(steps[0], first.float())


def test_w4a16_runs_in_bfloat16_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"format": "pack-quantized"}}))
    assert bench.vllm_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"format": "marlin-24"}}))
    with pytest.raises(SystemExit, match="format 'marlin-24' has no vLLM dtype"):
        bench.vllm_dtype(tmp_path)
    with pytest.raises(SystemExit, match="has no config.json"):
        bench.vllm_dtype(tmp_path / "missing")


def test_chat_prompts_are_the_probe_questions_in_the_template() -> None:
    from toolkit.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = bench.chat_prompts(tok)
    assert len(prompts) == bench.VLLM_PROMPTS
    assert tok.decode(prompts[0]) == f"<|user|>{bench.QUESTION}\n<|assistant|>"


def test_max_model_len_holds_a_window_and_the_token_after_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"format": "pack-quantized"}}))
    job = bench.vllm_job(tmp_path, [[1, 2, 3]], [list(range(512))], new_tokens=32)
    assert job["max_model_len"] == 513 and job["dtype"] == "bfloat16"
    assert bench.vllm_job(tmp_path, [[1] * 40], [], new_tokens=32)["max_model_len"] == 72
