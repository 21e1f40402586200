"""ONNX-level passes and checks (onnx / onnx-ir)."""
