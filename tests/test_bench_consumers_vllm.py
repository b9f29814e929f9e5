"""benchmarks/bench_consumers.py's vLLM comparison logic, without vLLM: divergence and margins, format refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_benchmark
from toolkit.quant.modules import stored_floats

bench = load_benchmark("bench_consumers")


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


def _config(folder: Path, **quant: str) -> None:
    (folder / "config.json").write_text(json.dumps({"quantization_config": quant}))


def test_each_scheme_runs_in_its_kernels_dtype_and_unknown_schemes_are_refused(tmp_path: Path) -> None:
    _config(tmp_path, quant_method="compressed-tensors", format="pack-quantized")
    assert bench.vllm_dtype(tmp_path) == "bfloat16"  # vLLM CPU's W4A16 kernel: bfloat16 only
    _config(tmp_path, quant_method="compressed-tensors", format="int-quantized")
    assert bench.vllm_dtype(tmp_path) == "bfloat16"  # its AMX int8 kernel takes bfloat16 or half activations
    _config(tmp_path, quant_method="modelopt", quant_algo="FP8_PER_CHANNEL_PER_TOKEN")
    assert bench.vllm_dtype(tmp_path) == "bfloat16"
    _config(tmp_path, quant_method="compressed-tensors", format="marlin-24")
    with pytest.raises(SystemExit, match="scheme 'marlin-24' has no vLLM dtype"):
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
    _config(tmp_path, quant_method="compressed-tensors", format="pack-quantized")
    job = bench.vllm_job(tmp_path, [[1, 2, 3]], [list(range(512))], new_tokens=32)
    assert job["max_model_len"] == 513 and job["dtype"] == "bfloat16"
    assert bench.vllm_job(tmp_path, [[1] * 40], [], new_tokens=32)["max_model_len"] == 72
    # --vllm-dtype float32: vLLM computes in our precision (its FP8 torch fallback accepts it)
    assert bench.vllm_job(tmp_path, [[1] * 40], [], new_tokens=32, dtype="float32")["dtype"] == "float32"
    assert job["kv_cache_dtype"] == "auto"
    assert bench.vllm_job(tmp_path, [[1] * 40], [], 32, "float32", kv_cache_dtype="fp8")["kv_cache_dtype"] == "fp8"


def test_root_cause_is_the_failing_jobs_engine_error_not_engine_dead() -> None:
    log = "\n".join([
        f"{bench.JOB_MARK} 0 /a", "(EngineCore pid=7) INFO loading", "ok",
        f"{bench.JOB_MARK} 1 /b", "(EngineCore pid=9) ERROR 12-06 [core.py:1] EngineCore failed to start.",
        "(EngineCore pid=9) Traceback (most recent call last):", '(EngineCore pid=9)   File "x.py", line 3',
        "(EngineCore pid=9) ValueError: sliding window 8 is not supported", "Traceback (most recent call last):",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        f"{bench.JOB_MARK} 2 /c", "RuntimeError: later job"])
    assert bench.root_cause(log, 1) == "ValueError: sliding window 8 is not supported"
    assert bench.root_cause(log, 0) is None  # job 0's part names no exception
    assert bench.root_cause(log, 2) == "RuntimeError: later job"
    assert bench.root_cause(log, 3) is None  # a job the log never reached
    crash = "\n".join([f"{bench.JOB_MARK} 0 /a", "(EngineCore pid=9) ERROR 12-06 10:02:03 [multiproc_executor.py:315] "
                        "Worker proc VllmWorker-0 died unexpectedly (exit code: None), shutting down executor.",
                        "(EngineCore pid=9) ERROR 12-06 10:02:03 [core.py:1512] RuntimeError: cancelled"])
    assert bench.root_cause(crash, 0).startswith("Worker proc VllmWorker-0 died unexpectedly")  # not "cancelled"


def test_tiny_schemes_export_the_formats_vllm_is_given(tmp_path: Path) -> None:
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    for scheme, fmt in (("w4a16", "pack-quantized"), ("w8a8", "int-quantized"), ("fp8", "float-quantized"),
                        ("fp8-modelopt", "modelopt"), ("fp8-static", "float-quantized"),
                        ("fp8-static-modelopt", "modelopt")):
        model, folder, _ = bench.tiny_export("llama", scheme, tmp_path)
        quant = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert quant.get("format", quant["quant_method"]) == fmt and folder.name == f"tiny-llama-{scheme}"
        stored_dtype = torch.bfloat16 if scheme.endswith("modelopt") else torch.float16  # each exporter's default
        stored = stored_floats(model, stored_dtype)  # our model with its floats as the export stores them
        with torch.no_grad():  # ours for a folder: the exporter's reading, which computes what our model does
            ref, got = stored(input_ids=ids).logits, bench.our_reading(folder)(input_ids=ids).logits
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max(), scheme
        if scheme == "w8a8":
            assert quant["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
        if scheme == "fp8-static":
            assert quant["config_groups"]["group_0"]["weights"]["strategy"] == "tensor"
        if scheme == "fp8-static-modelopt":
            assert quant["quant_algo"] == "FP8"


def test_head_sizes_vllm_cpu_cannot_run_are_refused_before_it_starts(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(SystemExit, match="head_dim 16 is not one vLLM CPU's attention runs"):
        bench.check_vllm_head_dim(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}))
    bench.check_vllm_head_dim(tmp_path)


def test_tiny_mistral_gets_heads_vllm_runs_and_the_others_keep_theirs() -> None:
    assert bench.vllm_head_override("mistral") == {"head_dim": 32}  # its own head_dim 16 killed vLLM's engine
    assert bench.vllm_head_override("qwen3") == {}
