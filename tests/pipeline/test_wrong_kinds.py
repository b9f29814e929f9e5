"""Values of the wrong kind (issue 19), each one ``error:`` line before any work, nothing left behind: every numeric
setting of a recipe and of the command line (a NaN or infinite float, a negative count or seed, an int too large for
any setting), an export after a pass whose quantization it cannot hold, a chat template that does not parse."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import yaml

from tests.pipeline.test_recipes_pipeline import TINY_RECIPE
from tests.pipeline.test_trust import no_pass_may_run, recipe_file, refused
from toolkit.errors import ToolkitError
from toolkit.passes import PASSES, configs
from toolkit.pipeline import recipes
from toolkit.runtime import GenerationConfig
from toolkit.schema import SENTINELS, build

SECTIONS = {"calibration": recipes.CalibrationSpec, "evaluation": recipes.EvaluationSpec, "memory": recipes.MemorySpec}


def numeric_fields(cls: type) -> list[tuple[str, list[object]]]:
    """(name, values of the wrong kind) of every number setting, ``int | None`` and ``tuple[int, ...]`` included."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        kinds = {a for a in (tp, *typing.get_args(tp)) if a in (int, float)}
        if float in kinds:
            out.append((f.name, [math.nan, math.inf, -math.inf]))
        elif int in kinds:
            negative = min(f.metadata.get(SENTINELS, (0,))) - 1  # group_size: -1 means one group per row
            out.append((f.name, [negative, 2**63]))
    return out


def places() -> list[tuple[str, str, object]]:
    """(section or pass, key, bad value) for every numeric setting a recipe has."""
    out = []
    for where, cls in [*SECTIONS.items(), *(("pass:" + n, c) for n, c in configs().items())]:
        for key, values in numeric_fields(cls):
            out += [(where, key, v) for v in values]
    return out


@pytest.mark.parametrize("where, key, value", places())
def test_every_numeric_recipe_setting_refuses_nan_inf_negative_and_huge(tmp_path, where, key, value):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    settings: dict[str, object]
    if where.startswith("pass:"):
        settings = {}
        recipe["passes"] = [{where[5:]: settings}]
    else:
        settings = recipe.setdefault(where, {})
    hint = typing.get_type_hints(configs().get(where[5:]) or SECTIONS[where])[key]
    settings[key] = [value] if typing.get_origin(hint) is tuple else value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": str(tmp_path / "out")}))
    with pytest.raises(ToolkitError, match=rf"{key}(\[0\])?: (expected a finite number|expected a count|.* too large)"):
        recipes.load(path)


def test_the_audit_covers_the_settings_that_broke():
    keys = {(w, k) for w, k, _ in places()}
    assert {("memory", "budget_gb"), ("calibration", "seed"), ("pass:distill", "lr"), ("pass:gptq", "damp"),
            ("pass:onnx", "tolerance"), ("pass:rtn", "group_size")} <= keys


def test_group_size_minus_one_is_the_one_negative_that_means_something():
    config = build(configs()["gptq"], {"group_size": -1}, "r.yaml", "passes[0].gptq")
    assert config.group_size == -1
    assert [f.metadata[SENTINELS] for f in dataclasses.fields(config) if SENTINELS in f.metadata] == [(-1,)]
    with pytest.raises(ToolkitError, match=r"group_size: expected a count, size or seed >= 0 or -1, got -2"):
        build(configs()["gptq"], {"group_size": -2}, "r.yaml", "passes[0].gptq")


@pytest.mark.parametrize("budget", [".nan", ".inf", "-.inf"])
def test_run_refuses_a_non_finite_memory_budget_before_any_work(tmp_path, capsys, monkeypatch, budget):
    no_pass_may_run(monkeypatch)
    out = tmp_path / "out"
    path = recipe_file(tmp_path, out)
    path.write_text(path.read_text() + f"memory: {{budget_gb: {budget}}}\n")
    refused(capsys, "run", str(path), match="memory.budget_gb: expected a finite number")
    assert not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "temperature: expected a finite number, got nan"),
    ("--temperature", "inf", "temperature: expected a finite number, got inf"),
    ("--top-p", "nan", "top_p must be in (0, 1] (got nan)"),
    ("--repetition-penalty", "nan", "repetition_penalty: expected a finite number, got nan"),
    ("--seed", "-1", "seed: expected a count, size or seed >= 0, got -1"),
    ("--top-k", "-2", "top_k must be >= 0"),
    ("--max-new-tokens", str(2**64), "max_new_tokens: 18446744073709551616 is too large"),
])
def test_generate_refuses_wrong_kinds_of_numbers_before_loading(tmp_path, capsys, option, value, message):
    # the artifact does not exist: the settings are refused before anything is read
    refused(capsys, "generate", str(tmp_path / "none"), "--prompt", "hi", "--sample", option, value, match=message)


