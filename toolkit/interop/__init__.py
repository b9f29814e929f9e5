"""Files other engines read unchanged: GGUF for llama.cpp, compressed-tensors ``pack-quantized`` for
transformers / vLLM / SGLang. Each module holds one format's writing and checking (and compressed-tensors' reading;
a GGUF is read by the model intake's checked reader, ``toolkit.models.gguf_reader``); the export passes
(``passes/export_gguf.py``, ``passes/export_compressed_tensors.py``) orchestrate them."""
