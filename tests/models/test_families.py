"""Every supported family through every stage, on tiny seeded models with the family's quirks switched on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import hf_greedy
from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.interop import genai_probe
from toolkit.models.architectures import ARCHITECTURES, decoder_layers, layout_of, sliding_windows
from toolkit.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from toolkit.passes import awq, distill, export_hf_gptq, gptq, rtn
from toolkit.passes.context import PassContext
from toolkit.quant import checkpoint
from toolkit.quant.activations import ActivationBuffer
from toolkit.quant.calibration import capture_layer_inputs
from toolkit.quant.modules import QuantLinear, quantized_modules

torch.set_num_threads(1)

CALIB = torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(0))  # longer than every window


def ctx(family: str, tmp_path: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_model(family), tmp_path / "work")


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor = CALIB[:2]) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def layer_errors(reference: torch.nn.Module, candidate: torch.nn.Module) -> list[float]:
    """Per decoder layer: mean squared output error, both layers fed the float model's inputs to that layer."""
    inputs = capture_layer_inputs(reference, CALIB, batch_size=4)
    hidden = reference(input_ids=CALIB, use_cache=False, output_hidden_states=True).hidden_states
    errors = []
    for i, (ref_layer, layer) in enumerate(zip(decoder_layers(reference), decoder_layers(candidate), strict=True)):
        inputs.layer, inputs.hidden = i, ActivationBuffer.of(hidden[i].float().split(4))
        errors.append(sum(float(((ref_layer(h, **kw) - layer(h, **kw)) ** 2).mean()) for h, kw in inputs.batches()))
    return errors


def test_every_family_has_a_tiny_model_with_its_quirks() -> None:
    assert {layout_of(tiny_model(f).config).model_type for f in FAMILIES} == set(ARCHITECTURES)
    assert any(w is not None for w in sliding_windows(tiny_model("gemma2").config))
    for family in FAMILIES:
        model = tiny_model(family)
        layer, arch = decoder_layers(model)[0], layout_of(model)
        for name in (arch.q, arch.k, arch.v, arch.qkv, arch.o, arch.gate, arch.up, arch.gate_up, arch.down):
            if name:  # the record's bias list is what the checkpoint holds
                assert (layer.get_submodule(name).bias is not None) == (name in arch.biased), (family, name)
    assert layout_of(tiny_model("qwen2")).biased
    assert not tiny_model("mistral").config.tie_word_embeddings


QUIRKS_OFF = {  # config overrides that switch one quirk off; each must move the logits
    "llama3": [dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
    "qwen2": [dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
    "mistral": [dict(sliding_window=None)],
    "phi3": [dict(sliding_window=None)],
    "smollm3": [dict(no_rope_layers=[1, 1])],
    "granite": [dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0), dict(attention_multiplier=0.25),
                dict(logits_scaling=1.0)],
    "gemma2": [dict(sliding_window=4096), dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
               dict(query_pre_attn_scalar=16)],
    "gemma3": [dict(sliding_window=4096), dict(rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=1e6),
        "full_attention": dict(rope_type="default", rope_theta=1e6)})],
}


@pytest.mark.parametrize("family,override", [(f, o) for f, os in QUIRKS_OFF.items() for o in os], ids=str)
def test_quirks_are_sized_to_matter(family: str, override: dict) -> None:
    on, off = logits(tiny_model(family), CALIB[:1]), logits(tiny_model(family, **override), CALIB[:1])
    assert float((on - off).abs().max()) > 1e-2


