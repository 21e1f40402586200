"""Targets: ONNX -> deployable artifacts (TensorRT / TensorRT-RTX engines + metadata)."""
