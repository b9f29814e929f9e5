"""rotate: the fitted residual rotation keeps every supported family's float function (and survives a save and
reload with its untied head), refuses the others in one message, and lowers what fp8 input rounding costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_llama_with_outliers
from toolkit.algorithms.rotation import fit_rotation, rounding_surrogate
from toolkit.errors import ToolkitError
from toolkit.models.architectures import layout_of
from toolkit.models.tiny import FAMILIES, tiny_llama, tiny_model, tiny_tokenizer
from toolkit.passes import rotate
from toolkit.passes.context import PassContext
from toolkit.pipeline.recipes import parse
from toolkit.quant.arithmetic import fake_quantize_activations

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CALIB = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
FIT = rotate.RotateConfig(steps=30, lr=1e-2, windows=2)


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(tiny_tokenizer(), lambda: CALIB, lambda: tiny_llama_with_outliers(), tmp_path / "work")


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=CALIB[:2], use_cache=False).logits


def _refused(family: str) -> bool:
    arch = layout_of(tiny_model(family))
    return arch.norm_offset != 0 or bool(arch.attn_out_norm or arch.mlp_out_norm) or not arch.input_norm


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_float_logits_equal_the_originals_or_the_family_is_refused(family: str, tmp_path: Path) -> None:
    reference = _logits(tiny_model(family))
    if _refused(family):
        with pytest.raises(ToolkitError, match="rotate folds a rotation through pre-norm RMSNorms only"):
            rotate.apply(tiny_model(family), FIT, _ctx(tmp_path))
        return
    rotated = rotate.apply(tiny_model(family), FIT, _ctx(tmp_path))
    assert torch.allclose(_logits(rotated), reference, atol=1e-4 * float(reference.abs().max()))
    assert not torch.equal(rotated.get_submodule("model.embed_tokens").weight, tiny_model(family).get_submodule(
        "model.embed_tokens").weight)  # something was rotated


def test_the_untied_head_survives_save_and_reload(tmp_path: Path) -> None:
    model = tiny_llama_with_outliers()
    assert model.config.tie_word_embeddings
    rotated = rotate.apply(model, FIT, _ctx(tmp_path))
    rotated.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.allclose(_logits(reloaded), _logits(tiny_llama_with_outliers()), atol=1e-4)


def test_the_fit_is_orthogonal_and_lowers_the_surrogate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * torch.linspace(0.1, 10, 16)  # wide activation channels ...
    w = torch.randn(12, 16, generator=g) / torch.linspace(0.1, 10, 16)  # ... meeting narrow weight columns
    h, c = (x.T @ x / 256)[None].double(), (w.T @ w)[None].double()
    r = fit_rotation(h, c, steps=100, lr=1e-2)
    assert torch.allclose(r.T @ r, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert rounding_surrogate(h, c, r) < 0.9 * rounding_surrogate(h, c, torch.eye(16, dtype=torch.float64))


@torch.no_grad()
def test_rotation_lowers_the_fp8_input_rounding_error(tmp_path: Path) -> None:
    def fp8_input_error(model: torch.nn.Module) -> float:
        reference = _logits(model)
        hooks = [m.register_forward_pre_hook(lambda _, a: (fake_quantize_activations(a[0], "float", "token", None),))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        error = float((_logits(model) - reference).pow(2).mean())
        for hook in hooks:
            hook.remove()
        return error

    def rotated(steps: int) -> torch.nn.Module:  # steps 0: the norms folded, not rotated
        return rotate.apply(tiny_llama(seed=2), rotate.RotateConfig(steps=steps, lr=1e-2, windows=4), _ctx(tmp_path))

    # the fit's claim, against the same fold without it (on SmolLM2 the fold alone also helps; on
    # tiny_llama_with_outliers it hurts, and 100 steps do not win that back: benchmarks/fp8_rotation_screen.py)
    assert fp8_input_error(rotated(100)) < 0.95 * fp8_input_error(rotated(0))


def test_output_gradients_are_the_loss_gradients_at_each_readers_output() -> None:
    model = tiny_llama(seed=2)
    groups = rotate.reader_groups(layout_of(model))
    got = rotate.output_gradients(model, groups, CALIB[:2])
    q_proj = model.get_submodule("model.layers.1.self_attn.q_proj")
    seen: list[torch.Tensor] = []
    hook = q_proj.register_forward_hook(lambda _, __, y: seen.append(y))
    total = torch.zeros(q_proj.out_features, dtype=torch.float64)
    for window in CALIB[:2]:
        loss = model(input_ids=window[None], labels=window[None], use_cache=False).loss * (window.numel() - 1)
        (g,) = torch.autograd.grad(loss, seen.pop())
        total += g[0].double().pow(2).sum(0)
    hook.remove()
    # layer 1's attention group is the third entry (layer 0: attention, MLP); q_proj's rows come first in it
    assert torch.allclose(got[2][: q_proj.out_features], total / CALIB[:2].numel(), rtol=1e-4)
    assert len(got) == 2 * model.config.num_hidden_layers


@torch.no_grad()
def test_the_loss_weighted_fit_lowers_its_surrogate_and_the_fp8_input_error(tmp_path: Path) -> None:
    model = tiny_llama(seed=2)
    groups = rotate.reader_groups(layout_of(model))
    h, c = rotate.moments(model, groups, CALIB[:4], loss_weighted=True)
    r = fit_rotation(h, c, steps=60, lr=1e-2, relative=False)
    eye = torch.eye(h.shape[-1], dtype=torch.float64)
    assert rounding_surrogate(h, c, r, relative=False) < 0.95 * rounding_surrogate(h, c, eye, relative=False)
    _, plain = rotate.moments(model, groups, CALIB[:4])
    assert not torch.allclose(c, plain)  # the gradients weigh the readers' rows


def test_a_quantized_model_and_bad_settings_are_refused(tmp_path: Path) -> None:
    from toolkit.passes.rtn import RTNConfig, apply

    quantized = apply(tiny_llama_with_outliers(), RTNConfig(bits=8, group_size=-1))
    with pytest.raises(ToolkitError, match="put it before the quantization passes"):
        rotate.apply(quantized, FIT, _ctx(tmp_path))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        rotate.RotateConfig(steps=-1)
    with pytest.raises(ValueError, match="objective must be 'relative' or 'loss'"):
        rotate.RotateConfig(objective="kl")
    recipe = {"model": "tiny-llama", "output": "runs/x", "passes": [{"rotate": {"step": 3}}, {"rtn": {"bits": 8}}]}
    with pytest.raises(ToolkitError, match=r"unknown key 'passes\[0\]\.rotate\.step'"):
        parse(recipe, "recipe")