@pytest.mark.parametrize("source", ["gpt2", "falcon", "mamba"])
def test_unsupported_family_is_refused_in_one_place(source: str) -> None:
    config = tiny_model("llama").config
    config.model_type = source
    with pytest.raises(ToolkitError, match=f"architecture '{source}' is not supported; supported: llama, qwen2"):
        layout_of(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_source_loads(family: str) -> None:
    loaded = models.load(f"tiny-{family}:1")
    assert torch.equal(logits(loaded.model), logits(tiny_model(family, 1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn_per_layer_and_round_trips(family: str, tmp_path: Path) -> None:
    reference = tiny_model(family)
    quantized = {"rtn": rtn.apply(tiny_model(family), rtn.RTNConfig(lm_head_bits=None)),
                 "gptq": gptq.apply(tiny_model(family), gptq.GPTQConfig(lm_head_bits=None), ctx(family, tmp_path))}
    errors = {k: layer_errors(reference, m) for k, m in quantized.items()}
    assert all(g < r for g, r in zip(errors["gptq"], errors["rtn"], strict=True)), errors
    arch = layout_of(reference)
    names = set(quantized_modules(quantized["gptq"]))
    assert f"{arch.layers}.0.{arch.attention_projections()[0]}" in names  # fused projections stay fused
    model = quantized["gptq"]
    checkpoint.save_model(model, tiny_tokenizer(), tmp_path / "saved")
    assert torch.allclose(logits(checkpoint.load_model(tmp_path / "saved")), logits(model), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_keeps_the_float_function_and_quantizes(family: str, tmp_path: Path) -> None:
    scaled = awq.apply(tiny_model(family), awq.AWQConfig(quantize=False, clip=False), ctx(family, tmp_path))
    assert torch.allclose(logits(scaled), logits(tiny_model(family)), atol=1e-4)  # scaling alone is exact
    report = (tmp_path / "work" / "awq.json").read_text()
    assert '"alpha"' in report
    model = awq.apply(tiny_model(family), awq.AWQConfig(), ctx(family, tmp_path))
    assert all(isinstance(m, QuantLinear) for m in quantized_modules(model).values()) and quantized_modules(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_shallow_keeps_the_layer_pattern(family: str, tmp_path: Path) -> None:
    teacher = tiny_model(family)
    kept = tuple(range(0, teacher.config.num_hidden_layers, 2))
    windows = sliding_windows(teacher.config)
    config = distill.DistillConfig(student="shallow", layers=kept, steps=2, batch_size=2, warmup_steps=1,
                                   eval_every=2, checkpoint_every=2, heldout_windows=2)
    student = distill.apply(tiny_model(family), config, ctx(family, tmp_path))
    assert sliding_windows(student.config) == [windows[i] for i in kept]
    assert torch.isfinite(logits(student)).all()
    checkpoint.save_model(student, tiny_tokenizer(), tmp_path / "student")
    assert torch.allclose(logits(checkpoint.load_model(tmp_path / "student")), logits(student), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_gptq(family: str, tmp_path: Path) -> None:
    model = rtn.apply(tiny_model(family), rtn.RTNConfig())
    result = export_hf_gptq.export(model, tiny_tokenizer(), export_hf_gptq.ExportHFGPTQConfig(), tmp_path / "x")
    assert result["relative_logit_error"] < 1e-2


# ---------------------------------------------------------------- ONNX exports


def export_onnx(model: torch.nn.Module, folder: Path, **config: object) -> dict:
    from toolkit.passes.onnx import ONNXConfig
    from toolkit.passes.onnx import export as onnx_export
    from toolkit.paths import atomic_dir

    with atomic_dir(folder) as tmp:
        return onnx_export(model, tiny_tokenizer(), ONNXConfig(tolerance=1e-3, threads=1, **config), tmp)["export"]


@pytest.mark.parametrize("target", ["ort", "standard"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float_export_matches_transformers(family: str, target: str, tmp_path: Path) -> None:
    """Prefill 7/13, 4 decode steps, a padded batch of 2 (15 and 10 tokens): all longer than every window."""
    result = export_onnx(tiny_model(family), tmp_path / "out", target=target, accuracy_level=0)
    worst = max(m["max_abs"] for m in result["validation"]["strict"].values())
    print(f"{family} {target} float32 max|dlogits| {worst:.2e}")
    assert worst <= 1e-3


@pytest.mark.parametrize("target", ["ort", "standard"])
@pytest.mark.parametrize("family", FAMILIES)
def test_int4_exact_exports_match_pytorch(family: str, target: str, tmp_path: Path) -> None:
    """RTN and GPTQ int4 (head int8), exported at accuracy_level 0: only summation order differs."""
    for name, model in {"rtn": rtn.apply(tiny_model(family), rtn.RTNConfig()),
                        "gptq": gptq.apply(tiny_model(family), gptq.GPTQConfig(), ctx(family, tmp_path))}.items():
        result = export_onnx(model, tmp_path / name, target=target, accuracy_level=0)
        worst = max(m["max_abs"] for m in result["validation"]["strict"].values())
        print(f"{family} {target} {name} int4 max|dlogits| {worst:.2e}")
        assert worst <= 1e-3


# ---------------------------------------------------------------- runtime and onnxruntime-genai

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Sliding windows forget the start",
           "0123456789abcdefghij"]  # 44, 33 and 20 tokens: beyond every tiny window (8-12)
NEW_TOKENS = 32


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_and_genai_greedy_equal_transformers(family: str, tmp_path: Path) -> None:
    from toolkit.runtime import GenerationConfig, load

    model = tiny_model(family)
    export_onnx(model, tmp_path / "fp32", target="ort")
    engine = load(tmp_path / "fp32", threads=1)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # eos masked, as in HF
    prompts = [engine.encode(p) for p in PROMPTS]
    ours = [engine.generate(ids, config).token_ids for ids in prompts]
    assert ours == [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]
    assert [r.token_ids for r in engine.generate_batch(prompts, config)] == ours  # ragged rows together
    if layout_of(model).genai_type is None:  # onnxruntime-genai has no model type for the family
        assert not (tmp_path / "fp32" / "genai_config.json").exists()
    else:
        assert [genai_probe.greedy(tmp_path / "fp32", ids, NEW_TOKENS) for ids in prompts] == ours
