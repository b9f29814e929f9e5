"""The ONNX decoder builder: graph helpers, weight encodings, the decoder graph, validation against PyTorch."""
