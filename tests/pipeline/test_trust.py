"""Trust (issue 12): files the toolkit did not write are never replaced, no cached file is executed, no damaged or
stale cache entry is served, the gate refuses garbage, and every refused input is one ``error:`` line with
nothing left behind."""

from __future__ import annotations

import errno
import inspect
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.pipeline.test_recipes_pipeline import TINY_RECIPE
from toolkit.cli import MESSAGE_LIMIT, main
from toolkit.errors import ToolkitError
from toolkit.evaluation import compare as gate
from toolkit.manifest import verify_tree, write_manifest
from toolkit.models.tiny import tiny_llama
from toolkit.passes import PASSES, gptq, rtn
from toolkit.pipeline import recipes, runner
from toolkit.quant import checkpoint
from toolkit.training.trainer import TrainConfig, Trainer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "compare"


def recipe_file(folder: Path, output: Path, name: str = "r.yaml", **changes: object) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**json.loads(json.dumps(TINY_RECIPE)), **changes, "output": str(output)}))
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of an in-process ``toolkit`` call (argparse exits count too)."""
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err.strip().splitlines()


def refused(capsys: pytest.CaptureFixture[str], *args: str, match: str) -> str:
    rc, lines = cli(capsys, *args)
    assert rc == 2, lines
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], lines
    assert not any("internal error" in line or "Traceback" in line for line in lines)
    assert len(lines[-1]) <= MESSAGE_LIMIT + len("error: ")
    return lines[-1]


def no_pass_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pass ran although the output was refused")

    monkeypatch.setitem(PASSES, rtn.RTNConfig, replace(PASSES[rtn.RTNConfig], run=must_not_run))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_output(tmp_path: Path, name: str = "src") -> Path:
    """A real run's output folder (model/, metrics, manifest) to use as a source or a previous output."""
    out = tmp_path / name
    runner.run(recipes.load(recipe_file(tmp_path, out, f"{name}.yaml")), progress=False, log=lambda m: None)
    return out


# ----------------------------------------------------------------------------- outputs never destroy user files


@pytest.mark.parametrize("case", ["unrelated", "model_folder", "recipe_folder", "contains_model", "in_cache",
                                  "under_file", "previous_with_user_file"])
def test_outputs_never_replace_files_the_toolkit_did_not_write(tmp_path, capsys, monkeypatch, isolated_cache, case):
    src = tiny_output(tmp_path) if case in ("model_folder", "contains_model", "previous_with_user_file") else None
    model = str(src / "model") if src and case != "previous_with_user_file" else "tiny-llama"
    if case == "unrelated":
        output = tmp_path / "photos"
        output.mkdir()
        (output / "holiday.jpg").write_bytes(b"precious")
    elif case == "model_folder":
        output = src / "model"
    elif case == "recipe_folder":
        output = tmp_path / "recipes"
        output.mkdir()
    elif case == "contains_model":
        output = tmp_path
    elif case == "in_cache":
        output = isolated_cache / "artifacts" / "x"
    elif case == "under_file":
        (tmp_path / "afile").write_text("not a folder")
        output = tmp_path / "afile" / "out"
    else:
        output = src
        (output / "notes.txt").write_text("mine")
    folder = tmp_path / "recipes" if case == "recipe_folder" else tmp_path
    folder.mkdir(exist_ok=True)
    recipe = recipe_file(folder, output, model=model)
    watched = [p for p in (tmp_path / "photos", src, tmp_path / "afile", recipe) if p is not None and p.exists()]
    before = {str(p): tree(p) if p.is_dir() else p.read_bytes() for p in watched}
    no_pass_may_run(monkeypatch)  # every path check happens before the first pass
    refused(capsys, "run", str(recipe), "--no-progress", "--overwrite", match=str(output.name))
    assert {str(p): tree(p) if p.is_dir() else p.read_bytes() for p in watched} == before
    assert not [p for p in output.parent.glob(f".{output.name}.*")]


