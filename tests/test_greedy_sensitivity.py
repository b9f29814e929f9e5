"""benchmarks/greedy_sensitivity.py: our greedy in float32 against the same model in float64."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tests.conftest import load_benchmark

sensitivity = load_benchmark("greedy_sensitivity")


class Rounding(nn.Module):
    """Logits [0, ((1 + eps) - 1) * 1e6] over a vocabulary of 2: a tie in float32 (token 0 wins), token 1 by 1e-4 in
    float64 (greedy reads logits in float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(1e-10))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        second = ((1 + self.eps) - 1) * 1e6
        step = torch.stack([torch.zeros_like(second), second])
        return SimpleNamespace(logits=step.expand(*input_ids.shape, 2))


def test_a_last_bit_difference_is_reported_where_it_flips_the_greedy_token() -> None:
    (got,) = sensitivity.float64_divergence(Rounding(), [[0, 1]], 3)
    assert got["first_divergence"] == 0 and (got["ours"], got["vllm"]) == (0, 1)
    assert got["our_margin"] == 0.0 and got["vllm_margin"] > 0


def test_a_float_model_agrees_with_itself_and_stays_float32() -> None:
    from toolkit.models.tiny import tiny_model

    model = tiny_model("llama")
    assert sensitivity.float64_divergence(model, [[256, 10, 20], [256, 30]], 4) == [{"equal": True}] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float64 copy is a copy
