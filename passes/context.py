"""What a pass may need besides the model: calibration windows, the original model, a scratch folder, the device
and the passes that made its input.

Everything is lazy, so a pass that needs no data (RTN) triggers no tokenization and no extra load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PassContext:
    tokenizer: PreTrainedTokenizerBase
    calibration_loader: Callable[[], torch.Tensor]  # -> [N, L] token ids from the calibration half
    original_loader: Callable[[], PreTrainedModel]  # -> a fresh copy of the recipe's input model
    workdir: Path  # scratch space of this pass (checkpoints); kept between runs, keyed like the cache
    progress: bool = False
    device: str = "cpu"  # where passes compute: the recipe's one ``device`` setting, resolved (cpu or cuda)
    # the configs of the model passes that produced this step's input, in recipe order (empty: none, or unknown)
    history: tuple[Any, ...] = ()
    # what a model pass chose that the run's manifest records under the step's metrics (gptq keep_float's groups)
    findings: dict[str, Any] = field(default_factory=dict)
    _calibration: torch.Tensor | None = field(default=None, repr=False)

    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            self._calibration = self.calibration_loader()
        return self._calibration

    def original_model(self) -> PreTrainedModel:
        return self.original_loader()