def test_replacing_a_previous_output_needs_overwrite_and_stays_complete(tmp_path, capsys):
    out = tiny_output(tmp_path, "out")
    first = tree(out)
    recipe = tmp_path / "out.yaml"
    refused(capsys, "run", str(recipe), "--no-progress", match="--overwrite")
    assert tree(out) == first
    rc, lines = cli(capsys, "run", str(recipe), "--no-progress", "--overwrite")
    assert rc == 0, lines
    assert verify_tree(out)[1] == []


def test_refused_output_name_is_checked_before_the_model_is_converted(tmp_path, capsys, monkeypatch):
    import toolkit.models.sources as sources

    def must_not_resolve(source: str) -> None:
        raise AssertionError("the model was resolved before the output was checked")

    monkeypatch.setattr(sources, "resolve", must_not_resolve)
    monkeypatch.setattr(runner.models, "resolve", must_not_resolve)
    (tmp_path / "afile").write_text("x")
    refused(capsys, "run", str(recipe_file(tmp_path, tmp_path / "afile" / "o")), "--no-progress", match="is a file")


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", full)
    monkeypatch.setattr(runner.checkpoint, "save_model", full)
    refused(capsys, "run", str(recipe_file(tmp_path, tmp_path / "out")), "--no-progress", match="no space left")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- no pickle runs


