"""Runtime on tiny-model graphs built by onnxruntime-genai's builder (same IO convention as our exporter).

The builder is an optional peer (``pip install onnxruntime-genai``); without it these tests skip.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import load_tiny
from toolkit.errors import ToolkitError
from toolkit.quant import checkpoint
from toolkit.runtime import ExportContract, GenerationConfig, load, read_contract, sampling
from toolkit.runtime.kv_cache import BlockPool

pytest.importorskip("onnxruntime_genai", reason="the tiny test graphs are built with onnxruntime-genai's builder")

PROMPTS = ["Hello tiny world, this is a prompt", "a", "The quick brown fox jumps over", "zz top", "0123456789"]


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def graph(tmp_path_factory, tiny) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    checkpoint.save_model(tiny.model, tiny.tokenizer, root / "hf")
    out = root / "fp32"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(root / "hf"), "-o", str(out),
           "-p", "fp32", "-e", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def engine(graph):
    return load(graph, threads=1, max_batch=3)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_prefill_logits_match_pytorch(engine, tiny):
    ids = engine.encode(PROMPTS[0])
    engine.backend.allocate(1, 64)
    logits = engine.backend.prefill(0, np.array(ids), 0).copy()
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_greedy_matches_transformers(engine, tiny):
    for prompt in PROMPTS[:3]:
        ids = engine.encode(prompt)
        got = engine.generate(prompt, GenerationConfig(max_new_tokens=24, min_new_tokens=24)).token_ids
        assert got == reference_greedy(tiny.model, ids, 24)


def test_batch_of_different_lengths_equals_each_alone(engine):
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    together = engine.generate_batch(PROMPTS, config)  # 5 requests through 3 rows: rows get reused
    alone = [engine.generate(p, config) for p in PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert engine.pool is not None and engine.pool.blocks_in_use == 0  # every row was given back


def test_ragged_batch_probe_detects_misplaced_queries(graph, monkeypatch):
    from toolkit.runtime import BackendOptions, OrtBackend

    backend = OrtBackend(graph, BackendOptions(threads=1))
    assert backend.supports_ragged_batch()
    honest = OrtBackend.decode
    # a graph that places every row's query in the last column behaves like decoding with equal lengths
    monkeypatch.setattr(OrtBackend, "decode", lambda self, t, n: honest(self, t, np.full_like(n, n.max())))
    assert not backend.supports_ragged_batch()


def test_chunked_prefill_equals_one_shot(graph):
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    whole = load(graph, threads=1).generate(PROMPTS[2], config).token_ids
    chunked = load(graph, threads=1, prefill_chunk=5).generate(PROMPTS[2], config).token_ids
    assert chunked == whole


def test_kv_buffer_written_in_place_not_reallocated(engine):
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10)
    engine.generate(PROMPTS[0], config)
    cache = engine.backend.cache
    pointers = cache.data_pointers()
    before = cache.buffers[0].copy()
    engine.generate(PROMPTS[2], config)
    assert engine.backend.cache is cache and cache.data_pointers() == pointers
    assert not np.array_equal(before, cache.buffers[0])  # the new request was written into the same memory


def test_cache_follows_request_budget(graph):
    engine = load(graph, threads=1)
    engine.generate("ab", GenerationConfig(max_new_tokens=20))
    assert engine.backend.cache.capacity == 32  # 2 + 20 rounded up to a 16-token block, not the 1024 context


def test_oversize_request_refused_at_admission(engine):
    with pytest.raises(ToolkitError, match="context"):
        engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=2000))
    pool = BlockPool(slots=2, capacity=32, block_size=16)
    with pytest.raises(ToolkitError, match="cache row holds 32"):
        pool.admit(33)
    a, b = pool.admit(20), pool.admit(5)
    assert (a, b) == (0, 1) and pool.blocks_in_use == 3 and not pool.has_free_slot()
    pool.release(a)
    assert pool.admit(32) == 0


def test_sampling_with_seed_is_reproducible(engine):
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = engine.generate(PROMPTS[0], config).token_ids
    assert engine.generate(PROMPTS[0], config).token_ids == first
    other = engine.generate(PROMPTS[0], GenerationConfig(**{**config.__dict__, "seed": 8})).token_ids
    assert other != first


def test_stop_strings_honoured_in_text_and_stream(engine):
    config = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    full = engine.generate(PROMPTS[3], config)
    stop = full.text[5:7]
    assert stop and stop in full.text
    cut = GenerationConfig(max_new_tokens=24, stop_strings=(stop,))
    result = engine.generate(PROMPTS[3], cut)
    assert result.finish_reason == "stop_string"
    assert result.text == full.text[: full.text.index(stop)]
    assert "".join(c.text for c in engine.stream(PROMPTS[3], cut)) == result.text


def test_chat_template_is_applied(engine):
    ids = engine.encode([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids) == "<|user|>hi\n<|assistant|>"


def test_top_p_and_repetition_penalty():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, _ = sampling.top_k_top_p(logits, top_k=0, top_p=0.75)
    assert ids.tolist() == [0, 1]  # 0.5 < 0.75 <= 0.8: the smallest prefix reaching top_p
    ids, _ = sampling.top_k_top_p(logits, top_k=3, top_p=1.0)
    assert ids.tolist() == [0, 1, 2]
    pen = sampling.repetition_penalty(np.array([2.0, -2.0, 1.0]), np.array([0, 1]), 2.0)
    assert pen.tolist() == [1.0, -4.0, 1.0]


def _copy(graph: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(graph, folder)
    return folder


def test_export_json_describes_the_model(graph, tmp_path):
    """Our exporter's folders carry export.json instead of genai_config.json."""
    ours = _copy(graph, tmp_path)
    (ours / "genai_config.json").unlink()
    contract = dataclasses.replace(read_contract(graph), context_length=64, eos_token_ids=(257, 5))
    (ours / "export.json").write_text(json.dumps(contract.to_json()))
    engine = load(ours, threads=1)
    assert engine.contract.eos_token_ids == (257, 5) and engine.contract.context_length == 64
    assert engine.generate("abc", GenerationConfig(max_new_tokens=4, min_new_tokens=4)).token_ids
    with pytest.raises(ToolkitError, match="context is 64"):
        engine.generate("abc", GenerationConfig(max_new_tokens=62))


