"""Quantized weights: the spec (bits, group, symmetry), packed formats, quantized modules, module surgery
and the layer-by-layer calibration walk the passes share."""
