"""compressed-tensors pack-quantized export: packing equal to compressed-tensors' own, codes bit-exact, and the
folder loaded by transformers (with compressed-tensors installed) giving the model's logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import requires_smollm2
from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.interop import compressed_tensors as ct
from toolkit.models.shards import SINGLE
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import configs
from toolkit.passes.export_compressed_tensors import ExportCompressedTensorsConfig, export
from toolkit.passes.rtn import RTNConfig
from toolkit.passes.rtn import apply as rtn_apply
from toolkit.paths import atomic_dir
from toolkit.quant.formats import CompressedTensorsPacked, ToolkitPacked
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
requires_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed "
                                 "(pip install compressed-tensors, or the 'consumers' extra)")


def tiny(bits: int = 4, group: int = 32, symmetric: bool = True) -> models.LoadedModel:
    loaded = models.load("tiny-llama")
    rtn_apply(loaded.model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric, lm_head_bits=8))
    return loaded


def run_export(loaded: models.LoadedModel, folder: Path, **config: object) -> dict:
    with atomic_dir(folder) as tmp:
        return export(loaded.model, loaded.tokenizer, ExportCompressedTensorsConfig(**config), tmp)  # type: ignore[arg-type]


def ids(shape: tuple[int, int] = (2, 19), vocab: int = 259) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips(bits: int) -> None:
    q = torch.randint(0, 2**bits, (7, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(bits, 8, symmetric=False)
    packed = CompressedTensorsPacked.pack(q, torch.ones(7, 5), q[:, :5], spec)
    codes, _, zeros = CompressedTensorsPacked.unpack(packed, spec, (7, 40))
    assert torch.equal(codes, q)
    assert torch.equal(zeros, q[:, :5])


def test_4bit_words_are_our_int4_bytes() -> None:
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = CompressedTensorsPacked.pack(q, torch.ones(3, 2), q[:, :2], QuantSpec(4, 32))["weight_packed"]
    assert torch.equal(packed.view(torch.uint8), ToolkitPacked.pack_codes(q, 4))


@requires_ct
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_equals_compressed_tensors_pack_to_int32(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(0, 2**bits, (37, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    signed = (q.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' signed convention
    packed = CompressedTensorsPacked.pack(q, torch.ones(37, 72), q, QuantSpec(bits, -1, symmetric=False))
    assert torch.equal(packed["weight_packed"], pack_to_int32(signed, bits))
    assert torch.equal(packed["weight_zero_point"], pack_to_int32(signed, bits, packed_dim=0))


# ---------------------------------------------------------------- the export

@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 32, False), (3, 16, False), (8, -1, True)])
def test_export_round_trips_the_codes(tmp_path: Path, bits: int, group: int, symmetric: bool) -> None:
    loaded = tiny(bits, group, symmetric)
    metrics = run_export(loaded, tmp_path / "out")
    assert metrics["bit_exact_codes"] and metrics["quantized_linears"] == 14
    config, packed, _ = ct.read(tmp_path / "out")
    (group_cfg,) = config["quantization_config"]["config_groups"].values()
    assert group_cfg["weights"]["strategy"] == ("channel" if group == -1 else "group")
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    q = loaded.model.model.layers[1].mlp.down_proj
    assert torch.equal(packed["model.layers.1.mlp.down_proj"].codes, q.codes())
    assert torch.equal(packed["model.layers.1.mlp.down_proj"].zeros, q.qzeros)
    state = load_file(str(tmp_path / "out" / SINGLE))
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in state) == (not symmetric)


@requires_ct
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 16, False), (4, 32, True)])
def test_compressed_tensors_decompresses_our_weights_exactly(tmp_path: Path, bits: int, group: int, symmetric: bool) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    loaded = tiny(bits, group, symmetric)
    run_export(loaded, tmp_path / "out", dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (group_cfg,) = config["quantization_config"]["config_groups"].values()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group_cfg["weights"]))
    state = load_file(str(tmp_path / "out" / SINGLE))
    prefix = "model.layers.0.self_attn.q_proj."
    local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(weight, loaded.model.model.layers[0].self_attn.q_proj.dequantized_weight())


@requires_ct
def test_quantization_config_is_what_compressed_tensors_parses() -> None:
    from compressed_tensors import QuantizationConfig

    qc = ct.quantization_config({QuantScheme(QuantSpec(4, 32, True)): ["a"]}, ["lm_head"])
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].weights.group_size == 32


def test_weight_only_config_is_unchanged_by_the_scheme() -> None:
    """The record every weight-only export wrote before schemes had activations, key for key."""
    groups = {QuantScheme(QuantSpec(4, 32, False)): ["b", "a"], QuantScheme(QuantSpec(8, -1, True)): ["c"]}
    weights = {"dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None,
               "type": "int"}
    group = {"input_activations": None, "output_activations": None, "format": "pack-quantized"}
    assert ct.quantization_config(groups, ["lm_head"]) == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["a", "b"], **group, "weights": {
                "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32, **weights}},
            "group_1": {"targets": ["c"], **group, "weights": {
                "num_bits": 8, "symmetric": True, "strategy": "channel", "group_size": None, **weights}},
        },
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


@requires_ct
@pytest.mark.parametrize("preset,scheme", [
    ("W8A8", QuantScheme(QuantSpec(8, -1), ActivationSpec("int", 8, "token", dynamic=True))),
    ("FP8_DYNAMIC", QuantScheme(QuantSpec(8, -1, type="float"), ActivationSpec("float", 8, "token", dynamic=True))),
    ("W4A16", QuantScheme(QuantSpec(4, 128))),
])
def test_a_scheme_maps_to_compressed_tensors_preset(preset: str, scheme: QuantScheme) -> None:
    """Export is a mapping: ours parses as compressed-tensors' own scheme of the same name, field for field."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    ours = QuantizationScheme.model_validate(ct.scheme_group(scheme, ["Linear"]))
    theirs = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    fields = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
    for part in ("weights", "input_activations"):
        a, b = getattr(ours, part), getattr(theirs, part)
        assert (a is None) == (b is None), part
        if a is not None:
            assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}, part


