"""Graph passes: fx/ rewrites GraphModules, onnx/ rewrites ONNX models, methods/ holds the pruning math."""
