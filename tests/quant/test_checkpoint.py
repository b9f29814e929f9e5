"""The packed-checkpoint record (``quantization.json``): one writer for both paths, one checked reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.quant.test_streaming import write_sharded
from toolkit.errors import ToolkitError
from toolkit.models.shards import INDEX
from toolkit.models.streaming import SkeletonModel
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import rtn
from toolkit.paths import atomic_dir
from toolkit.quant import checkpoint
from toolkit.quant.checkpoint import FILE, FORMAT, PackedCheckpoint, PackedLinear
from toolkit.quant.formats import packed_width
from toolkit.quant.modules import QuantLinear
from toolkit.quant.spec import QuantSpec
from toolkit.quant.streaming import StreamOptions, stream_rtn

# quantization.json exactly as the toolkit wrote it before the record existed (format llm-toolkit-packed-v1)
V1_TEXT = """{
  "embedding_from": "lm_head",
  "format": "llm-toolkit-packed-v1",
  "modules": {
    "lm_head": {
      "bias": false,
      "bits": 8,
      "group_size": 16,
      "in_features": 64,
      "out_features": 256,
      "symmetric": true
    },
    "model.layers.0.self_attn.q_proj": {
      "bias": true,
      "bits": 4,
      "group_size": -1,
      "in_features": 64,
      "out_features": 64,
      "symmetric": false
    }
  }
}"""


def test_the_v1_record_loads_and_writes_back_byte_identical() -> None:
    record = PackedCheckpoint.from_json(V1_TEXT)
    assert record.format == checkpoint.V1 != FORMAT and record.embedding_from == "lm_head"
    assert record.modules["model.layers.0.self_attn.q_proj"] == PackedLinear(4, -1, False, 64, 64, True)
    assert record.modules["lm_head"].spec == QuantSpec(bits=8, group_size=16, symmetric=True)
    assert record.to_json() == V1_TEXT


def test_in_memory_and_streaming_writers_write_the_same_record(tmp_path: Path) -> None:
    config = rtn.RTNConfig(bits=4, group_size=32, lm_head_bits=8)
    source = write_sharded(tiny_llama(seed=3), tmp_path / "src", torch.float32)
    with atomic_dir(tmp_path / "memory") as tmp:
        checkpoint.save_model(rtn.apply(checkpoint.load_model(source), config), tiny_tokenizer(), tmp)
    (tmp_path / "streamed").mkdir()
    stream_rtn(SkeletonModel(source), tmp_path / "streamed", config, StreamOptions(max_shard_bytes=20_000))
    assert (tmp_path / "streamed" / INDEX).is_file() and not (tmp_path / "memory" / INDEX).is_file()
    memory, streamed = (PackedCheckpoint.read(tmp_path / d) for d in ("memory", "streamed"))
    assert memory == streamed and memory.embedding_from == "lm_head" and memory.modules["lm_head"].bits == 8
    assert (tmp_path / "memory" / FILE).read_bytes() == (tmp_path / "streamed" / FILE).read_bytes()


def test_the_record_round_trips_and_rebuilds_the_model(tmp_path: Path) -> None:
    model = rtn.apply(tiny_llama(seed=1), rtn.RTNConfig(bits=3, group_size=16, symmetric=False, lm_head_bits=8))
    record = PackedCheckpoint.of_model(model)
    assert PackedCheckpoint.from_json(record.to_json()) == record
    with atomic_dir(tmp_path / "art") as tmp:
        checkpoint.save_model(model, tiny_tokenizer(), tmp)
    assert checkpoint.is_packed(tmp_path / "art") and PackedCheckpoint.read(tmp_path / "art") == record
    loaded = checkpoint.load_model(tmp_path / "art")
    assert PackedCheckpoint.of_model(loaded) == record
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_packed_width_is_the_layouts(bits: int) -> None:
    layer = QuantLinear(48, 5, QuantSpec(bits=bits, group_size=16))
    assert layer.qweight.shape == (5, packed_width(bits, 48)) == (5, 24 if bits <= 4 else 48)
    codes = torch.randint(0, 2**bits, (5, 48), dtype=torch.uint8)
    assert torch.equal(QuantLinear.from_codes(codes, torch.ones(5, 3), torch.zeros(5, 3), layer.spec, None).codes(),
                       codes)


def _modules(**change: object) -> str:
    entry = {"bits": 4, "group_size": 16, "symmetric": True, "in_features": 64, "out_features": 64, "bias": False}
    return json.dumps({"format": FORMAT, "modules": {"q": {**entry, **change}}, "embedding_from": None})


@pytest.mark.parametrize(("text", "message"), [
    (V1_TEXT[: len(V1_TEXT) // 2], "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "unknown format 'list'"),
    (V1_TEXT.replace("llm-toolkit-packed-v1", "llm-toolkit-packed-v9"), "unknown format 'llm-toolkit-packed-v9'"),
    (json.dumps({"format": FORMAT, "modules": {"x": 3}}), "'modules' must map module names"),
    (json.dumps({"format": FORMAT}), "'modules' must map module names"),
    (_modules(bits="4"), "'modules' must map module names"),
    (_modules(bias=None), "'modules' must map module names"),
    (_modules(bits=True), "'modules' must map module names to {bits, group_size, symmetric, in_features, out_"),
    (_modules().replace('"embedding_from": null', '"embedding_from": []'), "'embedding_from' is \\[\\]"),
    (_modules().replace('"embedding_from": null', '"embedding_from": "lm_head"'), "'embedding_from' is 'lm_head'"),
    (_modules(zero=8), r"module 'q' of a llm-toolkit-packed-v4 record: unknown keys \['zero'\]"),
    (_modules(type="fp4"), "module 'q' .*weight type must be 'int' or 'float'"),
    (_modules(input_activations={"strategy": "token", "dynamic": False}), "module 'q' .*use dynamic: true"),
    (_modules(type="float").replace(FORMAT, checkpoint.V1), r"llm-toolkit-packed-v1 record: unknown keys \['type'\]"),
    (_modules(type="float", group_size=-1, strategy="tensor").replace(FORMAT, checkpoint.V2),
     r"llm-toolkit-packed-v2 record: unknown keys \['strategy'\]"),
    (_modules(strategy="tensor"), "module 'q' .*strategy: tensor\\) is for fp8 weights"),
])
def test_a_malformed_record_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ToolkitError, match=message) as info:
        PackedCheckpoint.from_json(text, "art/quantization.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("art/quantization.json")
    assert "re-create the artifact" in str(info.value)


def test_a_truncated_record_refuses_the_load_before_any_model_is_built(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = rtn.apply(tiny_llama(seed=1), rtn.RTNConfig())
    with atomic_dir(tmp_path / "art") as tmp:
        checkpoint.save_model(model, tiny_tokenizer(), tmp)
    path = tmp_path / "art" / FILE
    path.write_bytes(path.read_bytes()[:-40])
    monkeypatch.setattr(checkpoint, "empty_model", lambda *a: pytest.fail("a model was built"))
    for load in (checkpoint.load_model, checkpoint.open_streaming, checkpoint.check_weights):
        with pytest.raises(ToolkitError, match=f"{FILE} is not valid JSON"):
            load(tmp_path / "art")


def test_an_unreadable_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"\xff\xfe not text")
    with pytest.raises(ToolkitError, match="cannot be read \\(UnicodeDecodeError\\); re-create the artifact"):
        PackedCheckpoint.read(tmp_path)


def test_a_module_the_model_lacks_is_refused_on_install(tmp_path: Path) -> None:
    record = PackedCheckpoint.from_json(_modules().replace('"q"', '"model.layers.9.nothing"'))
    with pytest.raises(ToolkitError, match="module 'model.layers.9.nothing' does not fit the model"):
        record.install(tiny_llama(seed=1), tmp_path / FILE)
