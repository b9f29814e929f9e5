"""Streaming (layer-at-a-time) quantization of sharded checkpoints equals the in-memory passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.models.shape import ModelShape
from toolkit.models.shards import INDEX, ShardWriter
from toolkit.models.streaming import SkeletonModel, greedy_generate
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.quant import checkpoint
from toolkit.quant.activations import ActivationBuffer
from toolkit.quant.modules import quantized_modules
from toolkit.quant.streaming import StreamOptions, stream_rtn


def write_sharded(model: torch.nn.Module, folder: Path, dtype: torch.dtype, shard_bytes: int = 40_000) -> Path:
    """``model`` as a hub-style sharded checkpoint in ``dtype`` (tied head stored once)."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    writer = ShardWriter(folder, shard_bytes, {"format": "pt"})
    for name, t in model.state_dict().items():
        if not (model.config.tie_word_embeddings and name == "lm_head.weight"):
            writer.add(name, t.to(dtype))
    writer.close()
    return folder


def in_memory(folder: Path) -> torch.nn.Module:
    """What the in-memory passes see: the checkpoint loaded in float32."""
    return checkpoint.load_model(folder)


def packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in quantized_modules(model).items() for k, v in m.state_dict().items()}


def assert_same_packed(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = packed_state(a), packed_state(b)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return write_sharded(tiny_llama(seed=3), tmp_path / "src", request.param)


def test_sharded_source_is_read_one_tensor_at_a_time(source: Path) -> None:
    assert (source / INDEX).is_file() and len(list(source.glob("model-*-of-*.safetensors"))) > 2
    src = SkeletonModel(source)
    assert all(p.is_meta for p in src.model.parameters())
    layer = src.load(src.layer_prefix(1))
    assert not any(p.is_meta for p in layer.parameters()) and src.model.model.layers[0].self_attn.q_proj.weight.is_meta
    src.release(src.layer_prefix(1))
    assert all(p.is_meta for p in layer.parameters())


@pytest.mark.parametrize("head_bits", [8, None])
def test_streaming_rtn_is_bit_exact_and_reloads(source: Path, tmp_path: Path, head_bits: int | None) -> None:
    config = rtn.RTNConfig(bits=4, group_size=32, lm_head_bits=head_bits)
    expected = rtn.apply(in_memory(source), config)
    out = tmp_path / "out"
    out.mkdir()
    stats = stream_rtn(SkeletonModel(source), out, config, StreamOptions(max_shard_bytes=20_000))
    assert stats["bytes_written"] > 0 and (out / INDEX).is_file()
    got = checkpoint.load_model(out)
    assert_same_packed(expected, got)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(expected(ids).logits, got(ids).logits.float(), atol=3e-2)
    tokens = greedy_generate(got, ids[:1], 4, vocab_limit=256)
    assert tokens.shape == (1, 21) and int(tokens.max()) < 256


def _ctx(tmp_path: Path, windows: torch.Tensor) -> PassContext:
    return PassContext(tokenizer=tiny_tokenizer(), calibration_loader=lambda: windows,
                       original_loader=lambda: tiny_llama(seed=3), workdir=tmp_path / "work")


@pytest.mark.parametrize("budget", [None, 0], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("head", ["rtn", "gptq"])
def test_streaming_gptq_equals_in_memory(source: Path, tmp_path: Path, budget: int | None, head: str) -> None:
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    config = gptq.GPTQConfig(bits=4, group_size=32, batch_size=4, lm_head_method=head, lm_head_bits=8)
    expected = gptq.apply(in_memory(source), config, _ctx(tmp_path, windows))
    out = tmp_path / "out"
    out.mkdir()
    options = StreamOptions(activation_budget_bytes=budget, spill_dir=tmp_path / "spill")
    stats = gptq.stream(SkeletonModel(source), out, config, _ctx(tmp_path, windows), options)
    assert (stats["spilled_bytes"] > 0) == (budget == 0)
    assert not list((tmp_path / "spill").glob("*/*")), "spilled activations are removed"
    assert_same_packed(expected, checkpoint.load_model(out))


def test_activation_buffer_spills_beyond_budget(tmp_path: Path) -> None:
    batches = [torch.randn(2, 3, 4) for _ in range(5)]
    buf = ActivationBuffer(budget_bytes=2 * batches[0].numel() * 4, spill_dir=tmp_path)
    for b in batches:
        buf.append(b)
    assert buf.resident_bytes == 2 * 96 and buf.spilled_bytes == 3 * 96
    buf.put(4, batches[4] * 2)
    assert torch.equal(buf.get(4), batches[4] * 2) and torch.equal(buf.get(0), batches[0])
    buf.close()
    assert not list(tmp_path.glob("*/*"))


def _recipe(tmp_path: Path, model: str, passes: list, **extra: object) -> Path:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model, "calibration": {"count": 4, "length": 24},
                                    "evaluation": {"count": 2, "length": 32}, "passes": passes,
                                    "output": str(tmp_path / "out"), **extra}))
    return path


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_pipeline_streams_a_checkpoint_folder(tmp_path: Path, name: str) -> None:
    from toolkit.pipeline import recipes, runner

    folder = write_sharded(tiny_llama(seed=3), tmp_path / "src", torch.bfloat16)
    recipe = recipes.load(_recipe(tmp_path, str(folder), [{name: {"group_size": 32}}],
                                  memory={"activations_mb": 0},
                                  evaluation={"count": 2, "length": 32, "streaming": True, "kl": False}))
    result = runner.run(recipe, progress=False, log=lambda _: None)
    assert "streaming" in result.steps[0].metrics and result.steps[0].measure["peak_rss_mb"] > 0
    assert result.before["streamed"] == 1.0
    packed = checkpoint.load_model(result.output / "model")
    if name == "rtn":
        assert_same_packed(rtn.apply(in_memory(folder), rtn.RTNConfig(group_size=32)), packed)
    assert result.after["perplexity"] > 1 and result.before["perplexity"] > 1


