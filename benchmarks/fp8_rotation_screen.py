"""Does a residual-stream rotation (QuaRot / SpinQuant R1, folded into the weights) lower FP8 dynamic's error on
SmolLM2? A screen before any pass is built: float, fp8 inputs only and fp8 weights + inputs (round to nearest,
heads float) on the model as it is, with its RMSNorm weights folded into the linears after them (the control:
folding alone changes what the q/k/v/gate/up inputs are), and rotated by a random orthogonal matrix, by a
randomized Hadamard matrix (order 576 = 12 x 12 x 4, Paley and Sylvester) and by the rotation ``passes/rotate.py``
fits to the fp8 input-rounding surrogate (``toolkit.algorithms.rotation``; 4 calibration windows, 200 steps here).

    python benchmarks/fp8_rotation_screen.py              # 4 evaluation windows
    python benchmarks/fp8_rotation_screen.py --windows 16

The rotation ``Q`` is orthogonal, so RMSNorm(x Q) = RMSNorm(x) Q once its weight is 1: embedding E -> E Q, every
linear reading the residual stream (q, k, v, gate, up) W -> W Q, every linear writing it (o, down) W -> Qᵀ W, the
head -> E diag(g_final) Q. The final norm's weight cannot fold into a head tied to the embedding, so a rotated
model with a non-unit final norm has an untied head (one more vocab x hidden matrix in the checkpoint). Only the
inputs of q/k/v/gate/up change; o_proj's and down_proj's inputs are the model's own (rotating those needs an
online Hadamard the consumers do not run).

Measured 2026-12-06 (``--windows 4``, host loaded by other sessions; perplexity does not depend on load; float
15.163 on these 4 windows). The surrogate (summed relative output error over the 60 reader groups, in units of
ε²) is 38.2 as is, 84.7 after the randomized Hadamard rotation and 28.3 after the fit:
| model | float: max abs logit change (window 0) | fp8 inputs only | fp8 weights + inputs |
|---|---|---|---|
| as is | 0 | 15.418 (+1.68 %) | 15.612 (+2.96 %) |
| norms folded | 5.9e-05 | 15.368 (+1.35 %) | 15.752 (+3.89 %) |
| rotated (orthogonal) | 1.3e-04 | 15.416 (+1.67 %) | 15.678 (+3.40 %) |
| rotated (Hadamard) | 8.1e-05 | 15.668 (+3.33 %) | 16.300 (+7.50 %) |
| rotated (fitted) | 9.2e-05 | 15.277 (+0.76 %) | 15.505 (+2.26 %) |
Random rotations do not help fp8 (the Hadamard one doubles the surrogate and the error: SmolLM2's large activation
channels meet small weight columns, which a rotation spreads over every column); the fitted rotation removes more
than half of the input-rounding cost. Folding the norms alone helps the inputs (not analysed; a per-channel
scaling changes only which codes land in e4m3's subnormal range, so that is the likely cause) but hurts
round-to-nearest weights.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from fp8_error_sources import variant
from torch import nn

from toolkit.algorithms.rotation import fit_rotation, rounding_surrogate
from toolkit.data import WindowSpec, token_windows
from toolkit.evaluation.perplexity import evaluate
from toolkit.models import load
from toolkit.models.architectures import layout_of
from toolkit.passes.rotate import fold, moments, reader_groups
from toolkit.quant.arithmetic import fp8_dequantize, fp8_quantize


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` = 2^a * 12^b (Sylvester and Paley's order-12 construction), unnormalized."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 12 == 0:
        q = 11  # Paley I: Q = Jacobsthal matrix of GF(11), H = I + [[0, 1ᵀ], [-1, Q]]
        squares = {(i * i) % q for i in range(1, q)}
        chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
        jac = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])
        s = torch.zeros(12, 12, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
        return torch.kron(torch.eye(12, dtype=torch.float64) + s, hadamard(n // 12))
    if n % 2 == 0:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), hadamard(n // 2))
    raise ValueError(f"no Hadamard construction here for order {n} (2^a * 12^b only)")


def rotation(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    h = hadamard(n) / math.sqrt(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    return signs[:, None] * h  # diag(s) H: still orthogonal


@torch.no_grad()
def folded_rotated(base: nn.Module, q: torch.Tensor | None) -> nn.Module:
    """A copy of ``base`` with its norms folded and, if ``q`` is given, its residual stream rotated by ``q``."""
    model = copy.deepcopy(base)
    arch = layout_of(model)
    hidden = model.get_submodule(arch.embed).weight.shape[1]
    fold(model, arch, reader_groups(arch), torch.eye(hidden, dtype=torch.float64) if q is None else q)
    return model


def fp8(w: torch.Tensor) -> torch.Tensor:
    return fp8_dequantize(*fp8_quantize(w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (16: the protocol)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-steps", type=int, default=200, help="Adam steps fitting the rotation (0: no fit)")
    parser.add_argument("--calib-count", type=int, default=4, help="calibration windows for the fit's moments")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    base = loaded.model.eval().float()
    windows = token_windows(loaded.tokenizer, WindowSpec(count=args.windows))
    hidden = base.model.embed_tokens.weight.shape[1]
    models = {"as is": base, "norms folded": folded_rotated(base, None),
              "rotated (orthogonal)": folded_rotated(base, rotation(hidden, "orthogonal", args.seed)),
              "rotated (Hadamard)": folded_rotated(base, rotation(hidden, "hadamard", args.seed))}
    if args.fit_steps:
        calib = token_windows(loaded.tokenizer, WindowSpec(split="calibration", count=args.calib_count,
                                                           sampling="random"))
        h, c = moments(base, reader_groups(layout_of(base)), calib)
        for name, r in (("identity", torch.eye(hidden, dtype=torch.float64)),
                        ("Hadamard", rotation(hidden, "hadamard", args.seed))):
            print(f"surrogate at {name}: {float(rounding_surrogate(h, c, r)):.4f}", flush=True)
        q = fit_rotation(h, c, args.fit_steps, 1e-3)
        print(f"surrogate fitted ({args.fit_steps} Adam steps): {float(rounding_surrogate(h, c, q)):.4f}", flush=True)
        models["rotated (fitted)"] = folded_rotated(base, q)
    float_ppl = evaluate(base, windows)["perplexity"]
    with torch.no_grad():
        ref = base(input_ids=windows[:1], use_cache=False).logits
    print(f"{args.model}; {args.windows} x 512 evaluation windows; heads float, weights rounded to nearest; float "
          f"perplexity {float_ppl:.4f}\n| model | float: max abs logit change (window 0) | fp8 inputs only | "
          "fp8 weights + inputs |\n|---|---|---|---|", flush=True)
    for name, model in models.items():
        with torch.no_grad():
            cells = [f"{float((model(input_ids=windows[:1], use_cache=False).logits - ref).abs().max()):.1e}"]
        for weights, kind in ((None, "float"), (fp8, "float")):
            ppl = evaluate(variant(model, weights, kind), windows)["perplexity"]
            cells.append(f"{ppl:.4f} ({100 * (ppl / float_ppl - 1):+.2f} %)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
