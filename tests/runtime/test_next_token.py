"""The graph's next-token output (ArgMax over the logits): exports no longer write it, and for exports written with
it the runtime by default removes it at load (onnxruntime runs every node, and its CPU ArgMax costs more than numpy's argmax of the logits a step binds
anyway); with ``next_token=True`` it adds one to graphs without, greedy steps read only it, and every token is the
one the logits' argmax gives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama, tiny_model, tiny_tokenizer
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir
from toolkit.runtime import GenerationConfig
from toolkit.runtime.backend import BackendOptions, OrtBackend, add_next_token, drop_next_token
from toolkit.runtime.contract import EXPORT_FILE, MODEL_FILE, ExportContract, read_contract
from toolkit.runtime.engine import Engine
from toolkit.runtime.generation import SequenceState
from toolkit.runtime.tokenizer import Tokenizer

PROMPTS = ["Hello tiny world, this is a prompt", "a", "The quick brown fox jumps over", "zz top"]


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    """An export as the exporter writes it now: logits only, no ArgMax node, no next-token name."""
    out = tmp_path_factory.mktemp("next") / "plain"
    with atomic_dir(out) as tmp:
        export(tiny_llama(), tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    return out


@pytest.fixture(scope="module")
def folder(plain_folder: Path, tmp_path_factory) -> Path:
    """The same export as written while the exporter added the next-token ArgMax: its node, output and name."""
    out = tmp_path_factory.mktemp("next") / "argmax"
    out.mkdir()
    for f in plain_folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    contract = add_next_token(proto, read_contract(out))
    onnx.save_model(proto, str(out / MODEL_FILE))
    (out / EXPORT_FILE).write_text(json.dumps(contract.to_json()))
    return out


def engine_of(folder: Path, next_token: bool = True, max_batch: int = 4) -> Engine:
    backend = OrtBackend(folder, BackendOptions(threads=1, next_token=next_token))
    return Engine(backend, Tokenizer.from_folder(folder), max_batch=max_batch)


def test_exports_write_no_argmax_and_descriptions_with_one_still_read(folder, plain_folder):
    with_argmax, plain = read_contract(folder), read_contract(plain_folder)
    assert with_argmax.names.next_token == "next_token"
    assert plain.names.next_token is None
    assert ExportContract.from_json(with_argmax.to_json(), "x") == with_argmax
    assert ExportContract.from_json(plain.to_json(), "x") == plain
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    assert [n.op_type for n in graph.graph.node if "next_token" in n.output] == ["ArgMax"]
    written = onnx.load(str(plain_folder / MODEL_FILE), load_external_data=False).graph
    assert "ArgMax" not in {n.op_type for n in written.node} and [o.name for o in written.output][0] == "logits"


def test_which_argmax_each_backend_reads(folder, plain_folder):
    assert OrtBackend(folder, BackendOptions(threads=1, next_token=True)).has_next_token  # the export's own node
    added = OrtBackend(plain_folder, BackendOptions(threads=1, next_token=True))
    assert added.has_next_token and added.contract.names.next_token == "next_token"  # added at load
    assert not OrtBackend(plain_folder, BackendOptions(threads=1)).has_next_token


def test_by_default_the_export_argmax_is_removed_from_the_session(folder):
    """onnxruntime computes every node whatever outputs a call binds: the node itself must go, not just its read."""
    backend = OrtBackend(folder, BackendOptions(threads=1))
    assert not backend.has_next_token and backend.contract.names.next_token is None
    assert "next_token" not in {o.name for o in backend.session.get_outputs()}
    assert read_contract(folder).names.next_token == "next_token"  # the folder itself is untouched
    assert "next_token" in {o.name for o in onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph.output}


def test_an_output_that_is_no_plain_argmax_is_kept():
    """Only an ArgMax nothing else reads is removed: a graph whose next_token is computed otherwise, or feeds
    another node, keeps it (and the contract keeps naming it)."""
    proto, contract = _ties_model("logits")
    named = add_next_token(proto, _renamed(contract, next_token=None))
    consumer = onnx.helper.make_node("Identity", [named.names.next_token], ["copy"])
    proto.graph.node.append(consumer)
    assert drop_next_token(proto, named) is named and len(proto.graph.node) == 3
    proto.graph.node.remove(consumer)
    proto.graph.node[1].op_type = "TopK"  # not an ArgMax: another computation the graph may want
    assert drop_next_token(proto, named) is named and len(proto.graph.node) == 2
    proto.graph.node[1].op_type = "ArgMax"
    dropped = drop_next_token(proto, named)
    assert dropped.names.next_token is None and [n.op_type for n in proto.graph.node] == ["Identity"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert drop_next_token(proto, dropped) is dropped  # nothing left to remove


def _renamed(contract: ExportContract, **names: str | None) -> ExportContract:
    return dataclasses.replace(contract, names=dataclasses.replace(contract.names, **names))  # type: ignore[arg-type]


def _ties_model(logits_name: str) -> tuple[onnx.ModelProto, ExportContract]:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", 8])
    y = onnx.helper.make_tensor_value_info(logits_name, onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], [logits_name])], "g", [x], [y])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    proto.ir_version = 10
    contract = ExportContract(target="ort", model_type="llama", num_layers=1, num_heads=1, num_kv_heads=1,
                              head_dim=8, hidden_size=8, vocab_size=8, context_length=64, eos_token_ids=(0,))
    return proto, contract


def test_the_graph_argmax_takes_the_first_index_on_ties_as_numpy_does():
    proto, contract = _ties_model("logits")
    contract = add_next_token(proto, _renamed(contract, next_token=None))
    assert contract.names.next_token == "next_token"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.array([[0, 3, 3, 1, 3, 0, 0, 0],  # a three-way tie
                     [5, 5, 5, 5, 5, 5, 5, 5],  # all equal
                     [-1, -2, -1, -9, -1, -1, -1, -1],
                     [0, 0, 0, 0, 0, 0, 0, 7]], np.float32)
    got = session.run([contract.names.next_token], {"x": rows[:, None, :]})[0]
    assert got[:, 0].tolist() == rows.argmax(axis=1).tolist() == [1, 0, 0, 7]


def test_a_graph_that_uses_the_name_gets_another():
    proto, contract = _ties_model("next_token")  # its logits are called next_token
    contract = add_next_token(proto, _renamed(contract, next_token=None, logits="next_token"))
    assert contract.names.next_token == "next_token_"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(["next_token_"], {"x": np.eye(8, dtype=np.float32)[None, 2:4]})[0].tolist() == [[2, 3]]


def test_greedy_tokens_are_the_same_from_the_graph_argmax_and_from_the_logits(folder, plain_folder):
    """An export with the node, a plain export given the node at load, the first with its node removed and a
    plain export (numpy's argmax of the logits): alone and as one ragged batch, the same tokens."""
    config = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    engines = [engine_of(folder), engine_of(plain_folder), engine_of(folder, next_token=False),
               engine_of(plain_folder, next_token=False)]
    before = engines[-1]
    reference = [before.generate(p, config).token_ids for p in PROMPTS]
    assert len({tuple(t) for t in reference}) > 1  # the prompts lead somewhere different: the test can tell rows apart
    for engine in engines:
        assert [engine.generate(p, config).token_ids for p in PROMPTS] == reference
        assert [r.token_ids for r in engine.generate_batch(PROMPTS, config)] == reference


def test_greedy_steps_bind_no_logits_and_a_mixed_batch_chooses_each_row_as_alone(folder):
    engine = engine_of(folder)
    calls: list[bool] = []
    inner = engine.backend.decode_next

    def recording(tokens: np.ndarray, lengths: np.ndarray, with_logits: bool, **kw):  # type: ignore[no-untyped-def]
        calls.append(with_logits)
        return inner(tokens, lengths, with_logits, **kw)

    engine.backend.decode_next = recording  # type: ignore[method-assign]
    greedy = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    engine.generate_batch(PROMPTS, greedy)
    assert calls and not any(calls)  # greedy rows read the ids only
    configs = [greedy,
               GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, seed=3),
               GenerationConfig(max_new_tokens=12, repetition_penalty=1.3, stop_token_ids=()),
               GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=True, top_p=0.9, seed=5)]
    alone = [engine.generate(p, c).token_ids for p, c in zip(PROMPTS, configs, strict=True)]
    calls.clear()
    handles = [engine.submit(p, c, with_text=False) for p, c in zip(PROMPTS, configs, strict=True)]
    while engine.scheduler.busy:
        engine.step()
    assert [engine.result(h).token_ids for h in handles] == alone
    assert sum(calls) >= 11  # every step with a sampled or penalised row running read the logits


