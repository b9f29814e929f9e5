"""How onnxruntime's CPU kernels scale from one decoded row to eight: the bound on batched decode.

    .venv/bin/python benchmarks/kernel_scaling.py [--threads 2] [--rows 8]

Times single MatMulNBits nodes (SmolLM2's shapes, int4 group 64 asymmetric, each accuracy level) and one
GroupQueryAttention layer (SmolLM2's heads, KV lengths 152-264 as in the concurrency benchmark, float32 and
float16) at 1 row and at ``--rows`` rows, medians of repeats. A kernel whose eight-row time is ~8x its
one-row time gains nothing from batching; the concurrency target of issue #5 (8 sequences >= 2.5x one)
needs the per-step cost at 8 rows to stay under 3.2x the one-row step. Isolated nodes keep their weights
cache-hot, so their one-row times are lower than inside the 77 MB model, where weights stream from memory:
the closing bound is indicative, not exact.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate+up": (3072, 576), "down": (576, 1536),
          "head": (49152, 576)}  # N, K, as in our SmolLM2 graph (q/k/v and gate+up fused)
LAYERS = 30


def _session(graph: object, threads: int) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_nbits(n: int, k: int, level: int, threads: int, group: int = 64) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    blocks = k // group
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, group // 2), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) + 0.5) * 0.01, "S"),
             numpy_helper.from_array(rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8), "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain=MS, K=k, N=n, bits=4,
                            block_size=group, accuracy_level=level)
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return _session(graph, threads)


def gqa(dtype: type, threads: int, heads: int = 9, kv_heads: int = 3, head_dim: int = 64) -> ort.InferenceSession:
    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    io = helper.make_tensor_value_info
    inputs = [io("q", t, [None, None, heads * head_dim]), io("k", t, [None, None, kv_heads * head_dim]),
              io("v", t, [None, None, kv_heads * head_dim]), io("pk", t, [None, kv_heads, None, head_dim]),
              io("pv", t, [None, kv_heads, None, head_dim]), io("seqlens_k", TensorProto.INT32, [None]),
              io("total", TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], ["o", "ok", "ov"], domain=MS,
                            num_heads=heads, kv_num_heads=kv_heads)
    graph = helper.make_graph([node], "gqa", inputs, [io(n, t, None) for n in ("o", "ok", "ov")])
    return _session(graph, threads)


def median_us(fn: Callable[[], object], repeats: int = 7, calls: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def time_matmul(sess: ort.InferenceSession, rows: int, k: int) -> float:
    x = np.random.default_rng(1).random((rows, k), dtype=np.float32)
    return median_us(lambda: sess.run(None, {"x": x}))


def time_gqa(sess: ort.InferenceSession, rows: int, dtype: type, capacity: int = 512) -> float:
    rng = np.random.default_rng(2)
    lengths = np.array([152 + i * 16 for i in range(rows)], np.int32)  # prompts 128..240 + 24 decoded tokens
    caches = [ort.OrtValue.ortvalue_from_numpy(rng.random((rows, 3, capacity, 64)).astype(dtype)) for _ in range(2)]
    binding = sess.io_binding()
    for name, width in (("q", 576), ("k", 192), ("v", 192)):
        binding.bind_cpu_input(name, rng.random((rows, 1, width)).astype(dtype))
    binding.bind_cpu_input("seqlens_k", lengths)
    binding.bind_cpu_input("total", np.array(lengths.max() + 1, np.int32))
    for (past, present), value in zip((("pk", "ok"), ("pv", "ov")), caches, strict=True):
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)  # one buffer, as the runtime binds it
    binding.bind_output("o")
    return median_us(lambda: sess.run_with_iobinding(binding))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 0])
    a = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {a.threads} threads; times in µs (medians)\n")
    print(f"| kernel | 1 row | {a.rows} rows | ratio |\n|---|---|---|---|")
    step = {1: 0.0, a.rows: 0.0}  # one decode step of the int4 graph at the first level: kernels only
    for level in a.levels:
        for name, (n, k) in SHAPES.items():
            sess = matmul_nbits(n, k, level, a.threads)
            one, many = time_matmul(sess, 1, k), time_matmul(sess, a.rows, k)
            if level == a.levels[0]:
                count = 1 if name == "head" else LAYERS
                step[1], step[a.rows] = step[1] + count * one, step[a.rows] + count * many
            print(f"| MatMulNBits {name} {n}x{k} int4 g64, accuracy_level {level} | {one:.1f} | {many:.1f} | "
                  f"{many / one:.2f}x |", flush=True)
    for dtype in (np.float32, np.float16):
        sess = gqa(dtype, a.threads)
        one, many = time_gqa(sess, 1, dtype), time_gqa(sess, a.rows, dtype)
        if dtype == np.float32:
            step[1], step[a.rows] = step[1] + LAYERS * one, step[a.rows] + LAYERS * many
        print(f"| GroupQueryAttention one layer, {np.dtype(dtype).name} KV | {one:.1f} | {many:.1f} | "
              f"{many / one:.2f}x |", flush=True)
    print(f"\nOne decode step, these kernels only (accuracy_level {a.levels[0]}, float32 KV): {step[1] / 1000:.2f} ms "
          f"at 1 row, {step[a.rows] / 1000:.2f} ms at {a.rows}: batching {a.rows} rows can give at most "
          f"{a.rows * step[1] / step[a.rows]:.2f}x the tokens/s of one, before any other op or overhead.")


if __name__ == "__main__":
    main()
