"""Tests of tokensieve.targets.onnxruntime (a package so its folder name cannot shadow an installed module, e.g. tensorrt)."""