def _masked_greedy(backend: OrtBackend, ids: list[int], n: int, banned: tuple[int, ...]) -> list[int]:
    """Greedy as computed before the ArgMax output: every step's logits, stop ids at -inf, numpy's argmax."""
    backend.allocate(1, 128)
    logits, out = backend.prefill(0, np.array(ids, np.int64), 0), []
    for i in range(n):
        masked = logits.copy()
        masked[list(banned)] = -np.inf
        out.append(int(masked.argmax()))
        logits = backend.decode(np.array([out[-1]]), np.array([len(ids) + i]))[0]
    backend.cache = None
    return out


def test_min_new_tokens_reads_the_logits_when_the_argmax_is_a_masked_stop_id(folder, monkeypatch):
    engine = engine_of(folder, max_batch=1)
    ids = engine.encode(PROMPTS[0])
    free = engine.generate(ids, GenerationConfig(max_new_tokens=12, stop_token_ids=())).token_ids
    first = engine.generate(ids, GenerationConfig(max_new_tokens=12, min_new_tokens=12,
                                                  stop_token_ids=(free[0],))).token_ids
    step = next(i for i in range(1, 12) if first[i] not in first[:i])
    stops = (free[0], first[step])  # at decode step ``step`` the argmax is a masked stop id
    choices: list[int] = []
    inner = SequenceState.choose
    monkeypatch.setattr(SequenceState, "choose", lambda seq, logits: choices.append(1) or inner(seq, logits))
    got = engine.generate(ids, GenerationConfig(max_new_tokens=12, min_new_tokens=12, stop_token_ids=stops)).token_ids
    assert got == _masked_greedy(OrtBackend(folder, BackendOptions(threads=1, next_token=False)), ids, 12, stops)
    assert not set(stops) & set(got) and got != free
    assert 1 < len(choices) < 12  # after the prefill's choice, some decode steps (not all) read the logits


