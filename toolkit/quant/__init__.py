"""Quantized weights: the spec (bits, group, symmetry), packed formats, quantized modules, the packed checkpoint
(its record, writers and loaders), module surgery and the layer-by-layer calibration walk the passes share."""
