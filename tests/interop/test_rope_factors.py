"""llama.cpp's rope divisors reproduce transformers' scaled inverse frequencies."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from toolkit.interop import rope_factors
from toolkit.models.tiny import family_config


def test_llama3_divisors_give_transformers_inverse_frequencies() -> None:
    config = family_config("llama3")
    params = dict(config.rope_parameters)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    divisors = rope_factors.llama3(params, config.head_dim)
    got = rope_factors.default_inv_freq(params["rope_theta"], config.head_dim) / divisors
    assert divisors.shape == (config.head_dim // 2,) and divisors.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=0)
    # the tiny config reaches all three bands: kept (1), slowed by factor (8) and interpolated in between
    assert divisors[0] == 1 and divisors[-1] == params["factor"] and 1 < float(divisors[1]) < params["factor"]


def test_llama3_refuses_an_empty_band() -> None:
    params = dict(family_config("llama3").rope_parameters, low_freq_factor=4.0)
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        rope_factors.llama3(params, 16)
