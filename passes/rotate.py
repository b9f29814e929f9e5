"""A rotation of the residual stream folded into the weights (QuaRot / SpinQuant's R1), fitted to fp8 input
rounding: the model stays a plain checkpoint of its architecture, computing the same function, whose linears'
inputs lose less to per-token e4m3 rounding.

Every decoder layer's RMSNorm weight folds into the linears reading it (weight -> 1); with ``Q`` orthogonal,
RMSNorm(x Q) = RMSNorm(x) Q, so the embedding becomes E Q, each linear reading the stream (q/k/v, gate/up) W Q,
each linear writing it (o, down) Qᵀ W, and the head E diag(g_final) Q: a tied head is untied (the final norm's
weight cannot fold into the embedding). ``Q`` is fitted on calibration windows to the rounding surrogate of
``toolkit.algorithms.rotation`` (random rotations raise it on SmolLM2). Follow it with ``gptq`` or ``rtn`` with
fp8 ``input_activations``; benchmarks/fp8_rotation_screen.py and benchmarks/activation_quality.py measure it.
``objective: loss`` weighs each reader's output error by the calibration loss's squared gradients there (one
backward pass per window), so layers whose error costs the model more count more. No recipe uses the pass: its gain
on SmolLM2 FP8 dynamic (README, "Activation schemes") is below what perplexity on the default protocol resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from toolkit.algorithms.rotation import fit_rotation
from toolkit.errors import ToolkitError
from toolkit.models.architectures import Architecture, decoder_layers, layout_of
from toolkit.models.shape import ModelShape
from toolkit.passes.base import PassConfig
from toolkit.passes.context import PassContext


@dataclass(frozen=True)
class RotateConfig(PassConfig):
    name: ClassVar[str] = "rotate"
    reads_calibration: ClassVar[bool] = True

    steps: int = 200  # Adam steps of the fit (0: no rotation, the norms folded only)
    lr: float = 1e-3  # Adam's step on the skew parameter
    windows: int = 8  # calibration windows for the inputs' second moments (the first of the recipe's)
    # "relative": each reader group's relative output error counts alike; "loss": each reader's output error is
    # weighted by the mean squared gradient of the calibration loss there, so groups count by what they cost the model
    objective: str = "relative"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0 (200 is usual; 0 folds the norms without rotating), got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive (1e-3 is usual), got {self.lr}")
        if self.windows < 1:
            raise ValueError(f"windows must be >= 1 calibration window, got {self.windows}")
        if self.objective not in ("relative", "loss"):
            raise ValueError(f"objective must be 'relative' or 'loss', got {self.objective!r}")

    def in_memory_bytes(self, shape: ModelShape, calibration_tokens: int) -> float:
        """The float32 model and its head once untied, plus H and C per reader group (float64, two per layer) and
        the fit's float32 copies with their products and gradients."""
        layers = (shape.parameters - shape.embedding_parameters) // max(shape.layer_parameters, 1)
        square = shape.hidden ** 2 * 2 * layers
        return 4 * shape.parameters + 4 * shape.vocab * shape.hidden + square * (2 * 8 + 6 * 4)


def reader_groups(arch: Architecture) -> dict[str, tuple[str, ...]]:
    """Each pre-norm's name -> the linears reading its output; refuses what a residual rotation cannot fold into."""
    unsupported = [why for why, bad in (
        ("RMSNorm weights stored as w - 1", arch.norm_offset != 0),
        ("norms on the sublayer outputs (sandwich norms)", bool(arch.attn_out_norm or arch.mlp_out_norm)),
        ("no norm before attention or the MLP", not (arch.input_norm and arch.mlp_norm)),
        ("a bias on a linear writing the residual stream", arch.o in arch.biased or arch.down in arch.biased),
    ) if bad]
    if unsupported:
        raise ToolkitError(f"rotate folds a rotation through pre-norm RMSNorms only; '{arch.model_type}' has "
                           f"{', '.join(unsupported)}: leave rotate out of this recipe")
    return {arch.input_norm: arch.attention_projections(), arch.mlp_norm: arch.mlp_projections()}  # type: ignore[dict-item]


