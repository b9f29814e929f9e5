"""Pure math on tensors: round-to-nearest, GPTQ, AWQ, second-moment accumulation, distillation losses."""
