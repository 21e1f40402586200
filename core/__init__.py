"""tokensieve: compile token-pruned vision transformers into static-shape ONNX and TensorRT engines."""
from __future__ import annotations

__all__ = ["export", "verify", "build", "bench", "save", "parse_recipe", "load_model", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import tokensieve` stays cheap (no torch) for the CLI's --help
    if name in ("export", "verify", "build", "bench", "save"):
        from tokensieve import api

        return getattr(api, name)
    if name == "parse_recipe":
        from tokensieve.recipe import parse_recipe

        return parse_recipe
    if name == "load_model":
        from tokensieve.models import load_model

        return load_model
    raise AttributeError(name)
