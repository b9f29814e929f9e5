"""The pass table: recipe name -> (frozen config class, apply function). Edit here to add a pass.

Every ``apply(model, config, calib) -> model`` takes the model, its frozen config and calibration
token windows ``[N, L]`` (``None`` for passes that need no data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolkit.passes import rtn

PASSES: dict[str, tuple[type, Callable[..., Any]]] = {
    "rtn": (rtn.RTNConfig, rtn.apply),
}

# Passes whose output depends on calibration data (the cache key includes the windows then).
NEEDS_CALIBRATION: frozenset[str] = frozenset()
