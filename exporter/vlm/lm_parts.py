"""LLaVA's language model as two cache-free graphs: prefill and one decode step.

    LmPrefill: inputs_embeds (B, T, H), attention_mask (B, T), position_ids (B, T)
               -> logits (B, V) of the last position, present.N.key / present.N.value (B, kv_heads, T, D)
    LmDecode:  input_ids (B, 1), attention_mask (B, P + 1), position_ids (B, 1), past.N.key / past.N.value (B, kv, P, D)
               -> logits (B, V), present.N.key / present.N.value (B, kv, P + 1, D)

A `DynamicCache` is built inside `forward` from the flat tensors and flattened again on the way out, so nothing
cache-typed crosses the graph boundary. The token embedding of decode runs inside the graph.

The ONNX axes are `sequence` (prefill: T), `past_sequence` (decode: P) and `past_sequence + 1` (decode's mask):
each forward states the mask's length with torch._check, so torch.export derives the mask axis from T or P instead
of giving it a symbol of its own (HF reads the mask by index, which ties nothing), and a TensorRT build takes the
mask's range from `--dims sequence=...,past_sequence=...` ("NAME + K follows NAME").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers.cache_utils import DynamicCache, DynamicLayer

from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.exporter.vlm.llava import LlavaLayout

# Batch >= 2 in the examples: a batch-1 sample would let torch.export specialize the batch axis to 1.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE = 2, 8
_BATCH = Dim("batch", min=1, max=4096)
# Sequence axes are Dim.DYNAMIC: a strict Dim fails on the KV cat's contiguity guard min(8(P+1), 16(P+1)) == 8(P+1).
_SEQ = Dim.DYNAMIC


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """["<prefix>.0.key", "<prefix>.0.value", "<prefix>.1.key", ...]."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def prefill_spec(layout: LlavaLayout) -> PartSpec:
    b, t, h = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, layout.text_hidden_size
    args = (torch.randn(b, t, h), torch.ones(b, t, dtype=torch.long), torch.arange(t).expand(b, -1).clone())
    names = ["inputs_embeds", "attention_mask", "position_ids"]
    return PartSpec(args, tuple({0: _BATCH, 1: _SEQ} for _ in names), names,
                    ["logits", *kv_names("present", layout.num_text_layers)],
                    {n: {0: "batch", 1: "sequence"} for n in names})


def decode_spec(layout: LlavaLayout) -> PartSpec:
    b, p = EXAMPLE_BATCH, EXAMPLE_SEQUENCE
    past = tuple(torch.randn(b, layout.num_kv_heads, p, layout.head_dim) for _ in range(2 * layout.num_text_layers))
    args = (torch.zeros(b, 1, dtype=torch.long), torch.ones(b, p + 1, dtype=torch.long), torch.full((b, 1), p), *past)
    past_names = kv_names("past", layout.num_text_layers)
    dims = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "position_ids": {0: "batch"}}  # mask: P + 1
    return PartSpec(args, ({0: _BATCH}, {0: _BATCH, 1: _SEQ}, {0: _BATCH}, tuple({0: _BATCH, 2: _SEQ} for _ in past)),
                    ["input_ids", "attention_mask", "position_ids", *past_names],
                    ["logits", *kv_names("present", layout.num_text_layers)],
                    dims | {n: {0: "batch", 2: "past_sequence"} for n in past_names})


def _cache_from(past: tuple[Tensor, ...]) -> DynamicCache:
    """A DynamicCache holding (past[0], past[1]), (past[2], past[3]), ... as its layers' keys and values.

    Not `DynamicCache(ddp_cache_data=...)`: that concatenates each past onto an empty 1-D tensor, and torch.export
    then guards on min(8 + 8P, 16 + 16P) == 8 + 8P, which it cannot prove for a dynamic past length P.
    """
    cache = DynamicCache()  # no layers yet; Cache.update appends DynamicLayers only past the ones given here
    for key, value in zip(past[0::2], past[1::2]):
        layer = DynamicLayer()
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
        cache.layers.append(layer)
    return cache


def _flatten(cache: DynamicCache) -> list[Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class LmPrefill(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.language_model, self.lm_head = model.model.language_model, model.lm_head

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        torch._check(attention_mask.shape[1] == inputs_embeds.shape[1])  # one `sequence` axis, not two symbols
        cache = DynamicCache()
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=True)
        return (self.lm_head(out.last_hidden_state[:, -1]), *_flatten(out.past_key_values))


class LmDecode(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.language_model, self.lm_head = model.model.language_model, model.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        if past:  # the mask axis becomes `past_sequence + 1`
            torch._check(attention_mask.shape[1] == past[0].shape[2] + 1)
        cache = _cache_from(past)
        out = self.language_model(inputs_embeds=self.language_model.embed_tokens(input_ids),
                                  attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                                  use_cache=True)
        return (self.lm_head(out.last_hidden_state[:, -1]), *_flatten(out.past_key_values))
