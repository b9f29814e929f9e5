"""The path users take: a checkpoint folder as the hub stores it (bf16 safetensors, sharded or not), RTN int4 then
the ``ort`` export through ``toolkit run`` (both streamed layer by layer), then our runtime's greedy tokens against
transformers' on the quantized model. Untied heads (their own embedding table) and tied ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from tests.conftest import hf_greedy
from toolkit.evaluation.streaming import stream_logits
from toolkit.models.tiny import save_tiny_folder
from toolkit.onnx.external import ExternalData
from toolkit.onnx.validate import reference_logits
from toolkit.passes.onnx import MODEL_FILE
from toolkit.pipeline import recipes, runner
from toolkit.quant import checkpoint
from toolkit.runtime import GenerationConfig, load

PROMPTS = ["The quick brown fox", "0123456789abcdefghij"]
NEW_TOKENS = 16

# llama3: untied head, sharded into many files; qwen2: tied head, one file
FOLDERS = [("llama3", 20_000, False), ("qwen2", None, True)]


def _run(tmp_path: Path, model: Path, passes: list[dict]) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "output": str(tmp_path / "out"), "passes": passes,
                                    "evaluation": {"count": 2, "length": 32, "baseline": False}}))
    lines: list[str] = []
    runner.run(recipes.load(path), progress=False, log=lines.append)
    return lines


@pytest.mark.parametrize("family,shard_bytes,tied", FOLDERS)
def test_rtn_then_ort_export_of_a_bf16_folder_generates_what_transformers_does(tmp_path: Path, family: str,
                                                                                shard_bytes: int | None,
                                                                                tied: bool) -> None:
    src = save_tiny_folder(family, tmp_path / "src", shard_bytes)
    assert len(list(src.glob("*.safetensors"))) > (1 if shard_bytes else 0)
    lines = _run(tmp_path, src, [{"rtn": {"bits": 4, "group_size": 32}},
                                 {"onnx": {"target": "ort", "accuracy_level": 0, "threads": 1}}])
    assert any("rtn: running layer by layer" in line for line in lines)
    assert any("onnx: running layer by layer" in line for line in lines)
    export = tmp_path / "out" / "export"
    proto = onnx.load(str(export / MODEL_FILE), load_external_data=False)
    table = [t for t in proto.graph.initializer if t.name == "embed.weight"]
    # untied: the bf16 table is stored as it is (exact, half of float32); tied: the embedding reads the head's codes
    assert [t.data_type for t in table] == ([] if tied else [onnx.TensorProto.BFLOAT16])
    model = checkpoint.load_model(tmp_path / "out" / "model")
    engine = load(export, threads=1)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    prompts = [engine.encode(p) for p in PROMPTS]
    assert [engine.generate(ids, config).token_ids for ids in prompts] == [hf_greedy(model, ids, NEW_TOKENS)
                                                                          for ids in prompts]


def test_float_export_of_an_untied_bf16_folder_generates_what_transformers_does(tmp_path: Path) -> None:
    src = save_tiny_folder("mistral", tmp_path / "src", 20_000)
    lines = _run(tmp_path, src, [{"onnx": {"target": "ort", "threads": 1}}])
    assert any("onnx: running layer by layer" in line for line in lines)
    model = checkpoint.load_model(src)
    engine = load(tmp_path / "out" / "export", threads=1)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    prompts = [engine.encode(p) for p in PROMPTS]
    assert [engine.generate(ids, config).token_ids for ids in prompts] == [hf_greedy(model, ids, NEW_TOKENS)
                                                                          for ids in prompts]


def test_skeleton_holds_an_untied_bf16_table_as_stored_and_computes_as_float32(tmp_path: Path) -> None:
    """The streamed reference of the export: the table stays bf16 (half the bytes), its rows widened exactly."""
    src = save_tiny_folder("qwen3", tmp_path / "src")
    skeleton = checkpoint.open_streaming(src)
    assert skeleton.load(skeleton.layout.embed).weight.dtype == torch.bfloat16
    skeleton.release(skeleton.layout.embed)
    ids = np.arange(3, 40, dtype=np.int64)[None]
    np.testing.assert_allclose(stream_logits(skeleton, [ids])[0], reference_logits(checkpoint.load_model(src), ids),
                               atol=1e-4, rtol=1e-4)


def test_table_rows_are_the_bytes_move_writes_and_a_short_block_is_refused(tmp_path: Path) -> None:
    table = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    with ExternalData(tmp_path / "a.data", "a.data") as whole, ExternalData(tmp_path / "b.data", "b.data") as rows:
        moved = whole.move(numpy_helper.from_array(table, "t"))
        streamed = rows.rows("t", onnx.TensorProto.FLOAT, [300, 64], (table[r : r + 7] for r in range(0, 300, 7)))
        with pytest.raises(ValueError, match="bytes written"):
            rows.rows("u", onnx.TensorProto.FLOAT, [300, 64], [table[:10]])
    assert (tmp_path / "a.data").read_bytes() == (tmp_path / "b.data").read_bytes()[: table.nbytes]
    assert [(e.key, e.value) for e in moved.external_data] == [
        (e.key, e.value.replace("b.data", "a.data")) for e in streamed.external_data]