def output_gradients(model: PreTrainedModel, groups: dict[str, tuple[str, ...]], windows: torch.Tensor
                     ) -> list[torch.Tensor]:
    """Per decoder layer and reader group, the mean squared gradient of the windows' summed next-token loss at its
    readers' concatenated outputs (float64), in ``moments``' order."""
    arch = layout_of(model)
    sums: list[torch.Tensor] = []
    hooks = []
    for layer in decoder_layers(model):
        for readers in groups.values():
            for r in readers:
                module = layer.get_submodule(r)
                sums.append(torch.zeros(module.out_features, dtype=torch.float64))  # type: ignore[arg-type]

                def add(g: torch.Tensor, i: int = len(sums) - 1) -> None:  # returns None: the gradient passes on
                    sums[i].add_(g.reshape(-1, g.shape[-1]).double().pow(2).sum(0))

                def grab(_: nn.Module, __: tuple[torch.Tensor, ...], y: torch.Tensor, add: Any = add) -> None:
                    y.register_hook(add)
                hooks.append(module.register_forward_hook(grab))
    embed = model.get_submodule(arch.embed)
    try:
        with torch.enable_grad():  # the pass runs under no_grad; only the embedded inputs require a gradient
            for window in windows:
                x = embed(window[None]).detach().requires_grad_(True)
                out = model(inputs_embeds=x, labels=window[None], use_cache=False)
                (out.loss * (window.numel() - 1)).backward()
    finally:
        for hook in hooks:
            hook.remove()
    per_reader = iter(s / windows.numel() for s in sums)
    return [torch.cat([next(per_reader) for _ in readers]) for _ in decoder_layers(model) for readers in groups.values()]


@torch.no_grad()
def moments(model: PreTrainedModel, groups: dict[str, tuple[str, ...]], windows: torch.Tensor,
            loss_weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = E[x̂ x̂ᵀ]`` of each pre-norm's normalized input and ``C = Σ (W diag g)ᵀ(W diag g)`` of its readers,
    ``[layers * len(groups), hidden, hidden]`` (float64); ``loss_weighted``: ``C = Σ (W diag g)ᵀ diag(f) (W diag g)``
    with ``f`` the readers' ``output_gradients``."""
    weights = output_gradients(model, groups, windows) if loss_weighted else None
    hs: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []
    hooks = []
    for layer in decoder_layers(model):
        for norm, readers in groups.items():
            module = layer.get_submodule(norm)
            w = torch.cat([layer.get_submodule(r).weight.double() for r in readers]) * module.weight.double()
            cs.append(w.T @ (w if weights is None else weights[len(cs)][:, None] * w))
            hs.append(torch.zeros_like(cs[-1]))
            eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

            def grab(_: nn.Module, args: tuple[torch.Tensor, ...], i: int = len(hs) - 1, eps: float = eps) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                hs[i] += x.T @ x
            hooks.append(module.register_forward_pre_hook(grab))
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(hs) / windows.numel(), torch.stack(cs)


@torch.no_grad()
def fold(model: PreTrainedModel, arch: Architecture, groups: dict[str, tuple[str, ...]], q: torch.Tensor) -> None:
    """Norm weights into their readers, then ``q: [hidden, hidden]`` into every weight touching the stream."""
    def set_(module: nn.Module, value: torch.Tensor) -> None:
        module.weight.data = value.to(module.weight.dtype)

    embed, norm, lm_head = (model.get_submodule(n) for n in (arch.embed, arch.final_norm, arch.head))
    head = lm_head.weight.double() * norm.weight.double() @ q  # E diag(g) Q when tied
    lm_head.weight = nn.Parameter(head.to(embed.weight.dtype), requires_grad=False)
    model.config.tie_word_embeddings = False
    set_(embed, embed.weight.double() @ q)
    norm.weight.fill_(1.0)
    for layer in decoder_layers(model):
        for name, readers in groups.items():
            g = layer.get_submodule(name).weight
            for r in readers:
                set_(layer.get_submodule(r), layer.get_submodule(r).weight.double() * g.double() @ q)
            g.fill_(1.0)
        for w in (arch.o, arch.down):
            set_(layer.get_submodule(w), q.T @ layer.get_submodule(w).weight.double())


def apply(model: PreTrainedModel, config: RotateConfig, ctx: PassContext) -> PreTrainedModel:
    arch = layout_of(model)
    groups = reader_groups(arch)
    linears = [name for readers in groups.values() for name in readers] + [arch.o, arch.down]
    if not all(isinstance(layer.get_submodule(n), nn.Linear) for layer in decoder_layers(model) for n in linears):
        raise ToolkitError("rotate needs a float model: put it before the quantization passes")
    hidden = model.get_submodule(arch.embed).weight.shape[1]
    q = torch.eye(hidden, dtype=torch.float64)
    if config.steps:
        h, c = moments(model, groups, ctx.calibration()[:config.windows], loss_weighted=config.objective == "loss")
        q = fit_rotation(h, c, config.steps, config.lr, relative=config.objective == "relative")
    fold(model, arch, groups, q)
    return model
