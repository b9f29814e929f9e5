"""Measuring models: perplexity, KL and top-1 agreement; the before/after report; the CI gate (compare)."""
