"""Distillation pass, KD math and the resumable training loop, on tiny seeded Llamas."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toolkit.algorithms.distillation import hidden_state_map, kept_layers, logit_divergence
from toolkit.errors import ToolkitError
from toolkit.models.tiny import tiny_llama, tiny_tokenizer
from toolkit.passes import PASSES, configs, distill, rtn
from toolkit.passes.context import PassContext
from toolkit.quant import checkpoint
from toolkit.quant.modules import FP8Linear, quantized_linears, quantized_modules
from toolkit.quant.spec import ActivationSpec
from toolkit.training.trainer import TrainConfig, Trainer, batch_indices, checkpoints, lr_factor

torch.set_num_threads(2)

FAST = dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=3, checkpoint_every=2, heldout_windows=2)


def calibration(count: int = 10, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def context(workdir: Path, teacher_layers: int = 2, calib: torch.Tensor | None = None) -> PassContext:
    windows = calibration() if calib is None else calib
    return PassContext(tiny_tokenizer(), lambda: windows,
                       lambda: tiny_llama(0, num_hidden_layers=teacher_layers), workdir)


def quantized_tiny() -> torch.nn.Module:
    return rtn.apply(tiny_llama(0), rtn.RTNConfig(bits=4, group_size=32))


def scales_state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: (m.qweight.clone(), m.qzeros.clone(), m.scales.clone()) for n, m in quantized_modules(model).items()}


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_registration():
    cfg = distill.DistillConfig(student="shallow", layers=(0, 2), divergence="jsd", steps=7, lr=5e-4)
    assert distill.DistillConfig(**asdict(cfg)) == cfg
    assert cfg.train_config == TrainConfig(steps=7, lr=5e-4, batch_size=4, warmup_steps=10)
    assert PASSES[distill.DistillConfig].run is distill.apply and configs()["distill"] is distill.DistillConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(student="tiny"), "student must be one of"),
    (dict(student="shallow", layers=(0, 2), keep_every=2), "either layers or keep_every"),
    (dict(keep_every=2), "set student: shallow"),
    (dict(student="shallow", layers=(2, 0)), "ascending"),
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(kd_weight=0.0), "at least one > 0"),
    (dict(lr=3.0), "typical values"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(student="shallow", train_codes=True), "train_codes retrains a quantized student"),
])
def test_config_refuses_with_a_hint(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distill.DistillConfig(**kwargs)


# ----------------------------------------------------------------------------- math


def test_divergences():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    assert torch.allclose(logit_divergence(s, t, "forward_kl"), expected, atol=1e-6)
    assert torch.allclose(logit_divergence(s, t, "reverse_kl"), logit_divergence(t, s, "forward_kl"), atol=1e-6)
    jsd = logit_divergence(s, t, "jsd")
    assert torch.allclose(jsd, logit_divergence(t, s, "jsd"), atol=1e-6) and 0 < float(jsd) <= math.log(2)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(logit_divergence(s, s, kind, temperature=2.0)) == pytest.approx(0, abs=1e-6)


def test_shallow_layer_selection_and_hidden_map():
    assert kept_layers(30, (), 2) == tuple(range(0, 30, 2))
    assert kept_layers(6, (0, 3, 5), None) == (0, 3, 5)
    # student layer 1 (teacher 3) ends where the teacher's layer 5 begins; final outputs match
    assert hidden_state_map((0, 3, 5), 6) == {1: 3, 2: 5, 3: 6}


def test_schedule_and_data_order():
    cfg = TrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) > lr_factor(15, cfg)
    epoch = torch.cat([batch_indices(s, 0, 10, replace(cfg, batch_size=2)) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(10))  # each epoch visits every window once
    assert torch.equal(batch_indices(7, 0, 10, cfg), batch_indices(7, 0, 10, cfg))


# ----------------------------------------------------------------------------- students


def test_shallow_student_keeps_layers_and_saves_like_llama(tmp_path):
    cfg = distill.DistillConfig(student="shallow", keep_every=2, hidden_weight=1.0, **FAST)
    student = distill.apply(tiny_llama(0, num_hidden_layers=4), cfg, context(tmp_path / "work", 4))
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = calibration(1, 12)
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    checkpoint.save_model(student, tiny_tokenizer(), tmp_path / "out")
    loaded = checkpoint.load_model(tmp_path / "out")
    assert loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, logits, atol=1e-5)
    assert student.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_quantized_student_trains_only_float_state(tmp_path):
    model = quantized_tiny()
    before = scales_state(model)
    norms = [p.clone() for p in model.parameters()]
    student = distill.apply(model, distill.DistillConfig(**FAST), context(tmp_path))
    after = scales_state(student)
    head = "lm_head"
    for name, (qw, qz, sc) in before.items():
        assert torch.equal(after[name][0], qw) and torch.equal(after[name][1], qz), name  # codes and zeros
        assert after[name][2].dtype == torch.float16
        assert torch.equal(after[name][2], sc) == (name == head), name  # head scales frozen by default
    assert not any("parametrizations" in n for n, _ in student.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(norms, student.parameters(), strict=True))  # norms moved
    history = json.loads((tmp_path / "distill-log.json").read_text())["history"]
    evals = [h["heldout_loss"] for h in history if "heldout_loss" in h]
    assert evals[-1] < evals[0] or history[-1]["loss"] < history[0]["loss"]
    checkpoint.save_model(student, tiny_tokenizer(), tmp_path / "out")  # still a plain packed int4 artifact
    loaded = checkpoint.load_model(tmp_path / "out")
    ids = calibration(1, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)


def test_fp8_student_trains_per_channel_scales_and_keeps_the_codes(tmp_path):
    """An FP8-dynamic model (fp8 weights per channel, fp8 inputs per token): the float32 weight scales and the norms
    move, the e4m3 codes do not, the KD loss falls with the inputs rounded in the forward, and it saves as fp8."""
    act = ActivationSpec("float", 8, "token", dynamic=True)
    model = rtn.apply(tiny_llama(0), rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=act,
                                                   lm_head_bits=None))
    generator = torch.Generator().manual_seed(0)
    for m in quantized_linears(model).values():  # scales off by ~30 %: an error the student can undo
        m.weight_scale.mul_(torch.exp(0.3 * torch.randn(m.weight_scale.shape, generator=generator)))
    before = {n: (m.weight.clone(), m.weight_scale.clone()) for n, m in quantized_linears(model).items()}
    cfg = distill.DistillConfig(**{**FAST, "steps": 40, "eval_every": 40, "checkpoint_every": 40, "lr": 0.01})
    student = distill.apply(model, cfg, context(tmp_path))
    after = quantized_linears(student)
    assert set(after) == set(before)
    for name, (codes, scale) in before.items():
        m = after[name]
        assert isinstance(m, FP8Linear) and m.act == act
        assert torch.equal(m.weight.view(torch.uint8), codes.view(torch.uint8)), name
        assert m.weight_scale.dtype == torch.float32 and not torch.equal(m.weight_scale, scale), name
    assert not any("parametrizations" in n for n, _ in student.named_parameters())
    history = json.loads((tmp_path / "distill-log.json").read_text())["history"]
    first, last = sum(h["loss"] for h in history[:8]), sum(h["loss"] for h in history[-8:])
    assert last < 0.9 * first  # untrained (lr 1e-9): 1.0
    checkpoint.save_model(student, tiny_tokenizer(), tmp_path / "out")
    loaded = checkpoint.load_model(tmp_path / "out")
    ids = calibration(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["fp8-dynamic", "int4"])
def test_train_codes_retrains_the_codes_in_their_format_and_saves_what_it_computed(tmp_path, name):
    """QAT: the decoder linears' codes and scales move (the head's codes do not), the layers keep their kind, format
    and zero points, the KD loss falls, and the saved folder computes exactly what the trained student does."""
    act = ActivationSpec("float", 8, "token", dynamic=True)
    config = (rtn.RTNConfig(bits=8, group_size=-1, type="float", input_activations=act, lm_head_bits=None)
              if name == "fp8-dynamic" else rtn.RTNConfig(bits=4, group_size=32))
    model = tiny_llama(0)  # the teacher's weights plus noise: an error only the codes can undo
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "proj" in n:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
    model = rtn.apply(model, config)
    codes = {n: (m.weight.view(torch.uint8) if isinstance(m, FP8Linear) else m.qweight).clone()
             for n, m in quantized_linears(model).items()}
    kinds = {n: (type(m), m.spec, m.act) for n, m in quantized_linears(model).items()}
    zeros = {n: m.qzeros.clone() for n, m in quantized_modules(model).items()}
    cfg = distill.DistillConfig(**{**FAST, "steps": 30, "eval_every": 30, "checkpoint_every": 30, "lr": 3e-3,
                                   "train_codes": True})
    student = distill.apply(model, cfg, context(tmp_path))
    after = quantized_linears(student)
    assert {n: (type(m), m.spec, m.act) for n, m in after.items()} == kinds
    assert not any("layer" in n.split(".") or "parametrizations" in n for n, _ in student.named_parameters())
    for n, m in after.items():
        now = m.weight.view(torch.uint8) if isinstance(m, FP8Linear) else m.qweight
        assert torch.equal(now, codes[n]) == (n == "lm_head"), n  # the head's codes stay
    assert all(torch.equal(m.qzeros, zeros[n]) for n, m in quantized_modules(student).items())
    history = json.loads((tmp_path / "distill-log.json").read_text())["history"]
    first, last = sum(h["loss"] for h in history[:6]), sum(h["loss"] for h in history[-6:])
    assert last < 0.8 * first
    checkpoint.save_model(student, tiny_tokenizer(), tmp_path / "out")
    loaded = checkpoint.load_model(tmp_path / "out")
    ids = calibration(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_fp8_per_tensor_scales_stay_shared(tmp_path):
    """One weight scale per tensor is shared by the linears a consumer fuses: the student leaves it alone."""
    model = rtn.apply(tiny_llama(0), rtn.RTNConfig(bits=8, group_size=-1, type="float", strategy="tensor",
                                                   lm_head_bits=None))
    before = {n: m.weight_scale.clone() for n, m in quantized_linears(model).items()}
    student = distill.apply(model, distill.DistillConfig(**FAST), context(tmp_path))
    assert all(torch.equal(m.weight_scale, before[n]) for n, m in quantized_linears(student).items())


def test_kd_loss_decreases(tmp_path):
    cfg = distill.DistillConfig(**{**FAST, "steps": 12, "eval_every": 12, "heldout_windows": 2})
    student = distill.apply(quantized_tiny(), cfg, context(tmp_path))
    history = json.loads((tmp_path / "distill-log.json").read_text())["history"]
    first, last = sum(h["loss"] for h in history[:3]), sum(h["loss"] for h in history[-3:])
    assert last < 0.8 * first
    assert student.training is False


def test_students_refuse_the_wrong_model(tmp_path):
    with pytest.raises(ToolkitError, match="quantization pass"):
        distill.apply(tiny_llama(0), distill.DistillConfig(**FAST), context(tmp_path))
    with pytest.raises(ToolkitError, match="before quantization"):
        distill.apply(quantized_tiny(), distill.DistillConfig(student="shallow", **FAST), context(tmp_path))


def test_teacher_text_is_cached(tmp_path, monkeypatch):
    cfg = distill.DistillConfig(generated_windows=3, generate_prompt_tokens=4, **FAST)
    teacher = tiny_llama(0)
    train, heldout = distill.training_text(calibration(), teacher, cfg, tmp_path)
    assert train.shape == (8 + 3, 32) and heldout.shape == (2, 32)
    assert torch.equal(train[8:, :4], train[:3, :4])  # continuations of calibration prompts
    monkeypatch.setattr(teacher, "generate", lambda **kw: pytest.fail("should load the cached text"))
    again, _ = distill.training_text(calibration(), teacher, cfg, tmp_path)
    assert torch.equal(again, train)


# ----------------------------------------------------------------------------- resume and failure


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = distill.DistillConfig(**FAST)
    reference = distill.apply(quantized_tiny(), cfg, context(tmp_path / "a")).state_dict()

    real_step = Trainer.train_step

    def interrupt_at_5(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        distill.apply(quantized_tiny(), cfg, context(tmp_path / "b"))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = distill.apply(quantized_tiny(), cfg, context(tmp_path / "b")).state_dict()
    log = json.loads((tmp_path / "b" / "distill-log.json").read_text())
    assert log["resumed_from"] == 4 and len(log["history"]) == cfg.steps
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():  # norms, fp16 scales, untouched codes
        assert torch.allclose(resumed[name].float(), tensor.float(), rtol=1e-5, atol=1e-7), name
    untrained = quantized_tiny().state_dict()
    assert not torch.equal(untrained["model.norm.weight"], reference["model.norm.weight"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama(0)
    calls = []

    def loss_fn(ids):
        calls.append(1)
        loss = model(input_ids=ids, labels=ids).loss
        return loss * float("nan") if len(calls) > 3 else loss

    trainer = Trainer(model, loss_fn, calibration(), TrainConfig(steps=10, batch_size=2, checkpoint_every=2),
                      tmp_path)
    with pytest.raises(ToolkitError, match="became nan at step 3.*step-0000002.pt.*Lower lr"):
        trainer.run()
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000002.pt"]
    state = torch.load(checkpoints(tmp_path)[0], weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())