def test_baseline_evaluation_can_be_turned_off(tmp_path: Path) -> None:
    from toolkit.pipeline import recipes, runner

    recipe = recipes.load(_recipe(tmp_path, "tiny-llama", [{"rtn": {"group_size": 32}}],
                                  evaluation={"count": 2, "length": 32, "baseline": False}))
    result = runner.run(recipe, progress=False, log=lambda _: None)
    assert result.before == {} and result.after["perplexity"] > 1
    assert "baseline not evaluated" in (result.output / "report.md").read_text()


def test_run_over_its_memory_budget_is_refused_before_it_starts(tmp_path: Path) -> None:
    from toolkit.errors import ToolkitError
    from toolkit.pipeline import recipes, runner

    folder = write_sharded(tiny_llama(seed=3), tmp_path / "src", torch.bfloat16)
    recipe = recipes.load(_recipe(tmp_path, str(folder), [{"gptq": {"group_size": 32}}],
                                  memory={"budget_gb": 0.5}))
    with pytest.raises(ToolkitError, match=r"estimated \d+\.\d GB .*above the memory budget of 0\.5 GB"):
        runner.run(recipe, progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()
    ok = recipes.load(_recipe(tmp_path, str(folder), [{"gptq": {"group_size": 32}}], memory={"budget_gb": 4}))
    ref = runner.models.resolve(str(folder))
    assert runner.check_memory(ok, ref, runner.stream_options(ok.memory, "cpu", False), runner.model_shape(ref),
                               runner.budget.budget_bytes(ok.memory.budget_gb))


def test_memory_estimate_streams_a_large_model_within_budget() -> None:
    """The 8B shape: in memory it needs > 64 GB, streamed RTN with the baseline off fits 4 GB."""
    from transformers import LlamaConfig

    from toolkit.pipeline import budget, recipes

    shape = ModelShape.of_config(LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False))
    assert 8.0e9 < shape.parameters < 8.1e9
    recipe = recipes.parse({"model": "x", "output": "o", "passes": [{"rtn": {}}],
                            "evaluation": {"baseline": False, "kl": False}}, "r")
    streamed = budget.estimate_run(recipe, shape, [True], 512 * 2**20, 2**30).phases
    in_memory = budget.estimate_run(recipe, shape, [False], 512 * 2**20, 2**30).phases
    assert streamed["pass rtn (streaming)"] < 4e9 < 64e9 < in_memory["pass rtn"]


def test_cuda_without_a_device_is_refused(tmp_path: Path) -> None:
    from toolkit.errors import ToolkitError
    from toolkit.pipeline import recipes, runner

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = recipes.load(_recipe(tmp_path, "tiny-llama", [{"rtn": {}}], device="cuda"))
    with pytest.raises(ToolkitError, match="device: cuda"):
        runner.run(recipe, progress=False, log=lambda _: None)
    assert runner.resolve_device("auto") == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_streaming_gptq_on_cuda_matches_cpu(source: Path, tmp_path: Path) -> None:
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    config = gptq.GPTQConfig(bits=4, group_size=32, batch_size=4, lm_head_bits=8)
    models = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        out.mkdir()
        gptq.stream(SkeletonModel(source, device=device), out, config, _ctx(tmp_path, windows), StreamOptions(device))
        models[device] = checkpoint.load_model(out)
    ids = windows[:2]
    with torch.no_grad():
        cpu, cuda = models["cpu"](ids).logits, models["cuda"](ids).logits
    assert float((cpu - cuda).abs().max()) < 0.05 * float(cpu.abs().max())


def test_streaming_perplexity_equals_in_memory(source: Path) -> None:
    from toolkit.evaluation import perplexity
    from toolkit.evaluation.streaming import stream_perplexity

    windows = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    expected = perplexity.evaluate(in_memory(source), windows, batch_size=2)["perplexity"]
    got = stream_perplexity(SkeletonModel(source), windows, 2, StreamOptions(activation_budget_bytes=0))["perplexity"]
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("quantize", [True, False])
def test_streaming_awq_equals_in_memory(source: Path, tmp_path: Path, quantize: bool) -> None:
    from toolkit.passes import awq

    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    config = awq.AWQConfig(bits=4, group_size=32, batch_size=4, grid=5, quantize=quantize)
    expected = awq.apply(in_memory(source), config, _ctx(tmp_path, windows))
    out = tmp_path / "out"
    out.mkdir()
    awq.stream(SkeletonModel(source), out, config, _ctx(tmp_path, windows), StreamOptions())
    got = checkpoint.load_model(out)
    if quantize:
        assert_same_packed(expected, got)
    else:
        for (name, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items(), strict=True):
            assert torch.equal(a, b.to(a.dtype)), name
