"""Large-model export: initializers streamed to the data file (same bytes as onnx.save_model), the export streamed
from a float or packed folder (same bytes as from memory), float16, and refused inputs leaving nothing behind."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.evaluation.streaming import stream_logits
from toolkit.onnx import decoder
from toolkit.onnx.decoder import build_model
from toolkit.onnx.external import ExternalData
from toolkit.onnx.validate import reference_logits
from toolkit.onnx.weights import LinearWeight
from toolkit.passes import PASSES
from toolkit.passes.context import PassContext
from toolkit.passes.onnx import DATA_FILE, MODEL_FILE, ONNXConfig, contract_of, export, stream
from toolkit.passes.rtn import RTNConfig
from toolkit.passes.rtn import apply as rtn_apply
from toolkit.paths import atomic_dir
from toolkit.pipeline import recipes, runner
from toolkit.quant import checkpoint
from toolkit.quant.streaming import StreamOptions
from toolkit.runtime import GenerationConfig, load

# llama: untied float head; qwen2 and gemma3: tied (a packed tied head feeds GatherBlockQuantized); gemma3 also
# has q/k norms and per-layer-type rotary caches; phi3 fused qkv and gate_up
CASES = [("llama", None), ("qwen2", 16), ("gemma3", 16), ("phi3", None)]


def _tiny(family: str, group: int | None) -> models.LoadedModel:
    loaded = models.load(f"tiny-{family}")
    if group is not None:
        rtn_apply(loaded.model, RTNConfig(bits=4, group_size=group))
    return loaded


def _digest(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in (MODEL_FILE, DATA_FILE)}


def _ctx(loaded: models.LoadedModel, tmp: Path) -> PassContext:
    return PassContext(loaded.tokenizer, lambda: None, lambda: None, tmp / "work")  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("family,group", CASES)
@pytest.mark.parametrize("target", ["ort", "standard"])
def test_streamed_initializers_are_the_bytes_onnx_save_writes(tmp_path: Path, family: str, group: int | None,
                                                              target: str) -> None:
    """The graph built in memory and saved by onnx (the exporter's former path) vs each initializer written to the
    data file as it is made: byte-identical model.onnx and model.onnx.data, and a proto without weight bytes."""
    loaded = _tiny(family, group)
    config = ONNXConfig(target=target)
    names = contract_of(loaded.model, loaded.tokenizer, config).names
    inline, streamed = tmp_path / "inline", tmp_path / "streamed"
    inline.mkdir(), streamed.mkdir()
    proto = build_model(loaded.model, config.graph_options(), names)
    onnx.save_model(proto, str(inline / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    with ExternalData(streamed / DATA_FILE, DATA_FILE) as data:
        proto = build_model(loaded.model, config.graph_options(), names, data)
    assert proto.ByteSize() < 64 * 1024 and all(len(t.raw_data) < 1024 for t in proto.graph.initializer)
    onnx.save_model(proto, str(streamed / MODEL_FILE))
    assert _digest(inline) == _digest(streamed)


@pytest.mark.parametrize("family,group", CASES[:3])
def test_export_streamed_from_a_folder_equals_the_in_memory_export(tmp_path: Path, family: str,
                                                                   group: int | None) -> None:
    loaded = _tiny(family, group)
    checkpoint.save_model(loaded.model, loaded.tokenizer, tmp_path / "src")
    with atomic_dir(tmp_path / "memory") as tmp:
        memory = export(checkpoint.load_model(tmp_path / "src"), loaded.tokenizer, ONNXConfig(), tmp)
    with atomic_dir(tmp_path / "streamed") as tmp:
        streamed = stream(checkpoint.open_streaming(tmp_path / "src"), tmp, ONNXConfig(), _ctx(loaded, tmp_path),
                          StreamOptions())
    assert _digest(tmp_path / "memory") == _digest(tmp_path / "streamed")
    assert memory["export"]["validation"] == streamed["export"]["validation"]  # the streamed reference: same logits


@pytest.mark.parametrize("family,group", [*CASES, ("gemma2", None), ("granite", 16)])
def test_streamed_reference_logits_equal_the_model_forward(tmp_path: Path, family: str, group: int | None) -> None:
    """One layer resident at a time (softcap, logit scaling and tied packed heads included) = the full forward."""
    loaded = _tiny(family, group)
    checkpoint.save_model(loaded.model, loaded.tokenizer, tmp_path / "src")
    model = checkpoint.load_model(tmp_path / "src")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 256, (1, n), dtype=np.int64) for n in (5, 11)]
    got = stream_logits(checkpoint.open_streaming(tmp_path / "src"), sequences)
    for ids, logits in zip(sequences, got, strict=True):
        np.testing.assert_allclose(logits, reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["ort", "standard"])
def test_float16_export_validates_and_runs_in_the_runtime(tmp_path: Path, target: str) -> None:
    loaded = _tiny("llama", 16)
    with atomic_dir(tmp_path / "fp16") as tmp:
        result = export(loaded.model, loaded.tokenizer, ONNXConfig(target=target, dtype="float16"), tmp)["export"]
    strict = result["validation"]["strict"]
    assert max(m["rel_rms_median"] for m in strict.values()) <= 1e-2
    assert min(m["rel_rms_median"] for m in strict.values()) > 1e-5  # float16 really rounds (not a float32 graph)
    proto = onnx.load(str(tmp_path / "fp16" / MODEL_FILE), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    out = load(tmp_path / "fp16", threads=1).generate([1, 2, 3, 4], GenerationConfig(max_new_tokens=3,
                                                                                      min_new_tokens=3))
    assert len(out.token_ids) == 3


def test_float16_strict_check_fails_a_wrong_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative float16 bound still fails an export whose codes are wrong (every nibble + 8)."""
    real = decoder.linear_weight

    def corrupt(module: torch.nn.Module) -> LinearWeight:
        w = real(module)
        return w if w.qweight is None else replace(w, qweight=w.qweight ^ 0x88)

    monkeypatch.setattr(decoder, "linear_weight", corrupt)
    loaded = _tiny("llama", 16)
    with pytest.raises(ToolkitError, match="median relative RMS"), atomic_dir(tmp_path / "bad") as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(dtype="float16"), tmp)
    assert not (tmp_path / "bad").exists()


