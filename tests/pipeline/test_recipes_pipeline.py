import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.passes import PASSES, rtn
from toolkit.paths import sha256_file
from toolkit.pipeline import recipes, runner

TINY_RECIPE = {
    "model": "tiny-llama",
    "calibration": {"count": 4, "length": 32},
    "evaluation": {"count": 4, "length": 64},
    "passes": [{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}],
}


def write_recipe(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**recipe, "output": str(tmp_path / "out")}))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(modle="x"), r"unknown key 'modle'; allowed keys: model, calibration"),
    (lambda r: r["passes"][0]["rtn"].update(group_sise=32), r"unknown key 'passes\[0\]\.rtn\.group_sise' \(did you mean 'group_size'\?\); allowed keys: bits, group_size"),
    (lambda r: r["evaluation"].update(cuont=3), r"unknown key 'evaluation\.cuont'"),
    (lambda r: r["passes"].append({"nope": {}}), r"unknown pass 'nope'; available: .*rtn"),
    (lambda r: r["passes"][0]["rtn"].update(bits="four"), r"passes\[0\]\.rtn\.bits: expected int"),
    (lambda r: r["passes"][0]["rtn"].update(bits=5), r"bits must be one of"),
    (lambda r: r.pop("model"), r"'model' is required"),
    (lambda r: r["passes"][0]["rtn"].update(device="cuda"),
     r"passes\[0\]\.rtn\.device: the device is set once for every pass, by the recipe's top-level 'device:' key "
     r"\(auto, cpu, cuda\); move it there"),
    (lambda r: r["passes"].insert(0, {"distill": {"student": "shallow", "device": "cpu"}}),
     r"passes\[0\]\.distill\.device: .* top-level 'device:' key"),
    (lambda r: r["passes"].insert(0, {"distill": {"divergence": "kl"}}),
     r"passes\[0\]\.distill\.divergence: 'kl' is not one of \['forward_kl', 'reverse_kl', 'jsd'\]"),
    (lambda r: r["calibration"].update(sampling="shuffled"),
     r"calibration\.sampling: 'shuffled' is not one of \['sequential', 'random'\]"),
    (lambda r: r["passes"].insert(0, {"awq": {"bits": 4, "group_size": 16, "quantize": False}}),
     r"passes\[0\]\.awq: awq searched its scales for bits 4, group_size 16, symmetric true but rtn quantizes with "
     r"bits 4, group_size 32, symmetric true; give both passes the same bits, group_size and symmetric"),
    (lambda r: r["passes"].insert(0, {"awq": {"symmetric": False, "quantize": False}}),
     r"awq searched its scales for bits 4, group_size 32, symmetric false but rtn quantizes with .* symmetric true"),
])
def test_recipe_errors_name_file_key_and_choices(tmp_path, mutate, message):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    mutate(recipe)
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(ToolkitError, match=message) as info:
        recipes.load(path)
    assert str(path) in str(info.value)


def test_recipe_lists_become_tuples(tmp_path):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["passes"][0]["rtn"]["skip"] = ["model.layers.0.*"]
    loaded = recipes.load(write_recipe(tmp_path, recipe))
    assert loaded.passes[0].config == rtn.RTNConfig(4, 32, True, ("model.layers.0.*",), 8)


def test_awq_then_a_quantizer_with_its_format_is_read(tmp_path):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["passes"] = [{"awq": {"bits": 4, "group_size": 32, "quantize": False}}, {"distill": {}},
                        {"gptq": {"bits": 4, "group_size": 32}}]
    loaded = recipes.load(write_recipe(tmp_path, recipe))
    assert [s.name for s in loaded.passes] == ["awq", "distill", "gptq"]
    recipe["passes"][0]["awq"]["quantize"] = True  # AWQ quantized itself: a later pass may use another format
    recipe["passes"][2]["gptq"]["bits"] = 8
    assert recipes.load(write_recipe(tmp_path, recipe)).passes[2].config.bits == 8


