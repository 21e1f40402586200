"""Pruning math (torch only): each method is defined once here and used by the eager reference,
the custom ops the FX passes insert, and (after decomposition) the exported ONNX."""