class Payload:
    """Unpickling this writes a marker file: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 5, "trainable": Payload(marker)}, path)


def test_the_planted_pickle_is_real(tmp_path):
    plant(tmp_path / "step-0000005.pt", tmp_path / "marker")
    torch.load(tmp_path / "step-0000005.pt", weights_only=False)  # what resuming did before
    assert (tmp_path / "marker").read_text() == "pwned"


def test_planted_training_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / "ckpt" / "step-0000005.pt", marker)
    model = tiny_llama(0)
    trainer = Trainer(model, lambda ids: model(input_ids=ids, labels=ids).loss, torch.randint(0, 256, (4, 16)),
                      TrainConfig(steps=1, batch_size=2), tmp_path / "ckpt")
    with pytest.raises(ToolkitError, match="not a training checkpoint"):
        trainer.run()
    assert not marker.exists()


def test_truncated_training_checkpoint_is_one_line(tmp_path):
    model = tiny_llama(0)
    trainer = Trainer(model, lambda ids: model(input_ids=ids, labels=ids).loss, torch.randint(0, 256, (4, 16)),
                      TrainConfig(steps=2, batch_size=2, checkpoint_every=1), tmp_path)
    trainer.run()
    last = sorted(tmp_path.glob("step-*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    again = Trainer(model, lambda ids: model(input_ids=ids, labels=ids).loss, torch.randint(0, 256, (4, 16)),
                    TrainConfig(steps=3, batch_size=2, checkpoint_every=1), tmp_path)
    with pytest.raises(ToolkitError, match="truncated"):
        again.run()


def test_planted_generated_text_never_runs(tmp_path):
    from toolkit.passes import distill

    marker = tmp_path / "marker"
    cfg = distill.DistillConfig(generated_windows=1, generate_prompt_tokens=4)
    prompts = torch.randint(0, 256, (1, 4))
    key = distill.sha256_json({"prompts": prompts.tolist(), "length": 8, "t": cfg.generate_temperature,
                               "seed": cfg.seed})[:16]
    plant(tmp_path / f"generated-{key}.pt", marker)
    text = distill.teacher_text(tiny_llama(0), prompts, 8, cfg, tmp_path)
    assert text.shape == (1, 8) and not marker.exists()


# ----------------------------------------------------------------------------- verified cache


def cached_step(isolated_cache: Path) -> Path:
    (folder,) = (isolated_cache / "artifacts").iterdir()
    return folder


def list_outside(entry: Path, name: str, outside: Path) -> None:
    """Move ``entry/name`` to ``outside`` and make the entry's manifest list it there (``../x`` or absolute)."""
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / name).rename(outside)
    listed = str(outside) if outside.is_absolute() and "absolute" in outside.name else os.path.relpath(outside, entry)
    manifest["files"][listed] = manifest["files"].pop(name)
    (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra", "parent", "absolute", "symlink"])
def test_damaged_cache_entry_is_recomputed_not_served(tmp_path, isolated_cache, damage):
    recipe = recipes.load(recipe_file(tmp_path, tmp_path / "out"))
    first = runner.run(recipe, progress=False, log=lambda m: None)
    weights = cached_step(isolated_cache) / "model.safetensors"
    data = weights.read_bytes()
    if damage in ("parent", "absolute"):  # the manifest lists a file outside the entry, which matches it
        list_outside(weights.parent, weights.name, tmp_path / f"{damage}.safetensors")
    elif damage == "symlink":  # the entry's file is a link out of the entry
        weights.rename(tmp_path / "elsewhere.safetensors")
        weights.symlink_to(tmp_path / "elsewhere.safetensors")
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "delete":
        weights.unlink()
    else:
        (weights.parent / "planted.json").write_text("{}")
    logs: list[str] = []
    second = runner.run(recipe, progress=False, log=logs.append, overwrite=True)
    assert [s.cache_hit for s in second.steps] == [False]
    assert any("warning: cache entry" in m and "recomputing" in m for m in logs), logs
    assert (tmp_path / "out" / "model" / "model.safetensors").read_bytes() == data
    assert not (tmp_path / "out" / "model" / "model.safetensors").is_symlink()
    assert second.after["perplexity"] == first.after["perplexity"]
    assert verify_tree(tmp_path / "out")[1] == []


def test_edited_source_weights_are_not_served_old_results(tmp_path):
    model = saved_tiny(tmp_path / "m")
    write_manifest(model)
    first = runner.run(recipes.load(recipe_file(tmp_path, tmp_path / "a", "a.yaml", model=str(model))),
                       progress=False, log=lambda m: None)
    state = load_file(str(model / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})  # the manifest is now stale
    second = runner.run(recipes.load(recipe_file(tmp_path, tmp_path / "b", "b.yaml", model=str(model))),
                        progress=False, log=lambda m: None)
    assert not second.before["cache_hit"] and [s.cache_hit for s in second.steps] == [False]
    assert second.before["perplexity"] != first.before["perplexity"]


def test_changed_toolkit_code_is_a_cache_miss(tmp_path, monkeypatch):
    recipe = recipes.load(recipe_file(tmp_path, tmp_path / "out"))
    runner.run(recipe, progress=False, log=lambda m: None)
    monkeypatch.setattr("toolkit.manifest.code_identity", lambda: "another-version-of-the-code")
    again = runner.run(recipe, progress=False, log=lambda m: None, overwrite=True)
    assert [s.cache_hit for s in again.steps] == [False] and not again.after["cache_hit"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["versions"]["toolkit_code"] == "another-version-"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan"])
def test_damaged_evaluation_entry_is_recomputed(tmp_path, isolated_cache, damage):
    recipe = recipes.load(recipe_file(tmp_path, tmp_path / "out"))
    first = runner.run(recipe, progress=False, log=lambda m: None)
    for path in (isolated_cache / "evals").iterdir():
        text = path.read_text()
        path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\xff",
                         "nan": text.replace(str(json.loads(text)["perplexity"]), "NaN")}[damage])
    logs: list[str] = []
    second = runner.run(recipe, progress=False, log=logs.append, overwrite=True)
    assert not second.before["cache_hit"] and not second.after["cache_hit"]
    assert second.after["perplexity"] == first.after["perplexity"]
    assert sum("evaluation cache entry" in m for m in logs) == 2


def test_inspect_verify_checks_every_hash(tmp_path, capsys):
    out = tiny_output(tmp_path)
    rc, lines = cli(capsys, "inspect", str(out), "--verify")
    assert rc == 0, lines
    weights = out / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    refused(capsys, "inspect", str(out), "--verify", match="model/model.safetensors: sha256 differs")


def test_inspect_verify_refuses_a_manifest_listing_files_outside_its_folder(tmp_path, capsys):
    out = tiny_output(tmp_path)
    list_outside(out / "model", "model.safetensors", tmp_path / "x.safetensors")
    refused(capsys, "inspect", str(out), "--verify", match="x.safetensors: lies outside the folder")


