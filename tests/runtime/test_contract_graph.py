"""An export description that lies about its graph is refused when the folder is opened (issue 19).

A wrong layer count, head count, KV head count, head size, vocabulary or hidden size in ``export.json`` (or
onnxruntime-genai's ``genai_config.json``) used to surface as a GroupQueryAttention error in the middle of
generation; values of the wrong kind (2.5 layers, "no" for a boolean) were silently rounded or read as true.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from toolkit import models
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime import load, read_contract


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our exporter's folder of the tiny Llama: 2 layers, 3 heads, 1 KV head, head size 32, hidden 96, vocab 259."""
    folder = tmp_path_factory.mktemp("contract") / "ort"
    loaded = models.load("tiny-llama")
    with atomic_dir(folder) as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    return folder


def edited(src: Path, tmp_path: Path, file: str, edit: Any) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(src, folder)
    if file == "genai_config.json":
        (folder / "export.json").unlink()  # the folder is then read as onnxruntime-genai's
    data = json.loads((folder / file).read_text())
    edit(data)
    (folder / file).write_text(json.dumps(data))
    return folder


LIES = [  # (export.json key, the lie, what the graph has)
    ("num_layers", 3, 2), ("num_layers", 1, 2), ("num_heads", 4, 3), ("num_kv_heads", 2, 1), ("head_dim", 16, 32),
    ("vocab_size", 300, 259), ("hidden_size", 64, 96),
]


def test_the_tiny_export_opens_as_written(tiny_export):
    contract = read_contract(tiny_export)
    assert [contract.dimensions()[k] for k, _, _ in LIES] == [truth for _, _, truth in LIES]
    assert load(tiny_export, threads=1).contract.num_layers == 2


@pytest.mark.parametrize("key, lie, truth", LIES)
def test_export_json_dimensions_the_graph_contradicts_are_refused(tiny_export, tmp_path, capsys, key, lie, truth):
    folder = edited(tiny_export, tmp_path, "export.json", lambda d: d.update({key: lie}))
    with pytest.raises(ToolkitError, match=f"export.json says {key} {lie} but model.onnx has {truth} "):
        load(folder, threads=1)
    assert main(["generate", str(folder), "--prompt", "hi", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"says {key} {lie} but model.onnx has {truth}" in err[0]


GENAI = {"num_layers": ("decoder", "num_hidden_layers"), "num_heads": ("decoder", "num_attention_heads"),
         "num_kv_heads": ("decoder", "num_key_value_heads"), "head_dim": ("decoder", "head_size"),
         "hidden_size": ("decoder", "hidden_size"), "vocab_size": ("model", "vocab_size")}


@pytest.mark.parametrize("key, lie, truth", LIES)
def test_genai_config_dimensions_the_graph_contradicts_are_refused(tiny_export, tmp_path, key, lie, truth):
    section, name = GENAI[key]

    def edit(d: dict) -> None:
        (d["model"]["decoder"] if section == "decoder" else d["model"])[name] = lie

    folder = edited(tiny_export, tmp_path, "genai_config.json", edit)
    with pytest.raises(ToolkitError, match=f"genai_config.json says {key} {lie} but model.onnx has {truth} "):
        load(folder, threads=1)


@pytest.mark.parametrize("changes, message", [
    ({"num_layers": 2.5}, r"export.json has a malformed value \(expected an integer, got '2.5'\)"),
    ({"num_kv_heads": True}, r"export.json has a malformed value \(expected an integer, got 'True'\)"),
    ({"past_present_share_buffer": "no"}, r"malformed value \(expected true or false, got 'no'\)"),
    ({"eos_token_id": [257, 999]}, r"export.json: export description gives eos_token_id 999, outside the vocabulary"),
    ({"pad_token_id": -1}, r"gives pad_token_id -1, outside the vocabulary of 259"),
    ({"model_file": "../model.onnx"}, r"model file '../model.onnx', which is not a file name in the export folder"),
    ({"model_type": 7}, r"export description gives no text for model_type"),
    ({"accuracy_level": 7}, r"export.json: export description gives accuracy_level 7; MatMulNBits takes 0..4"),
    ({"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                 "past_key": "past.key", "past_value": "past_key_values.%d.value"}},
     r"past_key must name one tensor per layer with one %d"),
    ({"outputs": {"logits": "scores", "present_key": "present.%d.key", "present_value": "present.%d.value"}},
     r"export.json names tensors model.onnx does not have \(scores\)"),
])
def test_export_json_values_of_the_wrong_kind_are_refused(tiny_export, tmp_path, changes, message):
    folder = edited(tiny_export, tmp_path, "export.json", lambda d: d.update(changes))
    with pytest.raises(ToolkitError, match=message):
        load(folder, threads=1)


@pytest.mark.parametrize("max_batch", [0, -2])
def test_a_batch_of_no_rows_is_refused(tiny_export, max_batch):
    with pytest.raises(ToolkitError, match=f"max_batch and block_size must be >= 1 \\(got {max_batch}, 16\\)"):
        load(tiny_export, threads=1, max_batch=max_batch)