def test_generation_config_refuses_them_in_the_library_too():
    with pytest.raises(ToolkitError, match="temperature: expected a finite number"):
        GenerationConfig(temperature=math.nan, do_sample=True)
    with pytest.raises(ToolkitError, match="seed: expected a count"):
        GenerationConfig(seed=-1)
    assert GenerationConfig(seed=0, temperature=0.5).seed == 0


@pytest.mark.parametrize("args, message", [
    (("--count", "-3"), "count: expected a count, size or seed >= 0, got -3"),
    (("--batch-size", str(2**63)), "batch_size: 9223372036854775808 is too large"),
])
def test_eval_options_share_the_check(capsys, args, message):
    refused(capsys, "eval", "tiny-llama", *args, match=message)


def test_the_runtime_refuses_an_absurd_thread_count():
    from toolkit.runtime.backend import BackendOptions

    with pytest.raises(ToolkitError, match=r"threads must be in 1\.\.1024"):
        BackendOptions(threads=99_999_999_999)
    assert BackendOptions(threads=2).threads == 2


# ----------------------------------------------------------------------------- an export that cannot hold the passes


@pytest.mark.parametrize("quantize, export, message", [
    ({"rtn": {"bits": 3}}, "export_hf_gptq", "passes[0].rtn then export_hf_gptq: export_hf_gptq holds 2, 4, 8 bits"),
    ({"gptq": {"bits": 3, "group_size": 16}}, "export_hf_gptq", "holds 2, 4, 8 bits (the GPTQ int32 layout), not 3"),
    ({"rtn": {"bits": 3}}, "export_gguf", "passes[0].rtn then export_gguf: int3 group 32 symmetric has no GGUF block"),
    ({"rtn": {"bits": 4, "group_size": 16}}, "export_gguf", "int4 group 16 symmetric has no GGUF block type"),
    ({"awq": {"bits": 8, "symmetric": False}}, "export_gguf", "int8 group 32 asymmetric has no GGUF block type"),
    ({"gptq": {"symmetric": False}}, {"onnx": {"target": "standard"}},
     "passes[0].gptq then onnx: the standard ONNX target holds symmetric codes only (TensorRT's parser takes "
     "DequantizeLinear without zero points): quantize with symmetric: true, or export with target: ort"),
])
def test_an_export_that_cannot_hold_the_quantization_is_refused_before_any_pass(
        tmp_path, capsys, monkeypatch, quantize, export, message):
    for config in list(PASSES):
        fail = lambda *a, **k: pytest.fail("a pass ran although the recipe is refused")  # noqa: E731
        monkeypatch.setitem(PASSES, config, dataclasses.replace(PASSES[config], run=fail))
    out = tmp_path / "out"
    path = recipe_file(tmp_path, out, passes=[quantize, export if isinstance(export, dict) else {export: {}}])
    refused(capsys, "run", str(path), match=message)
    assert not out.exists()


