"""Rotary frequency factors as llama.cpp reads them: one divisor per rotary pair, ``theta_i / factor_i``.

llama.cpp's ``ggml_rope_ext`` takes an optional ``freq_factors`` tensor and divides each pair's frequency
by it; scalings that change some frequencies and not others (Llama 3.1's) are written that way instead of
as a scaling type. Pure functions on the rotary parameters of a Hugging Face config.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``theta ** (-2i / dim)`` for the ``dim / 2`` rotary pairs, float32 as transformers computes it."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3(params: dict[str, Any], dim: int) -> torch.Tensor:
    """Llama 3.1's rope scaling as divisors of the default frequencies ([dim / 2], float32).

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency (divisor 1), longer than
    ``original / low_freq_factor`` are slowed by ``factor``; in between the frequency is
    ``((1 - s) / factor + s) * f`` with ``s`` rising linearly in ``original / wavelength``, so the divisor is
    its reciprocal (``convert_hf_to_gguf.py``'s ``LlamaModel.generate_extra_tensors``)."""
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    if low >= high:
        raise ValueError(f"llama3 rope scaling needs low_freq_factor < high_freq_factor, got {low} and {high}")
    wavelength = 2 * math.pi / default_inv_freq(float(params["rope_theta"]), dim).double()
    smooth = (original / wavelength - low) / (high - low)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelength < original / high, torch.ones_like(divisors), divisors)
    divisors = torch.where(wavelength > original / low, torch.full_like(divisors, factor), divisors)
    return divisors.float()