def test_config_refuses_an_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        ONNXConfig(dtype="bfloat16")


def test_onnx_export_is_registered_as_streaming() -> None:
    assert PASSES[ONNXConfig].stream is stream


def _recipe(tmp_path: Path, model: Path) -> recipes.Recipe:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "output": str(tmp_path / "out"),
                                    "evaluation": {"count": 2, "length": 32, "baseline": False},
                                    "passes": [{"onnx": {"target": "ort", "threads": 1}}]}))
    return recipes.load(path)


def test_run_exports_a_packed_folder_layer_by_layer(tmp_path: Path, isolated_cache: Path) -> None:
    loaded = _tiny("llama", 16)
    checkpoint.save_model(loaded.model, loaded.tokenizer, tmp_path / "packed")
    lines: list[str] = []
    runner.run(_recipe(tmp_path, tmp_path / "packed"), progress=False, log=lines.append)
    assert any("onnx: running layer by layer" in line for line in lines)
    assert (tmp_path / "out" / "export" / MODEL_FILE).is_file()


def test_truncated_shard_is_one_error_and_leaves_no_output(tmp_path: Path, isolated_cache: Path) -> None:
    loaded = _tiny("llama", 16)
    checkpoint.save_model(loaded.model, loaded.tokenizer, tmp_path / "packed")
    weights = next((tmp_path / "packed").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ToolkitError, match="truncated") as info:
        runner.run(_recipe(tmp_path, tmp_path / "packed"), progress=False, log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not any((isolated_cache / "exports").glob("*"))