def test_shipped_recipes_parse():
    for path in sorted(Path(__file__).parents[2].glob("recipes/*.yaml")):
        recipe = recipes.load(path)
        assert recipe.passes, path


def test_rerun_is_served_from_cache_and_changes_recompute(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, TINY_RECIPE)
    first = runner.run(recipes.load(path), progress=False, log=lambda m: None)
    assert [s.cache_hit for s in first.steps] == [False]
    assert first.after["perplexity"] > 0 and first.after["bytes"] < first.before["bytes"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the pass ran although its output was cached")

    monkeypatch.setitem(PASSES, rtn.RTNConfig, replace(PASSES[rtn.RTNConfig], run=must_not_run))
    second = runner.run(recipes.load(path), progress=False, log=lambda m: None, overwrite=True)
    assert [s.cache_hit for s in second.steps] == [True]
    assert second.after["cache_hit"] and second.after["perplexity"] == first.after["perplexity"]

    monkeypatch.setitem(PASSES, rtn.RTNConfig, replace(PASSES[rtn.RTNConfig], run=rtn.apply))
    changed = json.loads(json.dumps(TINY_RECIPE))
    changed["passes"][0]["rtn"]["group_size"] = 16
    third = runner.run(recipes.load(write_recipe(tmp_path, changed, "r2.yaml")), progress=False, log=lambda m: None,
                       overwrite=True)
    assert [s.cache_hit for s in third.steps] == [False]
    assert third.after["perplexity"] != first.after["perplexity"]


def test_second_pass_change_recomputes_only_from_there(tmp_path):
    two = json.loads(json.dumps(TINY_RECIPE))
    two["passes"] = [{"rtn": {"bits": 8, "group_size": 32}}, {"rtn": {"bits": 4, "group_size": 32}}]
    runner.run(recipes.load(write_recipe(tmp_path, two)), progress=False, log=lambda m: None)
    two["passes"][1]["rtn"]["symmetric"] = False
    result = runner.run(recipes.load(write_recipe(tmp_path, two, "r2.yaml")), progress=False, log=lambda m: None,
                        overwrite=True)
    assert [s.cache_hit for s in result.steps] == [True, False]


def test_manifest_hashes_every_file(tmp_path):
    result = runner.run(recipes.load(write_recipe(tmp_path, TINY_RECIPE)), progress=False, log=lambda m: None)
    manifest = json.loads((result.output / "manifest.json").read_text())
    # the manifest records every setting, defaults included
    assert manifest["recipe"]["passes"] == [{"rtn": {"bits": 4, "group_size": 32, "symmetric": True,
                                                     "skip": [], "lm_head_bits": 8, "type": "int", "strategy": "group",
                                                     "input_activations": None}}]
    assert "torch" in manifest["versions"] and manifest["steps"][0]["name"] == "rtn"
    assert "peak_rss_mb" in manifest["steps"][0] and "seconds" in manifest["steps"][0]
    assert {"before", "after"} <= set(manifest["metrics"])
    for name, entry in manifest["files"].items():
        assert sha256_file(result.output / name) == entry["sha256"]
    assert "model/model.safetensors" in manifest["files"]


def test_failed_pass_leaves_no_output(tmp_path, monkeypatch):
    def explode(model, config, ctx):
        raise RuntimeError("interrupted mid-pass")

    monkeypatch.setitem(PASSES, rtn.RTNConfig, replace(PASSES[rtn.RTNConfig], run=explode))
    with pytest.raises(RuntimeError):
        runner.run(recipes.load(write_recipe(tmp_path, TINY_RECIPE)), progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["unknown_key", "missing_model", "bad_group", "truncated", "bad_yaml"])
def test_cli_refuses_bad_input_with_one_line_and_no_output(tmp_path, case):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    if case == "unknown_key":
        recipe["passes"][0]["rtn"]["bitz"] = 4
    elif case == "missing_model":
        recipe["model"] = str(tmp_path / "no-such-model")
    elif case == "bad_group":
        recipe["passes"][0]["rtn"]["group_size"] = 64  # the tiny model's dims are 96 and 160
    elif case == "truncated":
        assert main(["run", str(write_recipe(tmp_path, TINY_RECIPE)), "--no-progress",
                     "--output", str(tmp_path / "src")]) == 0
        weights = tmp_path / "src" / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        recipe["model"] = str(tmp_path / "src" / "model")
    path = write_recipe(tmp_path, recipe)
    if case == "bad_yaml":
        path.write_text("model: [unclosed\n")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr
    expected = {"unknown_key": "bitz", "missing_model": "model not found", "bad_group": "valid choices: 8, 16, 32",
                "truncated": "truncated", "bad_yaml": "not valid YAML"}[case]
    assert expected in last
    assert not (tmp_path / "out").exists()


def test_cli_inspect_and_eval(tmp_path):
    assert main(["run", str(write_recipe(tmp_path, TINY_RECIPE)), "--no-progress"]) == 0
    proc = run_cli("inspect", str(tmp_path / "out"))
    assert proc.returncode == 0 and "perplexity" in proc.stdout and "model/model.safetensors" in proc.stdout
    proc = run_cli("eval", "tiny-llama", "--count", "2", "--length", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["windows"]["count"] == 2
    assert run_cli("inspect", str(tmp_path / "nothing")).returncode == 2


def test_recipe_with_onnx_export_and_generate_from_the_output(tmp_path):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["passes"].append({"onnx": {"target": "ort"}})
    assert main(["run", str(write_recipe(tmp_path, recipe)), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert (out / "export" / "model.onnx").is_file() and (out / "model" / "quantization.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["rtn", "onnx"]
    proc = run_cli("generate", str(out), "--prompt", "hi", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "4 generated" in proc.stderr


def test_export_must_be_last(tmp_path):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["passes"].insert(0, {"onnx": {"target": "ort"}})
    with pytest.raises(ToolkitError, match=r"export step 'onnx' must be the last pass"):
        recipes.load(write_recipe(tmp_path, recipe))


def test_recipe_quantize_then_distill_through_the_pipeline(tmp_path):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["calibration"] = {"count": 8, "length": 64, "sampling": "sequential"}
    recipe["passes"].append({"distill": {"student": "quantized", "steps": 3, "batch_size": 2, "heldout_windows": 2,
                                         "lr": 0.01, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}})
    result = runner.run(recipes.load(write_recipe(tmp_path, recipe)), progress=False, log=lambda m: None)
    assert [s.name for s in result.steps] == ["rtn", "distill"]
    assert (result.output / "model" / "quantization.json").is_file()  # the student stays packed int4
    rtn_only = runner.run(recipes.load(write_recipe(tmp_path, TINY_RECIPE, "rtn.yaml")), progress=False,
                            log=lambda m: None, overwrite=True)
    assert result.after["perplexity"] != rtn_only.after["perplexity"]  # training changed the student


def test_exports_name_the_model_not_the_folder_it_was_read_from(tmp_path):
    """GGUF's general.name is the recipe's model and compressed-tensors' config.json holds no local path: the
    bytes of an export do not depend on the cache folder (or machine) the model was read from."""
    import gguf

    recipe = {**TINY_RECIPE, "evaluation": {"count": 1, "length": 32, "baseline": False}}
    for export in ("export_gguf", "export_compressed_tensors"):
        options = {"pre_tokenizer": "default"} if export == "export_gguf" else {}
        recipe["passes"] = [{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}, {export: options}]
        (tmp_path / export).mkdir()
        folder = runner.run(recipes.load(write_recipe(tmp_path / export, recipe)), progress=False).output
        folder = folder / "export" if (folder / "export").is_dir() else folder
        if export == "export_gguf":
            reader = gguf.GGUFReader(next(folder.glob("*.gguf")))
            field = reader.fields["general.name"]
            assert bytes(field.parts[field.data[0]]).decode() == "tiny-llama"
        else:
            config = (folder / "config.json").read_text()
            assert "_name_or_path" not in config and str(tmp_path) not in config
