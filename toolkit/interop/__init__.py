"""Files other engines read unchanged: GGUF for llama.cpp, compressed-tensors ``pack-quantized`` for
transformers / vLLM / SGLang, Hugging Face GPTQ checkpoints for transformers / vLLM / TGI. Each module holds one
format's metadata, tensor names and checking, and the compressed-tensors and GPTQ readers (a GGUF is read by the
model intake's checked reader, ``toolkit.models.gguf_reader``); the packed bytes are ``toolkit.quant.formats``'.
The export passes (``passes/export_gguf.py``, ``passes/export_compressed_tensors.py``, ``passes/export_hf_gptq.py``)
orchestrate them."""