# ----------------------------------------------------------------------------- the gate


def report(**changes: object) -> dict:
    base = json.loads((FIXTURES / "baseline.json").read_text())
    base.update(changes)
    return base


@pytest.mark.parametrize("candidate, message", [
    ({"metrics": {"perplexity": float("nan")}}, "candidate perplexity is nan"),
    ({"metrics": {"perplexity": float("inf")}}, "candidate perplexity is inf"),
    ({"metrics": {}}, "the candidate has none"),
    ({"latency": {"decode_ms_per_token": [float("nan")] * 5, "ttft_ms": [1.0, 2.0, 3.0]}}, "5 of 5 samples"),
    ({"latency": {}}, "lacks latency"),
])
def test_gate_refuses_garbage_with_exit_2(tmp_path, capsys, candidate, message):
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps(report(**candidate)))  # json writes NaN and Infinity
    refused(capsys, "compare", str(FIXTURES / "baseline.json"), str(cand), match=message)


def test_gate_refuses_different_models_unless_told(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(model={"source_hash": "s1", "recipe": "r", "export_hash": "e1"})))
    b.write_text(json.dumps(report(model={"source_hash": "s2", "recipe": "r", "export_hash": "e2"})))
    refused(capsys, "compare", str(a), str(b), match="different models")
    rc, _ = cli(capsys, "compare", str(a), str(b), "--allow-different-models")
    assert rc == 0
    same = tmp_path / "same.json"
    same.write_text(json.dumps(report(model={"source_hash": "s1", "recipe": "r", "export_hash": "e9"})))
    assert gate.compare(a, same).passed  # a new export of the same model is what the gate is for
    refused(capsys, "compare", str(a), str(FIXTURES / "baseline.json"), match="only the baseline")


@pytest.mark.parametrize("threshold", ["ten", "nan", "1e999%"])
def test_threshold_errors_are_one_line(capsys, threshold):
    refused(capsys, "compare", str(FIXTURES / "baseline.json"), str(FIXTURES / "baseline.json"),
            "--max-ppl-increase", threshold, match="not a fraction")


def test_bench_report_carries_the_model_identity(tmp_path):
    out = tiny_output(tmp_path)
    export = out / "model"  # any folder under a run's output
    identity = gate.model_identity(export)
    manifest = json.loads((out / "manifest.json").read_text())
    assert identity["source_hash"] == manifest["model"]["key"] and identity["recipe"]
    assert len(identity["export_hash"]) == 64


# ----------------------------------------------------------------------------- inputs checked at the door


def saved_tiny(folder: Path) -> Path:
    from toolkit import models

    loaded = models.load("tiny-llama")
    checkpoint.save_model(loaded.model, loaded.tokenizer, folder)
    return folder


