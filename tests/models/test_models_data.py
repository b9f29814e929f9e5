import pytest
import torch

from toolkit import data, models
from toolkit.errors import ToolkitError
from toolkit.evaluation import perplexity
from toolkit.manifest import write_manifest
from toolkit.passes import rtn
from toolkit.paths import atomic_dir
from toolkit.quant import checkpoint
from toolkit.quant.modules import QuantEmbedding, QuantLinear


def test_calibration_and_evaluation_halves_never_share_a_document():
    docs = data.pydoc_documents()
    calib = set(data.split_documents(docs, "calibration"))
    evals = set(data.split_documents(docs, "evaluation"))
    assert len(docs) == 79 and len(evals) == 39
    assert not calib & evals and calib | evals == set(docs)  # 'else' and 'if' share one text
    assert data.split_text(docs, "evaluation").startswith(docs[1])


def test_windows_shapes_and_determinism(tiny):
    spec = data.WindowSpec(split="calibration", length=64, count=5, sampling="random", seed=3)
    a = data.token_windows(tiny.tokenizer, spec)
    b = data.token_windows(tiny.tokenizer, spec)
    assert a.shape == (5, 64) and torch.equal(a, b)
    seq = data.token_windows(tiny.tokenizer, data.WindowSpec(length=32, count=3))
    assert seq.shape == (3, 32)


def test_chat_windows_start_at_conversations(tiny):
    tok = tiny.tokenizer
    docs = data.split_documents(data.pydoc_documents(), "calibration")
    convs = data.conversations(docs, 600)
    assert len(convs) > len(docs) and all(c[0]["role"] == "user" and c[1]["content"] for c in convs)
    assert convs[0][0]["content"] == docs[0].partition("\n")[0].strip()  # the title asked, its underline dropped
    assert not convs[0][1]["content"].startswith("*")
    spec = data.WindowSpec(split="calibration", length=64, count=12, sampling="random", seed=1, format="chat")
    windows = data.token_windows(tok, spec)
    assert windows.shape == (12, 64) and torch.equal(windows, data.token_windows(tok, spec))
    assert len({tuple(w) for w in windows.tolist()}) == 12  # distinct conversations while there are enough
    prefix = tok(str(tok.apply_chat_template(convs[0][:1], tokenize=False)), add_special_tokens=False)["input_ids"][:3]
    assert all(w[:3] == prefix for w in windows.tolist())  # every window opens with the template's first tokens


def test_chat_format_needs_a_chat_template(tiny):
    tok = tiny.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ToolkitError, match="chat template"):
            data.token_windows(tok, data.WindowSpec(split="calibration", length=32, count=2, format="chat"))
    finally:
        tok.chat_template = template
    with pytest.raises(ValueError, match="format must be one of"):
        data.WindowSpec(format="markdown")


def test_too_few_tokens_is_a_clear_error(tiny):
    with pytest.raises(ToolkitError, match="fewer than"):
        data.token_windows(tiny.tokenizer, data.WindowSpec(length=4096, count=1000))


def test_local_text_files_through_datasets(tiny, tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 50)
    spec = data.WindowSpec(source=str(tmp_path), split="evaluation", length=16, count=4)
    assert data.token_windows(tiny.tokenizer, spec).shape == (4, 16)


def test_missing_data_file_is_refused(tiny):
    with pytest.raises(ToolkitError, match="not found"):
        data.token_windows(tiny.tokenizer, data.WindowSpec(source="./nope/data.jsonl"))


def test_model_against_itself_has_zero_kl(tiny):
    windows = data.token_windows(tiny.tokenizer, data.WindowSpec(length=32, count=2))
    m = perplexity.evaluate(tiny.model, windows, reference=tiny.model)
    assert m["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0 and m["perplexity"] > 1


def test_quantized_artifact_round_trip_is_exact(tiny, tmp_path):
    model = rtn.apply(tiny.model, rtn.RTNConfig(bits=4, group_size=16))
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.bits == 8
    with atomic_dir(tmp_path / "art") as tmp:
        checkpoint.save_model(model, tiny.tokenizer, tmp)
        write_manifest(tmp)
    loaded = checkpoint.load(str(tmp_path / "art"))
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert loaded.model.get_input_embeddings().weight_source is loaded.model.lm_head


def test_truncated_weights_are_refused(tiny, tmp_path):
    folder = tmp_path / "art"
    with atomic_dir(folder) as tmp:
        checkpoint.save_model(rtn.apply(tiny.model, rtn.RTNConfig()), tiny.tokenizer, tmp)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ToolkitError, match="truncated or corrupt"):
        checkpoint.load(str(folder))


def test_unknown_sources_get_one_clear_line():
    with pytest.raises(ToolkitError, match="model not found"):
        models.load("./does/not/exist")
    with pytest.raises(ToolkitError, match="unreachable"):
        models.load("someorg/some-model")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
