"""Pure quantization algorithms on tensors (no model walking): GPTQ and AWQ."""