@pytest.mark.parametrize("case, message", [
    ("nan", "non-finite (NaN or Inf) values in 1 tensor(s): model.layers.0.mlp.up_proj.weight"),
    ("inf", "non-finite (NaN or Inf) values in 1 tensor(s): model.norm.weight"),
    ("missing_layer", "missing model.layers.1.input_layernorm.weight"),
    ("unexpected", "unexpected extra.weight"),
])
def test_bad_weights_are_refused_naming_the_tensors(tmp_path, capsys, case, message):
    folder = saved_tiny(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    if case == "nan":
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    elif case == "inf":
        state["model.norm.weight"][3] = float("inf")
    elif case == "missing_layer":
        state = {k: v for k, v in state.items() if "layers.1." not in k}
    else:
        state["extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, "run", str(recipe_file(tmp_path, tmp_path / "out", model=str(folder))), "--no-progress",
            match=message)
    assert not (tmp_path / "out").exists()


STREAMED = {"evaluation": {"count": 2, "length": 32, "baseline": False, "kl": False}, "memory": {"activations_mb": 0}}


@pytest.mark.parametrize("path", ["streaming", "in_memory"])
@pytest.mark.parametrize("case, message", [
    ("nan", "non-finite (NaN or Inf) values in 1 tensor(s): model.layers.1.mlp.down_proj.weight"),
    ("wrong_shape", "wrong shape model.layers.1.mlp.down_proj.weight [96, 157] (expected [96, 160])"),
    ("int_dtype", "unsupported dtype model.norm.weight I32"),
    ("missing", "missing model.layers.1.input_layernorm.weight"),
])
def test_bad_weights_are_refused_alike_streamed_or_in_memory(tmp_path, capsys, monkeypatch, path, case, message):
    """One check serves both paths: the shard headers before any work, the values as they are read."""
    folder = saved_tiny(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    if case == "nan":
        state[name][5, 7] = float("nan")
    elif case == "wrong_shape":
        state[name] = state[name][:, :-3].contiguous()
    elif case == "int_dtype":
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    else:
        del state["model.layers.1.input_layernorm.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if case != "nan":  # known from the headers: refused before any pass runs
        no_pass_may_run(monkeypatch)
        monkeypatch.setitem(PASSES, rtn.RTNConfig, replace(PASSES[rtn.RTNConfig], stream=PASSES[rtn.RTNConfig].run))
    changes = STREAMED if path == "streaming" else {}  # else the baseline is evaluated in memory first
    recipe = recipe_file(tmp_path, tmp_path / "out", model=str(folder), **changes)
    refused(capsys, "run", str(recipe), "--no-progress", match=message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 2**32 - 1, "num_hidden_layers is 4294967295, but the checkpoint stores 20 tensors"),
    ("hidden_size", 96 * 2**30, "hidden_size is 103079215104, but no stored tensor has a dimension above 259"),
    ("num_attention_heads", 0, "config.json: integer modulo by zero"),  # transformers' own check, as one line
])
def test_config_sizes_the_weights_do_not_back_are_refused_before_a_model_is_built(tmp_path, capsys, monkeypatch,
                                                                                  key, value, message):
    from toolkit.models import checkpoint as float_checkpoint
    from toolkit.models import streaming

    folder = saved_tiny(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built from the lying config")

    for module in (streaming, float_checkpoint, checkpoint):
        monkeypatch.setattr(module, "empty_model", must_not_build)
    refused(capsys, "run", str(recipe_file(tmp_path, tmp_path / "out", model=str(folder), **STREAMED)),
            "--no-progress", match=message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/abs/elsewhere.safetensors"])
def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, capsys, shard):
    folder = saved_tiny(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / "model-00001-of-00001.safetensors").read_bytes())
    weight_map = dict.fromkeys(state, "model-00001-of-00001.safetensors")
    weight_map["model.norm.weight"] = shard.replace("/abs", str(tmp_path))  # read from outside the checkpoint
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, "run", str(recipe_file(tmp_path, tmp_path / "out", model=str(folder), **STREAMED)),
            "--no-progress", match="not a file of")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_float64_checkpoint_streams_as_float32(tmp_path, name):
    """A float64 checkpoint loads (converted to float32), streamed or in memory, and quantizes as float32 does."""
    f32 = saved_tiny(tmp_path / "f32")
    f64 = saved_tiny(tmp_path / "f64")
    state = load_file(str(f64 / "model.safetensors"))
    save_file({k: v.double() for k, v in state.items()}, str(f64 / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(checkpoint.load_model(f64).model.norm.weight, checkpoint.load_model(f32).model.norm.weight)
    packed = []
    for folder in (f32, f64):
        recipe = recipe_file(tmp_path, tmp_path / f"out-{folder.name}", model=str(folder),
                             passes=[{name: {"bits": 4, "group_size": 32}}], **STREAMED)
        result = runner.run(recipes.load(recipe), progress=False, log=lambda m: None)
        assert "streaming" in result.steps[0].metrics
        packed.append(load_file(str(next((result.output / "model").glob("*.safetensors")))))
    assert packed[0].keys() == packed[1].keys() and all(torch.equal(packed[0][k], packed[1][k]) for k in packed[0])


def bomb() -> str:
    names = "abcdefghi"
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, 9)]
    return "[[" + ", ".join(parts) + "]]"


