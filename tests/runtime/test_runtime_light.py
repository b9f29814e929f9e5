"""What a deployment imports: the runtime without torch, its tokenizer and chat template equal to transformers'."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2
from toolkit.errors import ToolkitError
from toolkit.runtime import ExportContract, Tokenizer, read_contract
from toolkit.runtime.contract import EXPORT_FILE, FORMAT

TEXTS = ["Hello tiny world, this is a prompt", "", "  spaces\tand\nnewlines ", "ünïcödé ✓ 漢字", "<s>inline</s>"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "and now?"}],
]
HEAVY = ("torch", "transformers")


def loaded_heavy_modules(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the torch / transformers modules it left in sys.modules."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')))


def test_importing_the_runtime_loads_no_torch() -> None:
    assert loaded_heavy_modules("import toolkit.runtime") == []


def assert_same_as_transformers(hf, folder: Path) -> None:  # type: ignore[no-untyped-def]
    ours = Tokenizer.from_folder(folder)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for chat in CHATS:
        for prompt in (False, True):
            expected = hf.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == expected


def test_tokenizer_and_chat_template_equal_transformers_on_the_tiny_tokenizer(tmp_path: Path) -> None:
    from toolkit.models.tiny import tiny_tokenizer

    hf = tiny_tokenizer()
    hf.save_pretrained(str(tmp_path))
    assert_same_as_transformers(hf, tmp_path)


def test_tokenizer_without_chat_template_refuses_messages(tmp_path: Path) -> None:
    from toolkit.models.tiny import tiny_tokenizer

    hf = tiny_tokenizer()
    hf.chat_template = None
    hf.save_pretrained(str(tmp_path))
    with pytest.raises(ToolkitError, match="no chat template"):
        Tokenizer.from_folder(tmp_path).apply_chat_template(CHATS[0])


BROKEN = {"syntax": ("{% for m in messages %}{{ m.content }", "does not parse at line 1 (unexpected '}')"),
          "unclosed": ("{% for m in messages %}\n{{ m.content }}\n", "does not parse at line 2 (Unexpected end of template"),
          "types": ("{{ messages + 1 }}", "refused these messages")}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("where", ["file", "config"])
def test_a_broken_chat_template_is_one_line_naming_its_file(tmp_path: Path, case: str, where: str) -> None:
    from toolkit.models.tiny import tiny_tokenizer

    template, message = BROKEN[case]
    hf = tiny_tokenizer()
    hf.save_pretrained(str(tmp_path))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    if where == "file":
        (tmp_path / "chat_template.jinja").write_text(template)
        source = tmp_path / "chat_template.jinja"
    else:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        source = tmp_path / "tokenizer_config.json"
    with pytest.raises(ToolkitError, match=f"^{source}: the chat template") as info:
        Tokenizer.from_folder(tmp_path).apply_chat_template(CHATS[0])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert Tokenizer.from_folder(tmp_path).encode("plain text still works") if case == "types" else True


@pytest.mark.slow
@requires_smollm2
def test_tokenizer_and_chat_template_equal_transformers_on_smollm2(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from toolkit.models.sources import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    hf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.save_pretrained(str(tmp_path))
    assert_same_as_transformers(hf, tmp_path)


def contract(**changes: object) -> ExportContract:
    base = ExportContract(target="ort", model_type="llama", num_layers=2, num_heads=3, num_kv_heads=1, head_dim=32,
                          hidden_size=96, vocab_size=259, context_length=1024, eos_token_ids=(257,), pad_token_id=258)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_contract_round_trips_through_export_json(tmp_path: Path) -> None:
    for c in (contract(), contract(eos_token_ids=(2, 7), target="standard", share_buffer=False, padding="left")):
        (tmp_path / EXPORT_FILE).write_text(json.dumps(c.to_json()))
        assert read_contract(tmp_path) == c
    assert contract().to_json()["format"] == FORMAT


def test_contract_refuses_what_it_cannot_describe(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="target"):
        contract(target="tensorrt")
    with pytest.raises(ToolkitError, match="num_layers"):
        contract(num_layers=0)
    facts = contract().to_json()
    del facts["num_kv_heads"]
    (tmp_path / EXPORT_FILE).write_text(json.dumps(facts))
    with pytest.raises(ToolkitError, match="does not give 'num_kv_heads'"):
        read_contract(tmp_path)
    (tmp_path / EXPORT_FILE).write_text("{not json")
    with pytest.raises(ToolkitError, match="not valid JSON"):
        read_contract(tmp_path)
    (tmp_path / EXPORT_FILE).unlink()
    with pytest.raises(ToolkitError, match="neither export.json nor genai_config.json"):
        read_contract(tmp_path)


@pytest.mark.parametrize("max_new_tokens,message", [("0", "max_new_tokens must be >= 1"),
                                                    ("1000000000", "context of 1024")])
def test_pytorch_generate_refuses_requests_that_do_not_fit(capsys, max_new_tokens: str, message: str) -> None:
    """The PyTorch path (any model `toolkit run` accepts) refuses them too, with one line, instead of hanging."""
    from toolkit.cli import main

    assert main(["generate", "tiny-llama", "--prompt", "hi", "--max-new-tokens", max_new_tokens]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_a_tokenizer_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    from toolkit.models.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ToolkitError, match="tokenizer_config.json holds a JSON list, not an object"):
        Tokenizer.from_folder(tmp_path)


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic in tokenizers or safetensors: a BaseException, not an Exception, of this
    name in module pyo3_runtime (each extension has its own class, so a panic is known by name)."""


PanicException.__module__ = "pyo3_runtime"


def test_a_panic_while_reading_the_tokenizer_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenizers

    from toolkit.models.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(tmp_path))

    def panic(path: str) -> None:
        raise PanicException("called `Option::unwrap()` on a `None` value\nstack backtrace: ...")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", panic)
    with pytest.raises(ToolkitError, match=r"cannot load the tokenizer from .*a library panicked: called "
                                           r"`Option::unwrap\(\)` on a `None` value\)$"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-30])
def test_a_tiny_temperature_samples_the_top_token_instead_of_nan(temperature: float) -> None:
    import numpy as np

    from toolkit.runtime import sampling

    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.0, -5.0], np.float32)
    assert {sampling.sample(logits, temperature, 0, 1.0, rng) for _ in range(20)} == {1}
    assert {sampling.sample(logits, temperature, 2, 0.5, rng) for _ in range(5)} == {1}
    at_one = {sampling.sample(logits, 1.0, 0, 1.0, rng) for _ in range(200)}
    assert at_one == {0, 1, 2}  # an ordinary temperature still samples (the -5 logit is ~0.03 %)
