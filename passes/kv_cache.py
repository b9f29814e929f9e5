"""An fp8 e4m3 KV cache (vLLM ``kv_cache_dtype="fp8"``, compressed-tensors' ``kv_cache_scheme``, ModelOpt's
``kv_cache_quant_algo: FP8``): one static scale per attention layer for its keys and one for its values, max |k| / 448
and max |v| / 448 over the recipe's calibration windows of what the cache stores (keys after RoPE), on the model as
the passes before left it (its quantized linears compute the keys and values the deployed model caches). From then on
the model computes with the fp8-rounded keys and values (``toolkit.quant.kv_cache``), so the evaluation measures
what the deployment gets; the packed checkpoint records the cache, the compressed-tensors and ModelOpt exports write it.

A pass of its own rather than a key of rtn / gptq: it calibrates after them (on the quantized model, which is what
the cache holds), it does not change what they compute, and it applies to any model, float or quantized.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

from transformers import PreTrainedModel

from toolkit.passes.base import PassConfig
from toolkit.passes.context import PassContext
from toolkit.quant import kv_cache
from toolkit.quant.spec import KVCacheSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheConfig(PassConfig):
    name: ClassVar[str] = "kv_cache"
    reads_calibration: ClassVar[bool] = True

    type: Literal["float"] = "float"  # fp8 e4m3, the one KV cache type vLLM's checkpoints hold
    bits: int = 8
    batch_size: int = 8  # calibration windows per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        _ = self.spec
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 window, got {self.batch_size}")

    @property
    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.type, self.bits)

    def check_followers(self, later: tuple[PassConfig, ...]) -> None:
        """The scales are calibrated on the model the earlier passes made: no model pass may change it afterwards,
        and the export must write the cache."""
        for c in later:
            if c.kind == "model":
                raise ValueError(f"{c.name} after kv_cache would change the keys and values its scales were "
                                 f"calibrated on: put kv_cache after the model passes, just before the export")
            if not getattr(c, "holds_kv_cache", False):
                raise ValueError(f"{c.name} does not write an fp8 KV cache: export with export_compressed_tensors "
                                 "or export_modelopt, or drop kv_cache")


def apply(model: PreTrainedModel, config: KVCacheConfig, ctx: PassContext) -> PreTrainedModel:
    """Install the fp8 cache and calibrate its scales on ``ctx.calibration()``."""
    kv_cache.install(model, config.spec)
    maxima = kv_cache.calibrate(model, ctx.calibration(), config.batch_size)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    report = {f"layer {i}": {"max_abs_key": k, "max_abs_value": v} for i, (k, v) in enumerate(maxima)}
    (ctx.workdir / "kv_cache.json").write_text(json.dumps(report, indent=2))
    log.info("kv_cache: max |k| %.3g ... %.3g, max |v| %.3g ... %.3g over %d layers",
             min(k for k, _ in maxima), max(k for k, _ in maxima),
             min(v for _, v in maxima), max(v for _, v in maxima), len(maxima))
    return model