@pytest.mark.parametrize("case, message", [
    ("undecodable", "not UTF-8"),
    ("alias_bomb", "each pass is a one-key mapping"),
    ("alias_bomb_value", "rtn.bits: expected int"),
    ("eval_too_long", "evaluation.length 2048 exceeds the context of tiny-llama (max_position_embeddings 1024)"),
    ("truncated_gguf", "not a readable GGUF (truncated or corrupt)"),
    ("garbage_quant", "quantization.json is not valid JSON"),
    ("wrong_quant", "'modules' must map module names"),
    ("truncated_weights", "truncated"),
])
def test_refused_inputs_print_one_line_and_leave_nothing(tmp_path, capsys, case, message):
    recipe = recipe_file(tmp_path, tmp_path / "out")
    if case == "undecodable":
        recipe.write_bytes(recipe.read_bytes() + b"\n# \xff\xfe\n")
    elif case == "alias_bomb":
        recipe.write_text(f"model: tiny-llama\noutput: {tmp_path / 'out'}\npasses: {bomb()}\n")
    elif case == "alias_bomb_value":
        recipe.write_text(f"model: tiny-llama\noutput: {tmp_path / 'out'}\npasses: [{{rtn: {{bits: {bomb()}}}}}]\n")
    elif case == "eval_too_long":
        recipe = recipe_file(tmp_path, tmp_path / "out", evaluation={"count": 1, "length": 2048})
    elif case == "truncated_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
        recipe = recipe_file(tmp_path, tmp_path / "out", model=str(tmp_path / "m.gguf"))
    else:
        src = tiny_output(tmp_path)
        model = src / "model"
        if case == "garbage_quant":
            (model / "quantization.json").write_text("garbage{")
        elif case == "wrong_quant":
            (model / "quantization.json").write_text(json.dumps({"format": checkpoint.FORMAT, "modules": {"x": 3}}))
        else:
            data = (model / "model.safetensors").read_bytes()
            (model / "model.safetensors").write_bytes(data[:-500])
            (model / "manifest.json").unlink()  # no size record to compare with: the file itself must tell
        recipe = recipe_file(tmp_path, tmp_path / "out", model=str(model))
    refused(capsys, "run", str(recipe), "--no-progress", match=message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "tiny-llama", "--count", "0"], "count >= 1"),
    (["eval", "tiny-llama", "--batch-size", "0"], "batch_size must be >= 1"),
    (["eval", "tiny-llama", "--length", "5000"], "exceeds the context"),
    (["eval", "tiny-llama", "--count", "many"], "invalid int value"),
])
def test_cli_counts_are_checked(capsys, args, message):
    refused(capsys, *args, match=message)


@pytest.mark.parametrize("tokens, message", [("0", "must be >= 1"), ("-3", "must be >= 1"),
                                             ("1000000000", "exceeds the model's context of 1024")])
def test_torch_generate_refuses_requests_that_cannot_run(tmp_path, capsys, tokens, message):
    folder = saved_tiny(tmp_path / "m")
    refused(capsys, "generate", str(folder), "--prompt", "hi", "--max-new-tokens", tokens, match=message)


def test_torch_generate_still_streams(tmp_path, capsys):
    folder = saved_tiny(tmp_path / "m")
    rc, _ = cli(capsys, "generate", str(folder), "--prompt", "hi", "--max-new-tokens", "3")
    assert rc == 0


def test_long_messages_are_capped(capsys, tmp_path):
    long = tmp_path / ("x" * 200) / ("y" * 200) / "z"
    line = refused(capsys, "inspect", str(long), match="artifact folder not found")
    assert line.endswith("characters)")
    refused(capsys, "inspect", str(tmp_path / ("x" * 300)), match="File name too long")


def test_manifest_records_versions(tmp_path):
    out = tiny_output(tmp_path)
    versions = json.loads((out / "manifest.json").read_text())["versions"]
    assert {"torch", "transformers", "onnxruntime", "numpy", "tokenizers", "python", "toolkit_code"} <= set(versions)
    assert versions["torch"] == torch.__version__
    assert versions["cpu"].startswith(torch.backends.cpu.get_cpu_capability())  # GPTQ's codes depend on it
    assert os.path.isfile(Path(__file__).parents[2] / "requirements.lock")


