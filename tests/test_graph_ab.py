"""benchmarks/graph_ab.py on a tiny int4 export: the census names the kernel-selecting attributes, and the
profile table, read from onnxruntime's profiler (BackendOptions.profile_prefix), holds the decode steps' nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import export_tiny_int4, load_benchmark


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_int4(tmp_path_factory.mktemp("graph-ab") / "int4")


def test_the_census_names_each_linear_kernel_and_where_its_scales_come_from(int4_export):
    census = load_benchmark("graph_ab").census(int4_export)
    kinds = {json.loads(signature)["attrs"]["bits"]: (json.loads(signature), n)
             for signature, n in census["MatMulNBits"].items()}
    (layer, linears), (head, heads) = kinds[4], kinds[8]  # the layers' linears at int4, RTN's default int8 head
    assert layer["attrs"] == {"accuracy_level": 4, "bits": 4, "block_size": 32}
    assert layer["inputs"] == ["A", "B", "scales"]  # symmetric: no zero points, no g_idx, no bias
    assert layer["scales"] == head["scales"] == "FLOAT16 -> Cast to FLOAT"
    assert (linears, heads) == (2 * 4, 1)  # per layer: packed qkv, o, packed gate/up, down
    (attention, layers), = census["GroupQueryAttention"].items()
    assert layers == 2 and "cos_cache" in json.loads(attention)["inputs"]


def test_the_profile_table_holds_each_decode_step_nodes(int4_export, capsys):
    bench = load_benchmark("graph_ab")
    assert bench.main([str(int4_export), str(int4_export), "--reps", "1", "--prompt-tokens", "16",
                       "--new-tokens", "6", "--profile"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["b_over_a_by_repeat"]) == 1
    for table in report["profile_us_per_step"].values():
        assert table["MatMulNBits"] > 0 and table["GroupQueryAttention"] > 0
        by_shape = sum(v for k, v in table.items() if k.startswith("MatMulNBits "))
        assert by_shape == pytest.approx(table["MatMulNBits"], abs=0.5)
        assert table["total"] >= table["MatMulNBits"] + table["GroupQueryAttention"]
        assert "GatherBlockQuantized" in table  # the tied int4 embedding runs every step
