"""benchmarks/exports_ab.py on a tiny int4 export: both load orders run, and the tokens of two exports are compared."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import load_benchmark, load_tiny
from toolkit.passes.onnx import ONNXConfig, export
from toolkit.paths import atomic_dir


def _export(folder: Path, flip: bool) -> Path:
    loaded = load_tiny(group=32)
    if flip:  # the final norm negated: every logit negated, so greedy picks other tokens
        loaded.model.model.norm.weight.data.neg_()
    with atomic_dir(folder) as tmp:
        export(loaded.model, loaded.tokenizer, ONNXConfig(target="ort"), tmp)
    return folder


def test_both_load_orders_run_and_other_weights_decode_other_tokens(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("exports_ab")
    a, b = _export(tmp_path / "a", False), _export(tmp_path / "b", True)
    args = ["--processes", "2", "--pairs", "2", "--prompt-tokens", "16", "--new-tokens", "6"]
    assert bench.main([str(a), str(a), *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" (")[1].split(")")[0] for line in lines[:2]] == ["a-first", "b-first"]
    assert all(len(line.split("per pair ")[1].split()) == 2 for line in lines[:2])
    assert lines[-1].endswith("same tokens: True") and "both orders" in lines[-1]
    assert bench.main([str(a), str(b), *args]) == 0
    assert capsys.readouterr().out.strip().endswith("same tokens: False")