def test_the_gptq_exporter_refuses_a_3_bit_model_it_is_given(tmp_path):
    from toolkit import models
    from toolkit.passes import export_hf_gptq, rtn

    loaded = models.load("tiny-llama")
    rtn.apply(loaded.model, rtn.RTNConfig(bits=3))
    with pytest.raises(ToolkitError, match="export_hf_gptq holds 2, 4, 8 bits .* not 3"):
        export_hf_gptq.export(loaded.model, loaded.tokenizer, export_hf_gptq.ExportHFGPTQConfig(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_exports_accept_what_they_hold():
    recipe = recipes.parse({**TINY_RECIPE, "output": "o", "passes": [{"gptq": {"bits": 2}}, {"export_hf_gptq": {}}]},
                           "r.yaml")
    assert recipe.passes[-1].name == "export_hf_gptq"
    recipes.parse({**TINY_RECIPE, "output": "o", "passes": [{"rtn": {"symmetric": False}}, {"export_gguf": {}}]}, "r")
    recipes.parse({**TINY_RECIPE, "output": "o", "passes": [{"rtn": {"bits": 3}}, {"export_compressed_tensors": {}}]},
                  "r")
    recipes.parse({**TINY_RECIPE, "output": "o", "passes": [{"rtn": {"symmetric": False}}, {"onnx": {}}]}, "r")
    recipes.parse({**TINY_RECIPE, "output": "o", "passes": [{"rtn": {}}, {"onnx": {"target": "standard"}}]}, "r")


# ----------------------------------------------------------------------------- a chat template that does not parse


@pytest.fixture
def broken_template_model(tmp_path):
    """The tiny model as a checkpoint folder whose chat_template.jinja has a syntax error."""
    from toolkit import models
    from toolkit.quant import checkpoint

    loaded = models.load("tiny-llama")
    folder = tmp_path / "model"
    checkpoint.save_model(loaded.model, loaded.tokenizer, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    return folder


def test_chat_calibration_with_a_broken_template_is_refused_before_any_pass(
        tmp_path, capsys, monkeypatch, broken_template_model):
    for config in list(PASSES):
        fail = lambda *a, **k: pytest.fail("a pass ran although the template is broken")  # noqa: E731
        monkeypatch.setitem(PASSES, config, dataclasses.replace(PASSES[config], run=fail))
    out = tmp_path / "out"
    path = recipe_file(tmp_path, out, model=str(broken_template_model),
                       calibration={"count": 4, "length": 32, "format": "chat"},
                       passes=[{"gptq": {"bits": 4}}])
    line = refused(capsys, "run", str(path), match=f"{broken_template_model / 'chat_template.jinja'}: the chat "
                   "template does not parse at line 1 (unexpected '}')")
    assert "format: text" in line
    assert not out.exists()


def test_generate_with_a_broken_template_is_refused_before_the_weights_load(
        capsys, monkeypatch, broken_template_model):
    from toolkit import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    refused(capsys, "generate", str(broken_template_model), "--prompt", "hi", "--max-new-tokens", "2",
            match=f"{broken_template_model / 'chat_template.jinja'}: the chat template does not parse at line 1")


def test_calibration_windows_name_a_template_that_fails_on_a_conversation():
    from toolkit import data
    from toolkit.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    spec = data.WindowSpec("pydoc", "calibration", 32, 2, "random", 0, "text", "chat")
    with pytest.raises(ToolkitError, match=r"the tokenizer's chat template: the chat template fails on a "
                                           r"conversation \(roles must alternate\)"):
        data.token_windows(tokenizer, spec)


def test_a_library_exception_that_is_not_an_exception_is_still_one_line(tmp_path, capsys, monkeypatch):
    from toolkit import cli

    class Panic(BaseException):  # pyo3's PanicException (a Rust panic) derives from BaseException
        pass

    def panic(args):
        raise Panic("called `Result::unwrap()` on an `Err` value\nnote: run with RUST_BACKTRACE=1")

    monkeypatch.setattr(cli, "cmd_inspect", panic)  # build_parser binds the command when main runs
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["internal error: Panic: called `Result::unwrap()` on an `Err` value (rerun with --debug for the "
                   "traceback)"]


@pytest.mark.parametrize("settings, message", [
    ({"opset": 99}, "target 'ort' takes opset 23 to"),
    ({"target": "standard", "opset": 23}, "target 'standard' takes opset 24 (TensorScatter; TensorRT's parser reads "
                                          "no later one), got 23"),
    ({"threads": 0}, "threads (onnxruntime's, for the export's self-check) must be in 1..1024, got 0"),
    ({"threads": 100_000}, "threads (onnxruntime's, for the export's self-check) must be in 1..1024, got 100000"),
])
def test_onnx_settings_out_of_range_are_refused_when_the_recipe_is_read(tmp_path, capsys, monkeypatch, settings,
                                                                        message):
    out = tmp_path / "out"
    path = recipe_file(tmp_path, out, passes=[{"onnx": settings}])
    refused(capsys, "run", str(path), match=f"passes[0].onnx: {message}")
    assert not out.exists()
