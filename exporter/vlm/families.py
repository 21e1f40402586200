"""The VLM families tokensieve exports: one dict from the HF class to its adapter (exporter/vlm/adapter.py).

Adding a family = one adapter module (+ its tests) and one line here.
"""
from __future__ import annotations

from torch import nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.gemma3_adapter import Gemma3Adapter
from tokensieve.exporter.vlm.internvl_adapter import InternVLAdapter
from tokensieve.exporter.vlm.llava_adapter import LlavaAdapter
from tokensieve.exporter.vlm.qwen2_5_vl_adapter import Qwen25VLAdapter
from tokensieve.exporter.vlm.qwen2_vl_adapter import Qwen2VLAdapter
from tokensieve.exporter.vlm.qwen3_vl_adapter import Qwen3VLAdapter

ADAPTERS: dict[str, type[VlmAdapter]] = {cls.hf_class: cls for cls in (LlavaAdapter, Qwen2VLAdapter,
                                                                         Qwen25VLAdapter, Gemma3Adapter,
                                                                         InternVLAdapter, Qwen3VLAdapter)}
BY_MODEL_TYPE: dict[str, type[VlmAdapter]] = {cls.model_type: cls for cls in ADAPTERS.values()}


def adapter_class(model: nn.Module) -> type[VlmAdapter]:
    """The adapter of `model`'s HF class (or a base class of it); a one-line ConfigError naming the supported ones."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    kind = getattr(getattr(model, "config", None), "model_type", None)
    got = type(model).__name__ if kind is None else kind
    raise ConfigError(f"export_vlm supports {', '.join(c.label for c in ADAPTERS.values())}, got {got!r}; export "
                      "other models with tokensieve.api.export")


def adapter_for(model: nn.Module) -> VlmAdapter:
    """The adapter instance wrapping `model`."""
    return adapter_class(model)(model)


def adapter_by_type(model_type: str) -> type[VlmAdapter]:
    """The adapter of a manifest's or result's model_type ("llava", "qwen2_vl", "qwen2_5_vl")."""
    if model_type not in BY_MODEL_TYPE:
        raise ConfigError(f"model type {model_type!r} is not a VLM family tokensieve exports; one of "
                          f"{', '.join(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type]