def test_genai_config_reads_into_the_same_contract(graph):
    contract = read_contract(graph)
    assert (contract.num_layers, contract.num_kv_heads, contract.head_dim, contract.vocab_size) == (2, 1, 32, 259)
    assert contract.names.past(1, "value") == "past_key_values.1.value" and contract.target == "ort"
    assert ExportContract.from_json(contract.to_json(), "round trip") == contract


@pytest.mark.parametrize("version", ["llm-toolkit-onnx/0", "llm-toolkit-onnx/2", None])
def test_unknown_or_missing_format_version_is_refused(graph, tmp_path, version):
    folder = _copy(graph, tmp_path)
    facts = read_contract(graph).to_json()
    if version is None:
        del facts["format"]
    else:
        facts["format"] = version
    (folder / "export.json").write_text(json.dumps(facts))
    with pytest.raises(ToolkitError, match="re-export the model with this toolkit"):
        load(folder, threads=1)


def test_context_length_comes_from_the_graph(graph, tmp_path):
    """A description that claims more context than the rotary cache holds (1024 rows) is not trusted."""
    folder = _copy(graph, tmp_path)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["context_length"] = 4096
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="rotary cache has 1024 rows"):
        engine = load(folder, threads=1, max_batch=1)
    assert engine.contract.context_length == 1024
    with pytest.raises(ToolkitError, match="context is 1024"):
        engine.generate("abc", GenerationConfig(max_new_tokens=1100))
    assert engine.backend.cache is None  # refused before any cache was allocated or any token computed


