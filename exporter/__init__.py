"""Exporter: nn.Module -> ExportedProgram (torch.export); GraphModule -> ONNX."""
