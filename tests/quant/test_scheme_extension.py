"""Adding an activation scheme touches one file: this one. A W4A8 scheme (int4 group-32 weights, int8 dynamic
per-token input activations, compressed-tensors' ``W4A8``) and a pass config asking for it, declared as the
activation-quantizing passes (rtn, gptq) declare theirs: the scheme is checked and serialized by
``toolkit.quant.spec``, exported by ``toolkit.interop.compressed_tensors``'s mapping, computed by rtn and gptq in
memory, and refused, before any work and in one line, by every pass and export that computes with float
activations and by the layer-by-layer writers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.interop import compressed_tensors as ct
from toolkit.models.streaming import SkeletonModel
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import PASSES, Pass, awq, gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.quant.modules import quantized_modules
from toolkit.quant.spec import ActivationSpec, QuantScheme, QuantSpec
from toolkit.quant.streaming import StreamOptions

W4A8 = QuantScheme(QuantSpec(4, 32), ActivationSpec("int", 8, "token", dynamic=True))


@dataclass(frozen=True)
class W4A8Config(rtn.RTNConfig):
    """RTN's settings plus input activations: the shape an activation pass's config takes."""

    name: ClassVar[str] = "w4a8"
    input_activations: ActivationSpec | None = ActivationSpec("int", 8, "token", dynamic=True)


REFUSAL = r"^{} quantizes weights only; this W4A8 scheme also quantizes input activations \(int8 dynamic per-token\)"
ONNX_REFUSAL = r"^onnx runs quantized input activations only as W8A8 int8 .*this W4A8 scheme has int 4-bit weights"
CT_REFUSAL = "^export_compressed_tensors writes quantized activations with 8-bit per-channel symmetric weights"


def test_the_scheme_is_checked_serialized_and_named() -> None:
    assert W4A8Config().scheme == W4A8 and W4A8.name == "W4A8"
    assert QuantScheme.from_dict(W4A8.to_dict()) == W4A8
    with pytest.raises(ValueError, match="use dynamic: true"):
        W4A8Config(input_activations=ActivationSpec("int", 8, "token", dynamic=False))


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors is not "
                    "installed (pip install compressed-tensors, or the 'consumers' extra)")
def test_the_scheme_exports_as_compressed_tensors_w4a8() -> None:
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    ours = QuantizationScheme.model_validate(ct.scheme_group(W4A8, ["Linear"]))
    assert ours.input_activations == PRESET_SCHEMES["W4A8"]["input_activations"]
    assert ours.weights.num_bits == 4 and ours.weights.strategy == "group" and ours.weights.group_size == 32


def _ctx(tmp_path: Path) -> PassContext:
    def no_calibration() -> torch.Tensor:
        raise AssertionError("the pass read calibration data before refusing the scheme")

    return PassContext(tokenizer=tiny_tokenizer(), calibration_loader=no_calibration,
                       original_loader=tiny_llama, workdir=tmp_path / "work")


@pytest.mark.parametrize("module", [rtn, gptq], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_activation_passes_compute_with_it(tmp_path: Path, module: ModuleType) -> None:
    model = tiny_llama()
    ctx = PassContext(tokenizer=tiny_tokenizer(), calibration_loader=lambda: torch.randint(0, 200, (4, 16)),
                      original_loader=tiny_llama, workdir=tmp_path / "work")
    config = W4A8Config() if module is rtn else gptq.GPTQConfig(**W4A8Config().shared_settings())
    module.apply(model, config, ctx)
    body = {n: m for n, m in quantized_modules(model).items() if n != "lm_head"}
    assert body and all(m.scheme == W4A8 for m in body.values())
    assert quantized_modules(model)["lm_head"].act is None  # the head keeps float inputs
    assert not config.streams()


@pytest.mark.parametrize("module", [awq], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_weight_only_passes_refuse_it_before_any_work(tmp_path: Path, module: ModuleType) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ToolkitError, match=REFUSAL.format("w4a8")):
        module.apply(model, W4A8Config(), _ctx(tmp_path))
    assert not quantized_modules(model) and not (tmp_path / "work").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("module", [rtn, gptq, awq], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_streaming_passes_refuse_it_before_writing(tmp_path: Path, module: ModuleType) -> None:
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    with pytest.raises(ToolkitError, match=REFUSAL.format("w4a8( layer by layer)?")):
        module.stream(SkeletonModel(src), tmp_path / "out", W4A8Config(), _ctx(tmp_path), StreamOptions())
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


EXPORTS = {cls.name: record for cls, record in PASSES.items() if cls.kind == "export"}


@pytest.mark.parametrize("export", sorted(EXPORTS))
def test_exports_refuse_it_when_the_recipe_is_read(export: str) -> None:
    holds = EXPORTS[export].holds
    assert holds is not None  # every export refuses it: float activations, or (compressed-tensors) W8A8 / FP8 only
    match = {"export_compressed_tensors": CT_REFUSAL, "onnx": ONNX_REFUSAL, "export_modelopt": "^export_modelopt writes ModelOpt "
             "FP8_PER_CHANNEL_PER_TOKEN .* not this W4A8 scheme"}.get(export, REFUSAL.format(export))
    with pytest.raises(ToolkitError, match=match):
        holds(W4A8)


@pytest.mark.parametrize("export", ["export_gguf", "export_hf_gptq", "onnx"])
def test_a_recipe_with_it_before_such_an_export_is_refused_when_read(monkeypatch: pytest.MonkeyPatch,
                                                                     export: str) -> None:
    from toolkit.pipeline import recipes

    monkeypatch.setitem(PASSES, W4A8Config, Pass(rtn.apply))  # the registry entry an activation pass adds
    data = {"model": "tiny-llama", "output": "out", "passes": [{"w4a8": {}}, {export: {}}]}
    refusal = ONNX_REFUSAL[1:] if export == "onnx" else f"{export} quantizes weights only; this W4A8 scheme"
    with pytest.raises(ToolkitError, match=f"^r.yaml: passes\\[0\\].w4a8 then {export}: {refusal}"):
        recipes.parse(data, "r.yaml")