@requires_ct
def test_a_static_per_tensor_activation_scheme_parses() -> None:
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantScheme(QuantSpec(8, -1, type="float"), ActivationSpec("float", 8, "tensor", dynamic=False))
    parsed = QuantizationScheme.model_validate(ct.scheme_group(scheme, ["Linear"]))
    assert parsed.input_activations is not None and parsed.input_activations.observer == "static_minmax"
    assert parsed.input_activations.strategy == "tensor" and parsed.input_activations.dynamic is False


@requires_ct
@pytest.mark.parametrize("bits,group,dtype,tol", [(4, 32, "float32", 1e-6), (8, -1, "float32", 1e-6),
                                                   (4, 32, "float16", 2e-2)])
def test_transformers_loads_the_export_with_the_models_logits(tmp_path: Path, bits: int, group: int, dtype: str,
                                                             tol: float) -> None:
    from transformers import AutoModelForCausalLM

    loaded = tiny(bits, group, True)
    run_export(loaded, tmp_path / "out", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got = loaded.model(input_ids=ids()).logits, hf(input_ids=ids()).logits
    assert float((ref - got).abs().max() / ref.abs().max()) <= tol


@requires_ct
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_every_familys_export_with_its_quantized_logits(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    rtn_apply(model, RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8))
    with atomic_dir(tmp_path / "out") as tmp:
        metrics = export(model, tiny_tokenizer(), ExportCompressedTensorsConfig(dtype="float32"), tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = ids((2, 19), vocab=256)
    with torch.no_grad():
        ref, got, unquantized = model(input_ids=x).logits, hf(input_ids=x).logits, tiny_model(family)(input_ids=x).logits
    assert type(hf).__name__ == type(model).__name__ and metrics["relative_logit_error"] <= 1e-5
    assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-5
    # the reloaded model computes with the int4 weights: the float model is far from it
    assert float((ref - unquantized).abs().max() / ref.abs().max()) > 1e-3


def test_bfloat16_is_refused_since_it_cannot_hold_the_scales() -> None:
    assert configs()["export_compressed_tensors"] is ExportCompressedTensorsConfig
    with pytest.raises(ValueError, match="bfloat16"):
        ExportCompressedTensorsConfig(dtype="bfloat16")


def test_float_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="run rtn, gptq or awq"):
        run_export(models.load("tiny-llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- refusing broken folders

@pytest.fixture
def exported(tmp_path: Path) -> Path:
    run_export(tiny(4, 32, False), tmp_path / "out")
    return tmp_path / "out"


def one_line_refusal(folder: Path, match: str) -> None:
    with pytest.raises(ToolkitError, match=match) as err:
        ct.read(folder)
    assert "\n" not in str(err.value)


def test_truncated_weights_are_refused(exported: Path) -> None:
    path = exported / SINGLE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_refusal(exported, "truncated or corrupt")


def test_missing_files_are_refused(exported: Path) -> None:
    (exported / "config.json").unlink()
    one_line_refusal(exported, "config.json is missing")


@pytest.mark.parametrize("edit,match", [
    ("drop_zero_point", "weight_zero_point is missing"),
    ("wrong_scale_shape", "weight_scale has shape"),
    ("wrong_packed_width", "int32 words cannot hold"),
])
def test_inconsistent_tensors_are_refused(exported: Path, edit: str, match: str) -> None:
    state = load_file(str(exported / SINGLE))
    name = "model.layers.0.mlp.gate_proj"
    if edit == "drop_zero_point":
        del state[f"{name}.weight_zero_point"]
    elif edit == "wrong_scale_shape":
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"][:, :-1].contiguous()
    else:
        state[f"{name}.weight_packed"] = state[f"{name}.weight_packed"][:, :-1].contiguous()
    save_file(state, str(exported / SINGLE))
    one_line_refusal(exported, match)


def test_a_width_our_codes_cannot_have_is_refused(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 5
    (exported / "config.json").write_text(json.dumps(config))
    one_line_refusal(exported, r"inconsistent checkpoint: bits must be one of \(2, 3, 4, 8\), got 5")


def test_a_foreign_quantization_config_is_refused(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    config["quantization_config"]["format"] = "marlin-24"
    (exported / "config.json").write_text(json.dumps(config))
    one_line_refusal(exported, "not compressed-tensors pack-quantized")


@pytest.mark.slow
@requires_smollm2
@requires_ct
def test_smollm2_export_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = models.load("smollm2")
    rtn_apply(loaded.model, RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8))
    metrics = run_export(loaded, tmp_path / "out", dtype="float32")
    assert metrics["quantized_linears"] == 210
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    text = loaded.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        ref, got = loaded.model(**text).logits, hf(**text).logits
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("exporter", ["compressed_tensors", "hf_gptq"])
def test_exported_config_names_the_class_that_loads_it(tmp_path: Path, exporter: str) -> None:
    """A model made from a config has no ``architectures``; vLLM then loads the headless base model (an embedding
    runner). Both Hugging Face exporters name the causal-LM class, as save_pretrained does, and drop the path."""
    from toolkit.passes import export_hf_gptq

    model = tiny_model("qwen3")
    assert model.config.architectures is None
    rtn_apply(model, RTNConfig(bits=4, group_size=32, symmetric=True, lm_head_bits=8))
    with atomic_dir(tmp_path / "out") as tmp:
        if exporter == "compressed_tensors":
            export(model, tiny_tokenizer(), ExportCompressedTensorsConfig(dtype="float32"), tmp)
        else:
            export_hf_gptq.export(model, tiny_tokenizer(), export_hf_gptq.ExportHFGPTQConfig(), tmp)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and "_name_or_path" not in config
