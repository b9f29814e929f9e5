"""Streaming (layer-at-a-time) quantization of sharded checkpoints equals the in-memory passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.models import checkpoint
from toolkit.models.shards import INDEX, ShardWriter
from toolkit.models.streaming import SkeletonModel, greedy_generate
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import gptq, rtn
from toolkit.pipeline.context import PassContext
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
