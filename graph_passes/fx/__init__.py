"""FX passes over the unlifted GraphModule of a torch.export trace (GraphModule -> GraphModule)."""
