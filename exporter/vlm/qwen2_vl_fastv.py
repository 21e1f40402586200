"""FastV (inner visual-token pruning inside the LLM prefill) for Qwen2-VL, images and videos, with M-RoPE, as
exportable prefill / decode parts, and its eager reference.

    result = export_vlm(model, "out/qwen", "uniform:1.0", grid=(1, 8, 8), inner="fastv@1:0.5")   # FastV only
    result = export_vlm(model, "out/qwen", "attn-mean:8", grid=(3, 4, 4), inner="fastv@1:4")     # ToDRE-style
    report = verify_vlm(result)   # ORT greedy ids == the eager reference below, kept image tokens, every step's logits

The spec and its checks are LLaVA's (exporter/vlm/fastv.py: `fastv[(debias=true,uniform=S,merge=true)]@L:R`,
parse_fastv);
N there is the K image (video) tokens the outer stage (vision_prune) keeps, so outer keeps K and FastV keeps R of
those K. Batch 1, as the other Qwen2-VL parts.

Prefill (`Qwen2VLFastvPrefill`, lm_prefill.onnx):
    input_ids (1, T) (the outer-pruned prompt, K placeholders), image_features (K, H), position_ids (3, 1, T) M-RoPE
    -> logits (1, V), present.i.key/value (1, kv, T, D) for layers 0..L and (1, kv, T', D) for layers L+1..,
       keep_idx (T',) int64 (prompt columns kept, ascending), image_keep_idx (R,) int64 (kept ordinals among the K
       image tokens, ascending), T' = T - (K - R).
    The placeholders (image_token_id; a video: video_token_id) take the features in order (as Qwen2VLPrefill); their
    sequence indices are the K smallest of `index + T * (not placeholder)` (one TopK with the static K). Layers 0..L
    run over all T tokens. Score: the head-mean softmax row of the LAST prompt position at layer L, recomputed from
    layer L's q (of its normed input) and its cached keys: both rotated by M-RoPE exactly as Qwen2VLAttention does
    (the rotary cos/sin of the (3, 1, T) ids, mrope_section recomposed; the key cache holds rotated keys), GQA keys
    repeated (fastv.fastv_scores). The R best image tokens are kept (fastv.select_image_tokens: TopK -> sort, with
    debias / uniform=S as for LLaVA), every text token is kept; merge=true (HoliTom) first merges each other image
    token into its most similar kept one (fastv.merge_into_kept, on layer L's output); the hidden states AND the
    (3, 1, T) position ids are gathered at keep_idx, so kept tokens keep their original M-RoPE positions (a merged
    token too: its kept token's), and layers L+1.. run on T' tokens. HoliTom on a Qwen2-VL video = outer `holitom` +
    inner `fastv(merge=true)@L:R`, HoliTom's layer k being our L = k - 1.
    Masks: causal (plus the diagonal) by hand; batch 1 has no padding.
Decode (`Qwen2VLFastvDecode`, lm_decode.onnx):
    input_ids (1, 1), position_ids (3, 1, 1), past.i.key/value (1, kv, P, D) for layers 0..L (`past_sequence`),
    (1, kv, P', D) for layers L+1.. (`pruned_past_sequence`, P' = P - (K - R)) -> logits (1, V), present.i.* one
    longer. Each layer attends over its whole own cache (one query: nothing to mask). The next token's position is
    the one vlm_qwen2 gives without FastV: max(M-RoPE position of the unpruned prompt) + 1 + generated so far
    (the inner pruning moves no position: vlm_qwen2's delta with the full-length cache length P).

The eager reference (`reference_qwen2_fastv_generate`) is independent of the parts: HF's own eager attention
probabilities (output_attentions, fastv.fastv_score_reference) give the score, the image positions come from
input_ids by nonzero, the selection is fastv.reference_image_keep, merge=true is HoliTom's literal sequential loop
(fastv.reference_merge) on layer L's output, and every greedy step re-runs HF's decoder layers
by hand over the whole sequence with no cache: layers 0..L over every token, layers L+1.. over the kept prompt
tokens plus the generated ones, each with its M-RoPE ids (generated token j at next_position + j on all 3 axes).

debias: `qwen2_vl_adapter.calibrate_qwen2_fastv_bias(model, vision, pixel_values, input_ids, layer)` gives the (K,) bias of
`export_vlm(..., inner="fastv(debias=true)@L:R", inner_bias=bias)` (or `np.save` it for `export-vlm --inner-bias`):
each calibration sample goes through the outer stage and the adapter's M-RoPE bookkeeping as the greedy path does, its
reference score row (fastv_score_reference) at the image ordinals is averaged over the samples.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import LmLayout, lm_layout_of
from tokensieve.exporter.vlm.export_part import PartSpec, export_part
from tokensieve.exporter.vlm.fastv import (FastvLayers, FastvReference, FastvSpec, place_features,
                                           reference_generate_layers)
from tokensieve.exporter.vlm.qwen2_vl import cache_names, fill_placeholders

_SEQ = Dim.DYNAMIC  # a strict Dim fails on the KV cat's contiguity guard (as for the plain parts)


def gather_mrope(positions: Tensor, cols: Tensor) -> Tensor:
    """M-RoPE ids (3, B, T) at the kept columns (B, T'): kept tokens keep their (t, h, w) positions."""
    return positions.gather(2, cols.unsqueeze(0).expand(3, -1, -1))


def lm_layout(model: nn.Module) -> LmLayout:
    """The language model's sizes (fastv.prefill_macs reads them)."""
    return lm_layout_of(model.config.text_config)


def check_fastv_prompt(input_ids: Tensor, placeholder_id: int, num_image_tokens: int) -> None:
    """One-line ConfigError unless the (outer-pruned) (1, T) prompt holds K placeholders and ends with a text token."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"input_ids must be (1, T): the Qwen2-VL parts are batch 1, got {tuple(input_ids.shape)}")
    count = int((input_ids == placeholder_id).sum())
    if count != num_image_tokens:
        raise ConfigError(f"the prompt holds {count} placeholder tokens (id {placeholder_id}) but FastV was exported "
                          f"for {num_image_tokens} (the outer stage's keep)")
    if int(input_ids[0, -1]) == placeholder_id:
        raise ConfigError("FastV scores the image tokens with the last prompt position: the prompt must end with a "
                          "text token (e.g. <vision_end> and the question), not a placeholder")


class Qwen2VLFastvPrefill(FastvLayers):
    """(input_ids (1, T), image_features (K, H), position_ids (3, 1, T)) -> (logits (1, V), k0, v0, ..., keep_idx (T',),
    image_keep_idx (R,)); see the module docstring."""

    def __init__(self, model: nn.Module, spec: FastvSpec, video: bool = False, gather_positions=gather_mrope):
        super().__init__(model, spec, gather_positions)
        self.embed_tokens = model.model.language_model.embed_tokens
        self.placeholder_id = int(model.config.video_token_id if video else model.config.image_token_id)
        self.selection()

    def forward(self, input_ids: Tensor, image_features: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        h, is_image = fill_placeholders(self.embed_tokens, input_ids, image_features, self.placeholder_id)
        t = h.shape[1]
        ar = torch.arange(t, device=h.device)
        # the K placeholder indices, ascending: the K smallest keys (text columns pushed past T)
        image_positions = torch.topk(ar + (~is_image).to(torch.int64) * t, self.spec.num_image_tokens, dim=-1,
                                     largest=False).indices                      # (1, K)
        valid = torch.ones_like(input_ids, dtype=torch.bool)  # batch 1: no padding
        logits, caches, keep_idx, image_keep = self.prefill(h, position_ids, valid, image_positions)
        return (logits, *caches, keep_idx[0], image_keep[0])


class Qwen2VLFastvDecode(FastvLayers):
    """(input_ids (1, 1), position_ids (3, 1, 1), k0, v0, ...) -> (logits (1, V), k0, v0, ...): one step over caches of
    two lengths (layers 0..L: P, layers L+1..: P - (K - R)); one query over its layer's own cache: no mask."""

    def __init__(self, model: nn.Module, spec: FastvSpec):
        super().__init__(model, spec, gather_mrope)
        self.embed_tokens = model.model.language_model.embed_tokens

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        return self.decode(self.embed_tokens(input_ids), position_ids, past, None, None)


# --------------------------------------------------------------------------- ONNX


def export_fastv_prefill(model: nn.Module, spec: FastvSpec, prompt_len: int, video: bool = False,
                         prefill: Qwen2VLFastvPrefill | None = None):
    """The FastV lm_prefill as an onnx_ir.Model (batch 1, `sequence` dynamic; `prompt_len` >= K + 2 sizes the example,
    whose K placeholders sit at 1..K)."""
    lay, k = lm_layout(model), spec.num_image_tokens
    prefill = (Qwen2VLFastvPrefill(model, spec, video) if prefill is None else prefill).eval()  # the adapter's
    ids = torch.full((1, prompt_len), 1, dtype=torch.long)
    ids[0, 1:1 + k] = prefill.placeholder_id
    pos = torch.arange(prompt_len).view(1, 1, -1).expand(3, 1, -1).contiguous()
    return export_part(prefill, PartSpec(
        (ids, torch.zeros(k, lay.text_hidden_size), pos), ({1: _SEQ}, None, {2: _SEQ}),
        ["input_ids", "image_features", "position_ids"],
        ["logits", *cache_names(lay.num_text_layers, "present"), "keep_idx", "image_keep_idx"],
        {"input_ids": {1: "sequence"}}), what="Qwen2-VL FastV lm_prefill")


def export_fastv_decode(model: nn.Module, spec: FastvSpec):
    """The FastV lm_decode as an onnx_ir.Model (batch 1): `past_sequence` for layers 0..L, `pruned_past_sequence` for
    the rest. The example lengths p and p - dropped are distinct and >= 2 however many are dropped (two symbols, no
    0/1 specialization)."""
    lay = lm_layout(model)
    p = 12 + max(spec.dropped, 1)
    q = p - max(spec.dropped, 1)
    shape = lambda length: (1, lay.num_kv_heads, length, lay.head_dim)  # noqa: E731
    past = tuple(torch.zeros(shape(p if i <= spec.layer else q)) for i in range(lay.num_text_layers) for _ in "kv")
    past_names = cache_names(lay.num_text_layers, "past")
    dims = {name: {2: "past_sequence" if int(name.split(".")[1]) <= spec.layer else "pruned_past_sequence"}
            for name in past_names}
    return export_part(Qwen2VLFastvDecode(model, spec).eval(), PartSpec(
        (torch.ones(1, 1, dtype=torch.long), torch.full((3, 1, 1), p), *past),
        (None, None, tuple({2: _SEQ} for _ in past)), ["input_ids", "position_ids", *past_names],
        ["logits", *cache_names(lay.num_text_layers, "present")], dims), what="Qwen2-VL FastV lm_decode")


# --------------------------------------------------------------------------- eager reference


def reference_qwen2_fastv_generate(model: nn.Module, input_ids: Tensor, image_features: Tensor, position_ids: Tensor,
                                   next_position: int, spec: FastvSpec, placeholder_id: int,
                                   max_new_tokens: int = 8) -> FastvReference:
    """Eager FastV with HF Qwen2-VL's language model on one (outer-pruned) prompt: input_ids (1, T) with K placeholders,
    image_features (K, H), its M-RoPE position_ids (3, 1, T), and `next_position` (the first generated token's
    position: max over the unpruned prompt + 1) -> fastv.reference_generate_layers (no padding: a mask of ones;
    generated token j at next_position + j on all 3 axes)."""
    ids = input_ids.long()
    check_fastv_prompt(ids, placeholder_id, spec.num_image_tokens)
    if tuple(position_ids.shape) != (3, 1, ids.shape[1]):
        raise ConfigError(f"position_ids must be (3, 1, {ids.shape[1]}) M-RoPE ids, got {tuple(position_ids.shape)}")
    embeds = place_features(model, ids, image_features, placeholder_id)
    return reference_generate_layers(
        model, ids == placeholder_id, embeds, torch.ones_like(ids), position_ids, spec, max_new_tokens, gather_mrope,
        lambda pos, step: torch.full((3, 1, 1), next_position + step, dtype=pos.dtype))
