"""Two exports' graphs on the same feed loop: what each asks of onnxruntime's kernels (issue #22).

Both folders load through ``OrtBackend`` (same session options, shared KV cache, numpy's argmax of the bound
logits; an onnxruntime-genai build loads too), on one ORT thread so that the graph runs on the calling thread, and
decode the same prompt greedily. Steps alternate A B B A ..., and each step's cost is the calling thread's CPU time:
what the graph asks of the CPU, less what the other processes of a loaded host take (they still share the caches
and memory bandwidth, hence several repeats and per-repeat ratios). The host loop is the same for both, so the ratio
is the graphs' alone; ``ab_genai.py --cpu`` compares with genai's own loop.

``--census`` prints, for both graphs, the node counts and what selects a kernel: MatMulNBits' bits, block size,
accuracy level and optional inputs, GroupQueryAttention's attributes and inputs, the scales' stored type.
``--profile`` turns on onnxruntime's profiler and prints per op type the sum over its nodes of each node's median
kernel time over the decode steps (a median, because a node preempted on a loaded host reads milliseconds long),
MatMulNBits split by its (N, K).

    .venv/bin/python benchmarks/graph_ab.py runs/smollm2-int4-rtn-head4-onnx/export genai-int4 --census
    .venv/bin/python benchmarks/graph_ab.py runs/smollm2-int4-rtn-head4-onnx/export genai-int4 --reps 5 --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_genai import step_cpu_times  # noqa: E402
from bench_runtime import prompt_ids  # noqa: E402

from toolkit.runtime import BackendOptions, OrtBackend, Tokenizer  # noqa: E402
from toolkit.runtime.artifact import open_export  # noqa: E402

KERNEL_INPUTS = {"MatMulNBits": ["A", "B", "scales", "zero_points", "g_idx", "bias"],
                 "GroupQueryAttention": ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                                         "total_sequence_length", "cos_cache", "sin_cache", "position_ids",
                                         "attention_bias", "head_sink"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="an export folder (ours)")
    p.add_argument("b", type=Path, help="another export folder (e.g. onnxruntime-genai's int4 build)")
    p.add_argument("--reps", type=int, default=3, help="generations per graph after one warm-up")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--census", action="store_true", help="compare the graphs' nodes and stop")
    p.add_argument("--profile", action="store_true", help="per-op-type kernel time from onnxruntime's profiler")
    a = p.parse_args(argv)
    folders = {"a": a.a, "b": a.b}
    if a.census:
        print(json.dumps({k: census(f) for k, f in folders.items()}, indent=1))
        return 0
    ids = prompt_ids(Tokenizer.from_folder(a.a), a.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="graph-ab-") as tmp:
        backends = {k: OrtBackend(f, BackendOptions(threads=1, profile_prefix=f"{tmp}/{k}" if a.profile else ""))
                    for k, f in folders.items()}
        times = ab_steps(backends, ids, a.new_tokens, a.reps)
        report: dict[str, Any] = summary(times)
        if a.profile:
            decode_runs = a.new_tokens - 1
            report["profile_us_per_step"] = {
                k: kernel_table(b.session.end_profiling(), open_export(folders[k])[1], decode_runs)
                for k, b in backends.items()}
    print(json.dumps(report, indent=1))
    return 0


def ab_steps(backends: dict[str, OrtBackend], ids: list[int], new: int, reps: int) -> dict[str, list[list[float]]]:
    """Per system, per repeat (the first is a warm-up, left out), each decode step's CPU seconds."""
    total = len(ids) + new

    def steps(backend: OrtBackend) -> Iterator[float]:
        return step_cpu_times(backend, ids, total)

    times: dict[str, list[list[float]]] = {k: [] for k in backends}
    for rep in range(reps + 1):
        runs = {k: steps(b) for k, b in backends.items()}
        order = list(runs)
        this: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(new - 1):
            for k in order if i % 2 == 0 else order[::-1]:  # A B B A: neither always runs right after the other
                this[k].append(next(runs[k]))
        for k in runs:
            times[k] += [this[k]] if rep else []
    return times


def summary(times: dict[str, list[list[float]]]) -> dict[str, Any]:
    per_rep = {k: [1000 * float(np.median(r)) for r in v] for k, v in times.items()}
    ratios = [b / a for a, b in zip(per_rep["a"], per_rep["b"], strict=True)]
    return {"cpu_ms_per_step": {k: float(np.median(v)) for k, v in per_rep.items()},
            "cpu_ms_per_step_by_repeat": per_rep,
            "b_over_a_by_repeat": ratios, "b_over_a": float(np.median(ratios))}


def kernel_table(profile: str, proto: onnx.ModelProto, decode_runs: int) -> dict[str, float]:
    """Sum per op type of each node's median kernel µs over the decode runs (each generation: one prefill run,
    then ``decode_runs`` decode runs); MatMulNBits also by (N, K)."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode = [r for i, r in enumerate(runs) if i % (decode_runs + 1)]
    starts = np.array([r["ts"] for r in decode])
    ends = starts + np.array([r["dur"] for r in decode])
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= ends[i]:
            name = e["name"].removesuffix("_kernel_time")
            per_node[name].append(e["dur"])
            op_of[name] = e["args"]["op_name"]
    nk = {n.name: _attrs(n) for n in proto.graph.node if n.op_type == "MatMulNBits"}
    table: dict[str, float] = collections.Counter()
    for name, durations in per_node.items():
        us = float(np.median(durations))
        table[op_of[name]] += us
        if name in nk:
            table[f"MatMulNBits N={nk[name]['N']} K={nk[name]['K']}"] += us
    table["total"] = sum(v for k, v in table.items() if not k.startswith("MatMulNBits "))
    return {k: round(v, 1) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}


def census(folder: Path) -> dict[str, Any]:
    """Node counts and the kernel-selecting attributes and inputs of MatMulNBits and GroupQueryAttention."""
    proto = open_export(folder)[1]
    stored = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
    made_by = {o: n for n in proto.graph.node for o in n.output}
    kinds: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in KERNEL_INPUTS}
    for n in proto.graph.node:
        if n.op_type not in KERNEL_INPUTS:
            continue
        attrs = {k: v for k, v in _attrs(n).items() if k not in ("K", "N")}
        given = [role for role, name in zip(KERNEL_INPUTS[n.op_type], n.input, strict=False) if name]
        key = {"attrs": attrs, "inputs": given}
        if n.op_type == "MatMulNBits":
            key["scales"] = _source(n.input[2], stored, made_by)
        kinds[n.op_type][json.dumps(key, sort_keys=True)] += 1
    return {"opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "nodes": dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
            **{k: {sig: count for sig, count in v.items()} for k, v in kinds.items()}}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _source(name: str, stored: dict[str, str], made_by: dict[str, onnx.NodeProto]) -> str:
    """An input's stored type, through the Casts (folded by onnxruntime at load) that feed it."""
    if name in stored:
        return stored[name]
    node = made_by.get(name)
    if node is not None and node.op_type == "Cast" and node.input[0] in stored:
        return f"{stored[node.input[0]]} -> Cast to {onnx.TensorProto.DataType.Name(_attrs(node)['to'])}"
    return node.op_type if node is not None else "graph input"


if __name__ == "__main__":
    sys.exit(main())
