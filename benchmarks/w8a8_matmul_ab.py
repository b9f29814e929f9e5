"""A/B of the ONNX forms of one W8A8 linear on onnxruntime's CPU provider (issue 23: which form the ort export ships).

Each variant is one ``[M, K] x Wᵀ`` graph with int8 per-channel symmetric weights; the script prints what
onnxruntime fuses each into (the ops of its optimized graph), the error against the exact per-token product, and
median times as ratios to the float32 MatMul of the same shapes (ratios only: the machine is shared).

- ``per_token``: per-token symmetric int8 (ReduceMax|x| / 127, Div, Round, Clip, Cast int8) -> MatMulInteger
  (int8 x int8) -> Cast -> Mul (x scale) -> Mul (weight scales): what the PyTorch model computes.
- ``dynamic_tensor``: DynamicQuantizeLinear (uint8, asymmetric, one scale per call) -> MatMulInteger -> ...:
  onnxruntime's own dynamic quantization (``quantize_dynamic``), which it fuses to DynamicQuantizeMatMul.
- ``qdq_static``: QuantizeLinear / DequantizeLinear of x with a constant per-tensor scale, DequantizeLinear of the
  int8 weights per channel, MatMul: the QDQ form onnxruntime fuses for static activation scales.

    .venv/bin/python benchmarks/w8a8_matmul_ab.py --k 576 --n 1536 --rows 1 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from toolkit.onnx.graph import Builder, w8a8_linear  # the exporter's own per-token form
from toolkit.onnx.weights import LinearWeight
from toolkit.quant.spec import ActivationSpec


def _model(b: Builder, y: str, k: int) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "ab", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def variants(q: np.ndarray, s: np.ndarray, x_scale: float) -> dict[str, onnx.ModelProto]:
    """``q [N, K]`` int8 codes, ``s [N]`` float32 weight scales."""
    n, k = q.shape
    out: dict[str, onnx.ModelProto] = {}
    b = Builder()
    w = LinearWeight.from_codes(torch.from_numpy((q.astype(np.int16) + 128).astype(np.uint8)),
                                s[:, None], np.full((n, 1), 128, np.uint8), bits=8, group=k)
    w.act = ActivationSpec()  # int8 dynamic per token
    out["per_token"] = _model(b, w8a8_linear(b, "x", w, "lin"), k)
    b = Builder()
    xq, xs, xz = b.op("DynamicQuantizeLinear", ["x"], n_out=3)
    acc = b.one("MatMulInteger", [xq, b.const("wq_t", q.T.copy()), xz])
    y = b.one("Mul", [b.one("Mul", [b.one("Cast", [acc], to=TensorProto.FLOAT), xs]), b.const("ws", s)])
    out["dynamic_tensor"] = _model(b, y, k)
    b = Builder()
    sx = b.const("sx", np.float32(x_scale))
    xdq = b.one("DequantizeLinear", [b.one("QuantizeLinear", ["x", sx, b.const("zx", np.int8(0))]), sx])
    wdq = b.one("DequantizeLinear", [b.const("wq_t", q.T.copy()), b.const("ws", s)], axis=1)
    out["qdq_static"] = _model(b, b.one("MatMul", [xdq, wdq]), k)
    b = Builder()
    out["float"] = _model(b, b.one("MatMul", ["x", b.const("w_t", (q * s[:, None]).T.astype(np.float32))]), k)
    return out


def fused_ops(model: onnx.ModelProto, folder: Path, name: str) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(folder / f"{name}.opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sorted({n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node})


def median_time(sess: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (a.n, a.k)).astype(np.int8)
    s = (rng.random(a.n).astype(np.float32) + 0.5) / 127 / 20
    models = variants(q, s, x_scale=4.0 / 127)
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            print(f"{name:15s} fused to: {', '.join(fused_ops(m, Path(tmp), name))}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    sessions = {name: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for name, m in models.items()}
    for rows in a.rows:
        x = rng.standard_normal((rows, a.k)).astype(np.float32)
        scale = np.abs(x).max(axis=-1, keepdims=True) / 127
        exact = (np.clip(np.round(x / scale), -128, 127) * scale) @ (q.astype(np.float32) * s[:, None]).T
        ratios: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(a.rounds):  # interleaved, each round's own float baseline: a shared machine drifts
            times = {name: median_time(sess, x, a.repeats) for name, sess in sessions.items()}
            for name in sessions:
                ratios[name].append(times[name] / times["float"])
        for name, sess in sessions.items():
            err = np.abs(sess.run(None, {"x": x})[0] - exact).max() / np.abs(exact).max()
            print(f"M={rows:4d} {name:15s} time / float MatMul, median of {a.rounds} rounds "
                  f"{np.median(ratios[name]):5.2f}  max|Δ| / max|y| vs per-token {err:.2e}")

if __name__ == "__main__":
    main()
