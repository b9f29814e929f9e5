"""Knowledge distillation from the recipe's input model (the teacher) into a shallow or quantized student.

``student: shallow`` keeps a subset of the teacher's decoder layers (every ``keep_every``-th, or
``layers``) and trains all of its weights. ``student: quantized`` trains only what stays floating
point in a quantized model: the RMSNorm weights and, per quantized linear, a float32 log-multiplier on its
weight scales (an integer linear's float16 ``scales``, written back as float16; an fp8 linear's float32
per-channel ``weight_scale``, written back as float32; one scale per tensor stays as it is, since consumers
fuse q/k/v and gate/up with one shared scale); codes (but see below) and zero points never change, so int4
weights stay int4 and fp8 weights stay fp8. With ``train_codes`` the quantized student also retrains its codes
(quantization-aware training): every decoder linear trains a float32 weight rounded to its own grid in each forward,
the rounding's gradient passed straight through, and is written back as codes of the same format, scales and zero
points.
Inputs quantized per token (W8A8, FP8) are rounded in the training forward too, their gradient passed straight
through. Loss: a temperature-scaled logit divergence (forward KL, reverse KL or JSD), plus
optional next-token cross-entropy and hidden-state matching. Training text: the calibration windows
(the last ``heldout_windows`` held out for evaluation), plus optional teacher-sampled continuations.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from toolkit.algorithms.distillation import (
    Divergence,
    hidden_loss,
    hidden_state_map,
    kept_layers,
    logit_divergence,
    next_token_loss,
)
from toolkit.errors import ToolkitError
from toolkit.models.architectures import decoder_layers, layout_of, per_layer_attrs
from toolkit.passes.base import PassConfig
from toolkit.passes.context import PassContext
from toolkit.paths import sha256_json
from toolkit.quant.arithmetic import fp16_representable
from toolkit.quant.modules import FP8Linear, QuantizedLinear, TrainingLinear, quantized_linears, set_module
from toolkit.training.trainer import TrainConfig, Trainer


@dataclass(frozen=True)
class DistillConfig(PassConfig):
    name: ClassVar[str] = "distill"
    reads_calibration: ClassVar[bool] = True

    student: Literal["shallow", "quantized"] = "quantized"
    layers: tuple[int, ...] = ()  # shallow: teacher layers to keep (ascending)
    keep_every: int | None = None  # shallow: keep layers 0, k, 2k, ... (default 2 when layers is empty)
    train_head: bool = False  # quantized: also train the (int8, tied) lm_head scales
    # quantized: also retrain the decoder linears' codes (QAT: a float weight rounded to the layer's grid in every
    # forward, straight-through gradient; same format, zero points and scale layout afterwards). The head's codes stay
    train_codes: bool = False
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # next-token cross-entropy on the text (kd_weight 0 + ce_weight 1 = plain LM training)
    hidden_weight: float = 0.0  # MSE on hidden states (student layer outputs vs the mapped teacher ones)
    hidden_layers: tuple[int, ...] = ()  # student hidden_states indices to match; empty: all layer outputs
    seq_len: int = 0  # cut calibration windows into chunks of this length; 0 keeps them whole
    heldout_windows: int = 4  # last calibration windows, never trained on, for periodic evaluation
    generated_windows: int = 0  # extra windows sampled from the teacher (cached in the workdir)
    generate_prompt_tokens: int = 32
    generate_temperature: float = 1.0
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers and self.keep_every is not None:
            raise ValueError("give either layers or keep_every, not both")
        if self.train_codes and self.student != "quantized":
            raise ValueError("train_codes retrains a quantized student's codes; a shallow student trains its float "
                             "weights anyway: use student: quantized after a quantization pass")
        if self.student != "shallow" and (self.layers or self.keep_every is not None):
            raise ValueError("layers/keep_every select layers of a shallow student; set student: shallow")
        if self.layers and list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be ascending without repeats, got {list(self.layers)}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1, got {self.keep_every}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.kd_weight, self.ce_weight, self.hidden_weight) < 0 or not (
            self.kd_weight or self.ce_weight or self.hidden_weight
        ):
            raise ValueError("kd_weight, ce_weight and hidden_weight must be >= 0 and at least one > 0")
        if self.seq_len < 0 or self.seq_len == 1 or self.heldout_windows < 1 or self.generated_windows < 0:
            raise ValueError("seq_len must be 0 or >= 2, heldout_windows >= 1, generated_windows >= 0")
        if self.generate_prompt_tokens < 1 or self.generate_temperature <= 0:
            raise ValueError("generate_prompt_tokens must be >= 1 and generate_temperature > 0")
        _ = self.train_config  # TrainConfig validates the training fields

    @property
    def train_config(self) -> TrainConfig:
        fields = TrainConfig.__dataclass_fields__
        return TrainConfig(**{k: v for k, v in asdict(self).items() if k in fields})


# ----------------------------------------------------------------------------- students


def shallow_student(model: PreTrainedModel, kept: tuple[int, ...]) -> PreTrainedModel:
    """Keep only the decoder layers ``kept`` (in place); the config says how many, so it saves like any Llama."""
    layers = decoder_layers(model)
    new = nn.ModuleList([layers[i] for i in kept])
    for index, layer in enumerate(new):
        layer.get_submodule("self_attn").layer_idx = index  # type: ignore[assignment]  # KV cache slot
    parent, _, attr = layout_of(model).layers.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    lists = {attr: list(getattr(model.config, attr)) for attr in per_layer_attrs(model.config)}
    model.config.num_hidden_layers = len(kept)
    for attr, values in lists.items():  # each kept layer keeps its attention (sliding or full, rotary or not)
        setattr(model.config, attr, [values[i] for i in kept])
    return model


class ScaleMultiplier(nn.Module):
    """Parametrization of a weight-scale buffer: ``scales * exp(theta)``, theta float32 from 0."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(shape))

    def forward(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.float() * self.theta.exp()


def norm_modules(model: PreTrainedModel) -> list[nn.Module]:
    layout = layout_of(model)
    norms = [model.get_submodule(layout.final_norm)]
    for layer in decoder_layers(model):
        norms += [layer.get_submodule(name) for name in layout.layer_norms()]
    return norms


def quantized_student(model: PreTrainedModel, train_head: bool, train_codes: bool = False) -> PreTrainedModel:
    """Freeze everything, then make the norms and a multiplier on every quantized linear's scales trainable; with
    ``train_codes`` the decoder linears become ``TrainingLinear`` (weights and scales train, ``bake`` freezes them)."""
    head = layout_of(model).head
    targets = {n: m for n, m in quantized_linears(model).items() if train_head or n != head}
    if not targets:
        raise ToolkitError("student: quantized needs a quantized model: put a quantization pass (rtn, gptq) "
                           "before distill, or use student: shallow")
    model.requires_grad_(False)
    for norm in norm_modules(model):
        norm.requires_grad_(True)
    for target, module in targets.items():
        if train_codes and target != head:
            set_module(model, target, TrainingLinear(module))
            continue
        name = _scale_name(module)
        if name is not None:
            parametrize.register_parametrization(module, name, ScaleMultiplier(getattr(module, name).shape),
                                                 unsafe=True)
    return model


def _scale_name(module: QuantizedLinear) -> str | None:
    """The weight-scale buffer the student trains: None for fp8 with one scale per tensor (shared across fused
    linears by the consumers, so one linear's scale cannot move alone)."""
    if isinstance(module, FP8Linear):
        return None if module.spec.per_tensor else "weight_scale"
    return "scales"


@torch.no_grad()
def bake(model: nn.Module) -> None:
    """Write trained codes and scales back (float16 integer scales, float32 fp8 ones): ``TrainingLinear`` back to
    its layer's kind, parametrized scales into their buffers, parametrizations dropped."""
    training = [(n, m) for n, m in model.named_modules() if isinstance(m, TrainingLinear)]
    for name, m in training:
        set_module(model, name, m.freeze())
    for module in quantized_linears(model).values():
        name = _scale_name(module)
        if name is not None and parametrize.is_parametrized(module, name):
            trained = getattr(module, name).detach()
            if name == "scales":
                trained = fp16_representable(trained).to(torch.float16)
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            getattr(module, name).copy_(trained)


# ----------------------------------------------------------------------------- data


def chunk_windows(windows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N, L] -> [N * L / seq_len, seq_len]``; ``seq_len`` 0 keeps the windows."""
    if not seq_len or seq_len == windows.shape[1]:
        return windows
    if windows.shape[1] % seq_len:
        raise ToolkitError(f"seq_len {seq_len} must divide the calibration window length {windows.shape[1]}")
    return windows.reshape(-1, seq_len)


@torch.no_grad()
def teacher_text(teacher: PreTrainedModel, prompts: torch.Tensor, length: int, config: DistillConfig,
                 folder: Path) -> torch.Tensor:
    """Continuations sampled from the teacher after ``prompts [N, P]`` -> ``[N, length]``, cached on disk."""
    key = sha256_json({"prompts": prompts.tolist(), "length": length, "t": config.generate_temperature,
                       "seed": config.seed})[:16]
    path = folder / f"generated-{key}.pt"
    if path.is_file():
        try:  # tensors only: a planted pickle is refused, not run
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError):  # truncated or foreign: generate again
            cached = None
        if isinstance(cached, torch.Tensor) and cached.shape == (prompts.shape[0], length):
            return cached
    torch.manual_seed(config.seed)
    new = length - prompts.shape[1]
    out = [
        teacher.generate(  # type: ignore[operator]
            input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                         temperature=config.generate_temperature, top_k=0, top_p=1.0,
                         max_new_tokens=new, min_new_tokens=new)
        for batch in prompts.split(8)
    ]
    text = torch.cat(out)[:, :length].cpu()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(text, tmp)
    os.replace(tmp, path)
    return text


def training_text(windows: torch.Tensor, teacher: PreTrainedModel, config: DistillConfig,
                  workdir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) windows: the calibration windows minus the held-out tail, plus generated text."""
    if windows.shape[0] <= config.heldout_windows:
        raise ToolkitError(f"{windows.shape[0]} calibration windows leave none to train on after holding out "
                           f"{config.heldout_windows}; raise calibration.count or lower heldout_windows")
    train = chunk_windows(windows[: -config.heldout_windows], config.seq_len)
    heldout = chunk_windows(windows[-config.heldout_windows :], config.seq_len)
    if config.generated_windows:
        if config.generate_prompt_tokens >= train.shape[1]:
            raise ToolkitError("generate_prompt_tokens must be shorter than the training windows")
        picks = torch.arange(config.generated_windows) % train.shape[0]
        prompts = train[picks, : config.generate_prompt_tokens].to(next(teacher.parameters()).device)
        train = torch.cat([train, teacher_text(teacher, prompts, train.shape[1], config, workdir)])
    return train, heldout


# ----------------------------------------------------------------------------- loss


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # ids -> (loss, student logits)


def make_loss(student: PreTrainedModel, teacher: PreTrainedModel, config: DistillConfig,
              hidden_map: dict[int, int]) -> LossFn:
    needs_teacher = config.kd_weight > 0 or config.hidden_weight > 0
    hidden = config.hidden_weight > 0
    pairs = {i: hidden_map[i] for i in (config.hidden_layers or tuple(hidden_map))}

    def loss_fn(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss = torch.zeros((), device=ids.device)
        if needs_teacher:
            with torch.no_grad():
                ref = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            if config.kd_weight:
                loss = loss + config.kd_weight * logit_divergence(out.logits, ref.logits, config.divergence,
                                                                  config.temperature)
            if hidden:
                s = [out.hidden_states[i] for i in pairs]
                t = [ref.hidden_states[j] for j in pairs.values()]
                loss = loss + config.hidden_weight * hidden_loss(s, t)
        if config.ce_weight:
            loss = loss + config.ce_weight * next_token_loss(out.logits, ids)
        return loss, out.logits

    return loss_fn


def make_evaluate(student: PreTrainedModel, loss_fn: LossFn, heldout: torch.Tensor,
                  batch_size: int) -> Callable[[], dict[str, float]]:
    """Held-out training loss and next-token NLL (one student forward per batch serves both)."""

    def evaluate() -> dict[str, float]:
        device = next(student.parameters()).device
        losses, nlls = [], []
        for batch in heldout.split(batch_size):
            batch = batch.to(device)
            loss, logits = loss_fn(batch)
            losses.append(float(loss))
            nlls.append(float(next_token_loss(logits, batch)))
        return {"loss": sum(losses) / len(losses), "nll": sum(nlls) / len(nlls)}

    return evaluate


# ----------------------------------------------------------------------------- the pass


def build_student(model: PreTrainedModel, config: DistillConfig) -> tuple[PreTrainedModel, dict[int, int]]:
    """The student and its hidden-state map (student ``hidden_states`` index -> teacher's)."""
    n = model.config.num_hidden_layers
    if config.student == "quantized":
        return quantized_student(model, config.train_head, config.train_codes), {i: i for i in range(1, n + 1)}
    if quantized_linears(model):
        raise ToolkitError("student: shallow needs a float model; put distill before quantization passes")
    try:
        kept = kept_layers(n, config.layers, config.keep_every)
    except ValueError as exc:
        raise ToolkitError(f"distill: {exc}") from None
    bad = [i for i in config.hidden_layers if not 1 <= i <= len(kept)]
    if bad:
        raise ToolkitError(f"hidden_layers {bad} are outside the student's 1..{len(kept)}")
    return shallow_student(model, kept), hidden_state_map(kept, n)


def apply(model: PreTrainedModel, config: DistillConfig, ctx: PassContext) -> PreTrainedModel:
    device = torch.device(ctx.device)  # the recipe's device, resolved by the runner
    Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
    teacher = ctx.original_model().to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    student, hidden_map = build_student(model, config)
    student.to(device)  # type: ignore[arg-type]
    train, heldout = training_text(ctx.calibration(), teacher, config, Path(ctx.workdir))
    data_hash = hashlib.sha256(train.numpy().tobytes()).hexdigest()
    fingerprint = sha256_json({"config": asdict(config), "data": data_hash})[:16]
    folder = Path(ctx.workdir) / "checkpoints" / fingerprint
    loss_fn = make_loss(student, teacher, config, hidden_map)
    trainer = Trainer(student, lambda ids: loss_fn(ids)[0], train, config.train_config, folder)
    result = trainer.run(make_evaluate(student, loss_fn, heldout, config.batch_size), progress=ctx.progress)
    (Path(ctx.workdir) / "distill-log.json").write_text(json.dumps(
        {"resumed_from": result.resumed_from, "train_windows": list(train.shape), "history": result.history},
        indent=1))
    bake(student)
    del teacher
    return student.cpu().eval()