def test_greedy_rows_with_logprobs_read_the_logits_every_step(folder):
    engine = engine_of(folder, max_batch=1)
    plain = engine.generate(PROMPTS[2], GenerationConfig(max_new_tokens=10, stop_token_ids=())).token_ids
    handle = engine.submit(PROMPTS[2], GenerationConfig(max_new_tokens=10, logprobs=2, stop_token_ids=()))
    while not handle.done:
        engine.step()
    assert handle.seq.generated == plain
    assert [lp.token_id for lp in handle.seq.logprobs] == plain  # one per token, decode steps included


def _rows_against_batch(folder: Path, next_token: bool) -> None:
    """``decode_row`` against ``decode_next`` on an identical backend, token and logits bit for bit, for sequences
    that reuse row 0 after a longer and after a shorter one (the mask's ones must follow the row's length)."""
    rows, batch = (OrtBackend(folder, BackendOptions(threads=1, next_token=next_token)) for _ in range(2))
    for backend in (rows, batch):
        backend.allocate(2, 64)
    rng = np.random.default_rng(0)
    for prompt_len, steps in ((20, 12), (5, 9), (9, 30)):
        prompt = rng.integers(3, 200, prompt_len)
        token = int(rows.prefill(0, prompt, 0).argmax())
        assert token == int(batch.prefill(0, prompt, 0).argmax())
        for i in range(steps):
            length = prompt_len + i
            got, got_logits = rows.decode_row(token, length, with_logits=i % 2 == 0)
            want, want_logits = batch.decode_next(np.array([token]), np.array([length]), with_logits=i % 2 == 0)
            assert got == int(want[0])
            if i % 2 == 0:
                np.testing.assert_array_equal(got_logits, want_logits[0])
            else:
                assert got_logits is None
            token = got
    with pytest.raises(ToolkitError, match="do not fit"):
        rows.decode_row(token, 64, with_logits=False)


@pytest.mark.parametrize("next_token", [True, False])
def test_one_stream_steps_give_a_batch_steps_bits_also_after_a_longer_sequence_in_the_row(folder, next_token):
    """``decode_row``: the scheduler's call for one stream, the mask bound once at the cache's full width and
    scalars written in place."""
    _rows_against_batch(folder, next_token)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_one_stream_steps_keep_sliding_windows_and_partial_rotary(family, tmp_path):
    """The full-width mask leaves GroupQueryAttention's local window (8 and 12 keys, passed by 40 tokens) and a
    quarter-rotating longrope head (phi3) as the exact-width mask does."""
    with atomic_dir(tmp_path / family) as tmp:
        export(tiny_model(family), tiny_tokenizer(), ONNXConfig(target="ort"), tmp)
    _rows_against_batch(tmp_path / family, next_token=False)
