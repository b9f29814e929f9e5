"""A small, resumable training loop: AdamW, warm-up + cosine, gradient accumulation, checkpoints.

Reproducibility contract: the data order is a pure function of (seed, step), and a checkpoint holds
everything else that evolves (trainable tensors, optimizer, scheduler, RNG states, history), so a
run interrupted and resumed from its latest checkpoint ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from toolkit.errors import ToolkitError

CHECKPOINT_GLOB = "step-*.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 25  # 0: evaluate only at the end
    checkpoint_every: int = 25  # 0: no checkpoints (no resume)
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}; typical values are 1e-5 .. 1e-3")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainResult:
    step: int
    resumed_from: int  # 0 when training started fresh
    history: list[dict[str, float]] = field(default_factory=list)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, micro: int, n: int, config: TrainConfig) -> torch.Tensor:
    """Window indices of one micro-batch: epochs are seeded permutations, so any step can be recomputed."""
    first = (step * config.grad_accum + micro) * config.batch_size
    perms: dict[int, torch.Tensor] = {}
    out = []
    for i in range(first, first + config.batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return torch.tensor(out, dtype=torch.long)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(CHECKPOINT_GLOB))


def _save(folder: Path, state: dict[str, Any], keep: int) -> Path:
    """Write atomically (tmp + rename), then drop all but the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state['step']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in checkpoints(folder)[:-keep]:
        old.unlink()
    return path


STATE_KEYS = {"step": int, "trainable": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "history": list}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``_save``, read without executing anything it holds.

    ``weights_only=True`` admits tensors and plain containers only, with no extra allowed globals: a
    planted file whose pickle names a class or function (``__reduce__``) is refused before it can run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as exc:  # foreign or truncated
        raise ToolkitError(f"checkpoint {path} is not a training checkpoint of this toolkit or is truncated "
                           f"({type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in STATE_KEYS.items()):
        raise ToolkitError(f"checkpoint {path} lacks the training state ({', '.join(STATE_KEYS)}); "
                           "delete it to start over")
    return state


class Trainer:
    """Holds the optimizer state of one run; ``run()`` trains to ``config.steps`` (resuming if it can)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                 config: TrainConfig, folder: Path | None = None) -> None:
        self.model, self.loss_fn, self.data, self.config, self.folder = model, loss_fn, data, config, folder
        self.params = trainable(model)
        if not self.params:
            raise ToolkitError("the student has no trainable parameters; check the distillation config")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.step, self.history = 0, list[dict[str, float]]()
        self.device = next(iter(self.params.values())).device

    def _autocast(self) -> torch.autocast:
        # bf16 on GPU for speed; CPU bf16 matmuls are slow on most cores, so CPU trains in fp32.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "trainable": {k: p.detach().cpu().clone() for k, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "history": list(self.history),
        }

    def load(self, state: dict[str, Any]) -> None:
        missing = set(self.params) ^ set(state["trainable"])
        if missing:
            raise ToolkitError(f"checkpoint does not match the student (differs in {sorted(missing)[:3]}...); "
                               "delete the pass's workdir to start over")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step, self.history = state["step"], list(state["history"])

    def resume(self) -> int:
        """Load the newest checkpoint in ``folder``; returns its step (0 when there is none)."""
        found = checkpoints(self.folder) if self.folder is not None else []
        if not found:
            return 0
        self.load(read_checkpoint(found[-1]))
        return self.step

    def _last_good(self) -> str:
        found = checkpoints(self.folder) if self.folder is not None else []
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def train_step(self) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.config.grad_accum):
            batch = self.data[batch_indices(self.step, micro, len(self.data), self.config)].to(self.device)
            with self._autocast():
                loss = self.loss_fn(batch) / self.config.grad_accum
            if not torch.isfinite(loss):
                raise ToolkitError(f"training loss became {float(loss.detach())} at step {self.step}; {self._last_good()}. "
                                   "Lower lr (or raise warmup_steps) and run again")
            loss.backward()
            total += float(loss.detach())
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params.values(), self.config.max_grad_norm)
            if not torch.isfinite(norm):
                raise ToolkitError(f"gradient norm became {float(norm)} at step {self.step}; {self._last_good()}. "
                                   "Lower lr and run again")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    def run(self, evaluate: Callable[[], dict[str, float]] | None = None, progress: bool = False) -> TrainResult:
        torch.manual_seed(self.config.seed)
        resumed = self.resume()
        bar = tqdm(total=self.config.steps, initial=self.step, desc="distill", disable=not progress)
        while self.step < self.config.steps:
            loss = self.train_step()
            record: dict[str, float] = {"step": self.step, "loss": loss, "lr": float(self.scheduler.get_last_lr()[0])}
            every = self.config.eval_every
            if evaluate is not None and ((every and self.step % every == 0) or self.step == self.config.steps):
                self.model.eval()
                with torch.no_grad(), self._autocast():
                    record.update({f"heldout_{k}": v for k, v in evaluate().items()})
            self.history.append(record)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            every = self.config.checkpoint_every
            if self.folder is not None and every and (self.step % every == 0 or self.step == self.config.steps):
                _save(self.folder, self.state(), self.config.keep_checkpoints)
        bar.close()
        self.model.eval()
        return TrainResult(self.step, resumed, self.history)