# ----------------------------------------------------------------------------- the spill folder


def spilling_recipe(tmp_path: Path, spill: Path, model: Path) -> Path:
    """GPTQ streamed from ``model`` with every calibration batch (one window each) spilled to ``spill``."""
    return recipe_file(tmp_path, tmp_path / "out", model=str(model), evaluation=STREAMED["evaluation"],
                       passes=[{"gptq": {"group_size": 32, "batch_size": 1}}],
                       memory={"activations_mb": 0, "spill_dir": str(spill)})


@pytest.mark.parametrize("where", ["output", "in_output", "model", "cache"])
def test_spill_folder_is_checked_before_any_work(tmp_path, capsys, monkeypatch, isolated_cache, where):
    model = saved_tiny(tmp_path / "m")
    spill = {"output": tmp_path / "out", "in_output": tmp_path / "out" / "spill", "model": model / "spill",
             "cache": isolated_cache / "spill"}[where]
    monkeypatch.setitem(PASSES, gptq.GPTQConfig, replace(PASSES[gptq.GPTQConfig], stream=PASSES[rtn.RTNConfig].run))  # must not run
    no_pass_may_run(monkeypatch)
    refused(capsys, "run", str(spilling_recipe(tmp_path, spill, model)), "--no-progress",
            match="memory.spill_dir")
    assert not (tmp_path / "out").exists() and not spill.exists()
    assert not (model / "spill").exists()


def spilled(spill: Path) -> list[Path]:
    return list(spill.rglob("activations-*")) if spill.exists() else []


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_full_disk_while_spilling_names_the_spill_folder_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                            isolated_cache, error):
    from safetensors import SafetensorError
    from safetensors.torch import save_file as real_save

    import toolkit.quant.activations as activations

    calls = []

    def fills_up(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) < 3:
            real_save(tensors, path)
            return
        Path(path).write_bytes(b"partial")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')

    monkeypatch.setattr(activations, "save_file", fills_up)
    spill = tmp_path / "scratch" / "spill"
    line = refused(capsys, "run", str(spilling_recipe(tmp_path, spill, saved_tiny(tmp_path / "m"))), "--no-progress",
                   match="the disk is full while spilling calibration activations to")
    assert str(spill) in line and "memory.spill_dir" in line and "TOOLKIT_CACHE" not in line
    assert len(calls) == 3 and not spilled(spill) and not (tmp_path / "scratch").exists()
    assert not (tmp_path / "out").exists() and not list((isolated_cache / "artifacts").glob("*"))


@pytest.mark.parametrize("when", ["capture", "layer"])
def test_interrupted_spilling_run_removes_its_activations(tmp_path, capsys, monkeypatch, when):
    """Ctrl-C while layer 0's inputs are captured, or later while a layer runs: no activations-* is left."""
    import toolkit.quant.activations as activations
    import toolkit.quant.streaming as streaming

    spill = tmp_path / "spill"
    spill.mkdir()  # the user's folder: kept, emptied of what the run put there
    if when == "capture":
        real_put, seen = activations.ActivationBuffer.put, []

        def put(self, i, t):  # type: ignore[no-untyped-def]
            real_put(self, i, t)
            seen.append(i)
            if len(seen) == 2:  # two of the four windows captured, by capture_layer_inputs
                assert not any(f.function == "advance" for f in inspect.stack())
                assert spilled(spill)  # the second batch is on disk when the interrupt comes
                raise KeyboardInterrupt

        monkeypatch.setattr(activations.ActivationBuffer, "put", put)
    else:
        def advance(*args: object) -> None:
            assert spilled(spill)
            raise KeyboardInterrupt

        monkeypatch.setattr(streaming, "advance", advance)
    rc, lines = cli(capsys, "run", str(spilling_recipe(tmp_path, spill, saved_tiny(tmp_path / "m"))), "--no-progress")
    assert rc == 130, lines
    assert spill.is_dir() and not list(spill.iterdir()) and not (tmp_path / "out").exists()
