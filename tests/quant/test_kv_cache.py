"""The fp8 KV cache in the PyTorch model (``toolkit.quant.kv_cache``, the ``kv_cache`` pass): calibrated scales,
the model computing with rounded keys and values, the packed checkpoint, and the recipe surface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.pipeline.test_recipes_pipeline import TINY_RECIPE, write_recipe
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.models.tiny import FAMILIES, tiny_llama, tiny_model, tiny_tokenizer
from toolkit.passes import kv_cache as kv_pass
from toolkit.passes import rtn
from toolkit.passes.context import PassContext
from toolkit.pipeline import recipes, runner
from toolkit.quant import checkpoint, kv_cache
from toolkit.quant.arithmetic import FP8_MAX
from toolkit.quant.spec import ActivationSpec, KVCacheSpec

IDS = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))


def _ctx(tmp_path: Path, family: str = "llama") -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: IDS, lambda: tiny_model(family), tmp_path / "work")


def _fp8(model):
    rtn.apply(model, rtn.RTNConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                                   input_activations=ActivationSpec("float", 8, "token", True)))
    return model


@torch.no_grad()
def test_scales_are_max_abs_over_448_of_keys_after_rope_and_of_values(tmp_path):
    model = tiny_llama().eval()
    attn0 = model.model.layers[0].self_attn
    normed = []
    handle = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out))
    model(IDS)
    handle.remove()
    x = normed[0]  # [B, S, H], what layer 0's projections read
    k = attn0.k_proj(x).view(*x.shape[:2], -1, attn0.head_dim).transpose(1, 2)
    q = attn0.q_proj(x).view(*x.shape[:2], -1, attn0.head_dim).transpose(1, 2)
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cos, sin = model.model.rotary_emb(x, positions)
    _, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
    v = attn0.v_proj(x)
    kv_pass.apply(model, kv_pass.KVCacheConfig(), _ctx(tmp_path))
    k_scale, v_scale = kv_cache.scales(model)["model.layers.0.self_attn"]
    assert k_rope.abs().amax() != k.abs().amax()  # RoPE changes the maximum: the scale must see rotated keys
    torch.testing.assert_close(k_scale, (k_rope.abs().amax() / FP8_MAX).reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(v_scale, (v.abs().amax() / FP8_MAX).reshape(1), rtol=1e-6, atol=0)
    assert json.loads((tmp_path / "work" / "kv_cache.json").read_text())["layer 0"]["max_abs_key"] > 0


class RoundingCache(DynamicCache):
    """An independent reference: transformers' own cache, rounding what it stores with the model's scales."""

    def __init__(self, scales, **kw):
        super().__init__(**kw)
        self.pairs = list(scales.values())

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_scale, v_scale = self.pairs[layer_idx]
        return super().update(kv_cache.fp8_round(key_states, k_scale), kv_cache.fp8_round(value_states, v_scale),
                              layer_idx, *args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@torch.no_grad()
def test_model_computes_with_the_fp8_rounded_cache(tmp_path, family):
    model = tiny_model(family).eval()
    plain = model(IDS).logits
    kv_pass.apply(model, kv_pass.KVCacheConfig(), _ctx(tmp_path, family))
    ours = model(IDS).logits
    reference_model = tiny_model(family).eval()
    reference_model.set_attn_implementation(model.config._attn_implementation.removeprefix(kv_cache.PREFIX))
    cache = RoundingCache({n: (k.clone(), v.clone()) for n, (k, v) in kv_cache.scales(model).items()},
                          config=reference_model.config)
    reference = reference_model(IDS, cache=cache, use_cache=True).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 100 * (ours - reference).abs().max().clamp(min=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_wrapper_delegates_to_the_model_own_attention(family):
    """While calibrating nothing is rounded: the wrapped model gives the float model's logits bit for bit (Gemma 2's
    soft-capping eager attention, sliding windows and NoPE layers included)."""
    model = tiny_model(family).eval()
    plain = model(IDS).logits
    kv_cache.install(model, KVCacheSpec())
    observers = []
    for m in kv_cache.attention_modules(model):
        m.kv_observer = kv_cache.Observer()
        observers.append(m.kv_observer)
    assert torch.equal(model(IDS).logits, plain)
    assert all(o.k > 0 and o.v > 0 for o in observers)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_family_saves_and_reloads_with_its_cache(tmp_path, family):
    model = _fp8(tiny_model(family).eval())
    kv_pass.apply(model, kv_pass.KVCacheConfig(), _ctx(tmp_path, family))
    checkpoint.save_model(model, tiny_tokenizer(), tmp_path / "out")
    record = checkpoint.PackedCheckpoint.read(tmp_path / "out")
    assert record.format == checkpoint.FORMAT and record.kv_cache == KVCacheSpec()
    back = checkpoint.load_model(tmp_path / "out")
    for (n, (k, v)), (n2, (k2, v2)) in zip(kv_cache.scales(model).items(), kv_cache.scales(back).items(), strict=True):
        assert n == n2 and torch.equal(k, k2) and torch.equal(v, v2) and float(k) != 1.0
    back.set_attn_implementation(model.config._attn_implementation)
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_a_float_model_with_an_fp8_cache_is_a_packed_checkpoint(tmp_path):
    model = tiny_llama().eval()
    kv_pass.apply(model, kv_pass.KVCacheConfig(), _ctx(tmp_path))
    checkpoint.save_model(model, tiny_tokenizer(), tmp_path / "out")
    back = checkpoint.load_model(tmp_path / "out")
    assert kv_cache.spec_of(back) == KVCacheSpec() and not checkpoint.PackedCheckpoint.read(tmp_path / "out").modules
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"format": checkpoint.FORMAT, "modules": {}, "embedding_from": None, "kv_cache": {"type": "int", "bits": 8}},
     "fp8 e4m3 with one scale per tensor"),
    ({"format": checkpoint.FORMAT, "modules": {}, "embedding_from": None, "kv_cache": "fp8"},
     "expected a mapping or null"),
    ({"format": checkpoint.V3, "modules": {}, "embedding_from": None, "kv_cache": None},
     "has no 'kv_cache'"),
])
def test_a_bad_kv_cache_record_is_refused(record, message):
    with pytest.raises(ToolkitError, match=message):
        checkpoint.PackedCheckpoint.from_json(json.dumps(record))


@pytest.mark.parametrize("settings, message", [
    ({"type": "int"}, "'int' is not one of ['float']"),
    ({"bits": 4}, "use type: float, bits: 8"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"dtype": "fp8"}, "dtype"),
])
def test_a_recipe_with_a_bad_kv_cache_value_is_refused_in_one_line(tmp_path, capsys, settings, message):
    recipe = {**TINY_RECIPE, "output": str(tmp_path / "out"),
              "passes": [TINY_RECIPE["passes"][0], {"kv_cache": settings}]}
    assert main(["run", str(write_recipe(tmp_path, recipe)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "kv_cache" in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("later, message", [
    ({"rtn": {"bits": 8}}, "put kv_cache after the model passes"),
    ({"onnx": {}}, "onnx does not write an fp8 KV cache"),
])
def test_kv_cache_refuses_what_cannot_follow_it(tmp_path, later, message):
    recipe = {**TINY_RECIPE, "passes": [TINY_RECIPE["passes"][0], {"kv_cache": {}}, later]}
    with pytest.raises(ToolkitError, match=message):
        recipes.load(write_recipe(tmp_path, recipe))


def test_the_pipeline_evaluates_and_caches_the_model_with_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    recipe = {**TINY_RECIPE, "output": str(tmp_path / "out"),
              "passes": [{"rtn": {"bits": 8, "group_size": -1, "type": "float", "lm_head_bits": None,
                                  "input_activations": {"type": "float", "strategy": "token"}}},
                         {"kv_cache": {"type": "float", "bits": 8}},
                         {"export_compressed_tensors": {}}]}
    result = runner.run(recipes.load(write_recipe(tmp_path, recipe)), progress=False, log=lambda m: None)
    config = json.loads((result.output / "export" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["type"] == "float"
    assert "fp8_kv" not in json.dumps(config)  # the wrapper's name stays out of what consumers read
    assert checkpoint.PackedCheckpoint.read(result.output / "model").kv_cache == KVCacheSpec()
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["rtn", "kv_cache", "export_compressed_tensors"]


@pytest.mark.parametrize("consumer", ["onnx", "export_gguf"])
def test_exports_with_a_float_cache_refuse_a_model_with_an_fp8_one(tmp_path, consumer):
    from toolkit.passes import onnx
    from toolkit.quant.modules import check_weight_only

    model = tiny_llama().eval()
    kv_pass.apply(model, kv_pass.KVCacheConfig(), _ctx(tmp_path))
    with pytest.raises(ToolkitError, match="keeps a float KV cache"):
        if consumer == "onnx":
            onnx.check_model(model, onnx.ONNXConfig())
        else:
            check_weight_only(model, consumer)
