"""Evaluation under one fixed protocol.

Perplexity: token-level mean negative log-likelihood over non-overlapping windows (default 16 x 512
tokens of the evaluation half of ``pydoc``), each window scored independently, predicting tokens 1..L-1.
Against a reference model on the same windows: mean KL(reference || candidate) per token and top-1
agreement of the argmax predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from toolkit.errors import ToolkitError


@torch.no_grad()
def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits.float()


def kl_divergence_sum(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Σ over positions of KL(reference || candidate) from both log-probabilities ``[..., V]``."""
    return float((reference.exp() * (reference - candidate)).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None, batch_size: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of ``model`` on ``windows: [N, L]``; KL and top-1 agreement when ``reference`` is given."""
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    batches = list(windows.split(batch_size))
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        logits = _logits(model, batch)[:, :-1]  # [B, L-1, V]
        targets = batch[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += float(-logp.gather(-1, targets.unsqueeze(-1)).sum())
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, batch)[:, :-1], dim=-1)
            kl_sum += kl_divergence_sum(ref_logp, logp)
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    nll = nll_sum / count
    result = {"perplexity": math.exp(nll), "nll": nll, "tokens": float(count)}
    if reference is not None:
        result["kl_divergence"] = kl_sum / count
        result["top1_agreement"] = agree / count
    return result


@torch.no_grad()
def relative_logit_error(reference: nn.Module, candidate: nn.Module, vocab_size: int) -> float:
    """max |Δlogits| / max |logits| of ``candidate`` against ``reference`` on seeded random tokens, over a
    single row of 7 and a batch of 2 x 33: how an exported checkpoint reloaded by its consumer proves itself."""
    worst = 0.0
    for shape in ((1, 7), (2, 33)):
        ids = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
        ref = _logits(reference, ids)
        got = _logits(candidate, ids)
        worst = max(worst, float((ref - got).abs().max() / ref.abs().max()))
    return worst


def check_reloaded(reference: nn.Module, candidate: nn.Module, tolerance: float, what: str) -> float:
    """``relative_logit_error`` of an export reloaded by its consumer; a ToolkitError naming ``what`` above
    ``tolerance`` (an exporter bug, never the user's input)."""
    worst = relative_logit_error(reference, candidate, reference.config.vocab_size)  # type: ignore[union-attr]
    if worst > tolerance:
        raise ToolkitError(f"the exported {what} disagrees with the model (relative logit error {worst:.3g} > "
                           f"{tolerance}); this is a bug in the exporter, please report it")
    return worst
