"""Files other engines read unchanged: GGUF for llama.cpp, compressed-tensors ``pack-quantized`` for
transformers / vLLM / SGLang. Each module holds one format's reading, writing and checking; the export
passes (``passes/export_gguf.py``, ``passes/export_compressed_tensors.py``) orchestrate them."""