def _generate_cli(folder: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    from toolkit.cli import main

    code = main(["generate", str(folder), "--prompt", "hi", "--threads", "1", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,message", [(("--max-new-tokens", "0"), "max_new_tokens must be >= 1"),
                                           (("--max-new-tokens", "-3"), "max_new_tokens must be >= 1"),
                                           (("--max-new-tokens", "5000"), "context is 1024")])
def test_cli_refuses_requests_that_do_not_fit_with_one_line(graph, capsys, extra, message):
    code, err = _generate_cli(graph, capsys, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def _rewrite_external(folder: Path, name: str, **entries: str) -> None:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    init = next(t for t in proto.graph.initializer if t.name == name)
    for entry in init.external_data:
        if entry.key in entries:
            entry.value = entries[entry.key]
    onnx.save(proto, str(folder / "model.onnx"))


def _largest_external(folder: Path) -> tuple[str, int, int]:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    rows = [(t.name, {e.key: e.value for e in t.external_data}) for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL]
    name, entries = max(rows, key=lambda r: int(r[1]["length"]))
    return name, int(entries.get("offset", 0)), int(entries["length"])


def test_refuses_external_data_offset_past_the_end(graph, tmp_path):
    folder = _copy(graph, tmp_path)
    name, _, _ = _largest_external(folder)
    size = (folder / "model.onnx.data").stat().st_size
    _rewrite_external(folder, name, offset=str(size))
    with pytest.raises(ToolkitError, match="truncated or belongs to another model"):
        load(folder, threads=1)


def test_refuses_external_data_length_that_does_not_match_the_shape(graph, tmp_path):
    folder = _copy(graph, tmp_path)
    name, _, length = _largest_external(folder)
    _rewrite_external(folder, name, length=str(length - 4))
    with pytest.raises(ToolkitError, match="shape needs"):
        load(folder, threads=1)


def test_refuses_truncated_data_file(graph, tmp_path):
    folder = _copy(graph, tmp_path)
    _, offset, length = _largest_external(folder)
    with open(folder / "model.onnx.data", "r+b") as f:
        f.truncate(offset + length // 2)
    with pytest.raises(ToolkitError, match="reads bytes"):
        load(folder, threads=1)


def _rewrite_location(folder: Path, location: str) -> None:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(folder / "model.onnx"))


def test_refuses_missing_external_data(graph, tmp_path):
    bad = tmp_path / "export"
    shutil.copytree(graph, bad)
    (bad / "model.onnx.data").unlink()
    with pytest.raises(ToolkitError, match="missing"):
        load(bad)


def test_refuses_external_data_outside_folder(graph, tmp_path):
    bad = tmp_path / "export"
    shutil.copytree(graph, bad)
    shutil.move(bad / "model.onnx.data", tmp_path / "weights.data")
    _rewrite_location(bad, "../weights.data")
    with pytest.raises(ToolkitError, match="outside the export folder"):
        load(bad)


@pytest.mark.slow
def test_smollm2_int4_matches_onnxruntime_genai(tmp_path):
    """Same genai-built int4 graph: our runtime and og.Generator choose the same greedy tokens."""
    import onnxruntime_genai as og

    from toolkit.models.sources import cached_gguf_checkpoint, smollm2_gguf_path

    src = cached_gguf_checkpoint(smollm2_gguf_path())
    out = tmp_path / "int4"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(src), "-o", str(out),
           "-p", "int4", "-e", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    engine = load(out, threads=2)
    result = engine.generate([{"role": "user", "content": "What is the capital of France?"}],
                             GenerationConfig(max_new_tokens=24))
    assert "Paris" in result.text
    ids = engine.encode([{"role": "user", "content": "What is the capital of France?"}])
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], np.int32))
    theirs = []
    while not gen.is_done() and len(theirs) < len(result.token_ids):
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert len(theirs) >= 8 and theirs == result.token_ids[: len(theirs)]
