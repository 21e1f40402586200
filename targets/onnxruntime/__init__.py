"""ONNX Runtime as a target: the graph transforms a deployment on ORT runs before shipping — its transformer optimizer
(fused SkipLayerNormalization, BiasGelu, Attention contrib ops) and int8 QDQ quantization that keeps a stage's score
math in float. Both run on a tokensieve ONNX file and write a new one; the api verifies the result."""
