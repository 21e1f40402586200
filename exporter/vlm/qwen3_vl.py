"""Qwen3-VL in exportable parts, for one image or one video with a static patch grid (t, h, w).

vision_prune: pixel_values (N, C·T·P·P) -> patch embed + interpolated learned position embedding -> vision blocks
              (SDPA, the t temporal steps as its batch; DeepStack mergers after the `deepstack_visual_indexes`
              blocks) -> merger -> score -> fixed-budget TopK -> sort -> Gather
              =  image_features (K, H_lm), keep_idx (K,) ascending, deepstack_features (D, K, H_lm)
lm_prefill:   input_ids (1, T), image_features (K, H_lm), deepstack_features (D, K, H_lm), position_ids (3, 1, T)
              -> last logits (1, V) + flat K/V
lm_decode:    Qwen2-VL's (exporter/vlm/qwen2_vl.py): one token, position_ids (3, 1, 1), flat past K/V

The tower is Qwen2-VL's block for block (norm1, qkv, the same 2-D vision rotary, attention, proj, norm2, mlp; HF's
cu_seqlens put every temporal step in its own segment, as Qwen2-VL's), so Qwen3VLVisionPrune is Qwen2VLVisionPrune
with three additions. (1) A learned position embedding (num_position_embeddings = g x g) bilinearly resampled to the
grid and added after the patch embedding: HF derives the resampling taps from grid_thw with data-dependent ops, so
the taps (N, 4) and their weights are constants of the static grid (HF's own
get_vision_interpolation_indices_and_weights); the embedding lookup and weighted sum stay in the graph, on the
model's weights. (2) DeepStack: after each block in `deepstack_visual_indexes` its own merger (a post-shuffle-norm
PatchMerger) turns the block output into D extra levels of merged visual features. (3) Pruning keeps the same tokens
in every level: the stage's keep_idx (the main features' TopK) gathers each DeepStack level too, so level d's row j
belongs to the same merged token as image_features' row j. A merging method (holitom) has no such index for the
levels and is refused.

The language model adds DeepStack level d to the hidden states at the visual positions after decoder layer d (HF's
Qwen3VLTextModel._deepstack_process: `hidden[visual_mask] += level_d`, a boolean-mask index_put torch.export cannot
trace). lm_prefill does the same with the placeholders' CumSum row index: the j-th placeholder adds row j of each
level (Gather + Where, no scatter), through a forward hook on decoder layers 0..D-1 for the duration of the call
(installed and removed in forward). Text positions add exactly 0. The decode step carries no visual token, so it is
Qwen2-VL's part: HF's generate passes no DeepStack features after the prefill either.

Positions: Qwen3-VL's text rotary interleaves the M-RoPE sections (frequency i rotates by the t, h or w position by
i mod 3, up to the h and w sections' sizes); that happens inside HF's rotary module from (3, 1, T) ids, so the parts
take the same (3, 1, T) position ids as Qwen2-VL's, gathered at the kept columns of the unpruned prompt's
get_rope_index (exporter/vlm/qwen2_vl_adapter.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec, export_part
from tokensieve.exporter.vlm.qwen2_vl_fastv import Qwen2VLFastvDecode, Qwen2VLFastvPrefill
from tokensieve.exporter.vlm.qwen2_vl import (ImageLayout, Qwen2VLDecode, Qwen2VLVisionPrune, _lm_example,
                                              cache_names, cls_free_methods, fill_placeholders, flatten_cache)
from tokensieve.graph_passes.methods.spec import PruneMethod, Reduce
from tokensieve.graph_passes.methods.stage import run_stage

FAMILY = "Qwen3-VL"


def qwen3_methods(video: bool = False) -> list[str]:
    """Qwen2-VL's CLS-free methods that select (gather) tokens: a merging method's outputs are no rows of the
    DeepStack levels, so those are left out."""
    from tokensieve.graph_passes.methods.registry import METHODS

    return [m for m in cls_free_methods(video) if METHODS[m].reduce is not Reduce.MERGE]


def check_gathering(spec: PruneMethod, layout: ImageLayout) -> None:
    """One-line ConfigError for a merging method: the DeepStack levels need one keep index shared with the features."""
    if spec.reduce is Reduce.MERGE:
        raise ConfigError(f"{spec.name} merges tokens, but {FAMILY}'s DeepStack levels must keep the same tokens as "
                          f"the image features (one keep index for all); use one of: "
                          f"{', '.join(qwen3_methods(layout.is_video))}")


class Qwen3VLVisionPrune(Qwen2VLVisionPrune):
    """pixel_values (N, patch_dim) -> (image_features (K, H_lm), keep_idx (K,) int64 ascending, deepstack_features
    (D, K, H_lm)) for one static Qwen3-VL image or video.

    keep = layout.num_merged keeps every token (in order): image_features is HF's get_image_features' pooler_output
    and deepstack_features[d] its deepstack_features[d] (get_video_features for a video)."""

    family = FAMILY

    def __init__(self, visual: nn.Module, layout: ImageLayout, method: str, keep: int, options: dict | None = None):
        super().__init__(visual, layout, method, keep, options)
        check_gathering(self.spec, layout)
        taps, weights = get_vision_interpolation_indices_and_weights(
            layout.grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=layout.merge)
        self.register_buffer("pos_taps", taps, persistent=False)          # (N, 4) rows of pos_embed
        self.register_buffer("pos_weights", weights.float(), persistent=False)  # (N, 4) bilinear weights
        self.deepstack_layers = tuple(int(i) for i in visual.deepstack_visual_indexes)
        # the gather index of the DeepStack levels; None: keep_idx (a control swaps it for another index)
        self.deepstack_index: Tensor | None = None

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        visual = self.visual
        x = visual.patch_embed(pixel_values)                                      # (N, C)
        x = x + (visual.pos_embed(self.pos_taps) * self.pos_weights[:, :, None]).sum(1).to(x.dtype)
        blocks, levels = visual.blocks, []
        for index, blk in enumerate(blocks[:-1]):
            x, _ = self._block(index, blk, x)
            levels += self._deepstack(index, x)
        x_in = x
        x, (q, k, scale) = self._block(len(blocks) - 1, blocks[-1], x)
        levels += self._deepstack(len(blocks) - 1, x)
        merged = visual.merger(x).unsqueeze(0)                                    # (1, N_m, H_lm)
        scores = self._scores(q, k, scale, x_in, x, merged)
        tokens, idx, _ = run_stage(self.spec, self.options, self.keep, 0, scores=scores, x_out=merged,
                                   frames=self.layout.t)
        keep_idx = idx.squeeze(0)
        gather = keep_idx if self.deepstack_index is None else self.deepstack_index
        if not levels:  # a tower without DeepStack levels
            return tokens.squeeze(0), keep_idx, tokens.new_zeros(0, *tokens.shape[1:])
        deepstack = torch.stack(levels)[:, gather]                                # (D, K, H_lm): the same tokens
        return tokens.squeeze(0), keep_idx, deepstack

    def _deepstack(self, index: int, x: Tensor) -> list[Tensor]:
        """[the DeepStack level of block `index` (N_m, H_lm)] if the block feeds one, else []."""
        if index not in self.deepstack_layers:
            return []
        return [self.visual.deepstack_merger_list[self.deepstack_layers.index(index)](x)]


# --------------------------------------------------------------------------- LM parts


def deepstack_rows(input_ids: Tensor, deepstack_features: Tensor, placeholder_id: int) -> Tensor:
    """(1, T) ids, (D, K, H) levels -> (D, 1, T, H): the j-th placeholder's row is row j of each level, every other
    position 0 (what HF's `hidden[visual_mask] += level` adds there)."""
    is_image = input_ids == placeholder_id
    row = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp_min(0)       # j-th placeholder -> row j
    rows = deepstack_features[:, row]                                             # (D, 1, T, H)
    return torch.where(is_image[None, :, :, None], rows, torch.zeros_like(rows))


def mrope_axes(mrope_section, num_freqs: int) -> Tensor:
    """(num_freqs,) int64: the position axis (0 t, 1 h, 2 w) each rotary frequency reads in Qwen3-VL's interleaved
    M-RoPE (Qwen3VLTextRotaryEmbedding.recomposition_frequencies: h at 1, 4, ... < 3·section[1], w at 2, 5, ...
    < 3·section[2], t elsewhere)."""
    axes = torch.zeros(num_freqs, dtype=torch.long)
    for axis in (1, 2):
        axes[axis:3 * mrope_section[axis]:3] = axis
    return axes


@contextmanager
def exportable_mrope(rotary: nn.Module):
    """Qwen3-VL's text rotary with its interleaving as a select instead of HF's in-place strided slice assignment
    (which exports as ScatterND, refused in the LM parts): the same values, elementwise. Installed on the instance
    for the duration of the block."""
    def recompose(freq: Tensor) -> Tensor:                                       # (3, B, T, F) -> (B, T, 2F)
        axes = mrope_axes(rotary.mrope_section, freq.shape[-1]).to(freq.device)
        thw = torch.where(axes == 1, freq[1], torch.where(axes == 2, freq[2], freq[0]))
        return torch.cat((thw, thw), dim=-1)

    rotary.recomposition_frequencies = recompose
    try:
        yield
    finally:
        del rotary.recomposition_frequencies


@contextmanager
def deepstack_hooks(layers: nn.ModuleList, added: Tensor, pad: bool = False):
    """Forward hooks adding added[d] (D, B, T, H) to the output of decoder layer d, d < D, while the block runs.
    pad=True (the eager FastV reference, which re-runs the layers over the prompt + generated tokens with no cache):
    positions past T add 0."""
    def hook(d, out):
        rows = added[d].to(out.dtype)
        if pad and out.shape[1] > rows.shape[1]:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, out.shape[1] - rows.shape[1]))
        return out + rows

    handles = [layers[d].register_forward_hook(lambda _m, _a, out, d=d: hook(d, out))
               for d in range(min(added.shape[0], len(layers)))]  # HF: levels past the last layer add nothing
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Qwen3VLPrefill(nn.Module):
    """(input_ids (1, T), image_features (K, H), deepstack_features (D, K, H), position_ids (3, 1, T)) -> (last logits
    (1, V), k0, v0, k1, ...). The placeholders (`image_token_id`; video=True: `video_token_id`) take the features in
    order, and after decoder layer d < D the j-th placeholder's hidden state gets row j of level d added."""

    def __init__(self, model: nn.Module, video: bool = False):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.placeholder_id = int(model.config.video_token_id if video else model.config.image_token_id)

    def forward(self, input_ids: Tensor, image_features: Tensor, deepstack_features: Tensor,
                position_ids: Tensor) -> tuple[Tensor, ...]:
        embeds, _ = fill_placeholders(self.lm.embed_tokens, input_ids, image_features, self.placeholder_id)
        added = deepstack_rows(input_ids, deepstack_features, self.placeholder_id)
        cache = DynamicCache(config=self.lm.config)
        with deepstack_hooks(self.lm.layers, added), exportable_mrope(self.lm.rotary_emb):
            out = self.lm(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1])
        return (logits, *flatten_cache(out.past_key_values))


class Qwen3VLDecode(Qwen2VLDecode):
    """Qwen2-VL's decode step (no visual token, so no DeepStack) with the exportable interleaved M-RoPE."""

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        with exportable_mrope(self.lm.rotary_emb):
            return super().forward(input_ids, position_ids, *past)


def export_vision_prune(module: Qwen3VLVisionPrune):
    """vision_prune as an onnx_ir.Model: input `pixel_values` (N, patch_dim), outputs `image_features` (K, H_lm),
    `keep_idx` (K,), `deepstack_features` (D, K, H_lm); every shape static."""
    layout = module.layout
    spec = PartSpec((torch.zeros(layout.num_patches, layout.patch_dim),), (None,), ["pixel_values"],
                    ["image_features", "keep_idx", "deepstack_features"], {})
    return export_part(module, spec, what=f"{FAMILY} vision_prune")


def export_lm_prefill(model: nn.Module, keep: int, prompt_len: int, video: bool = False):
    """lm_prefill as an onnx_ir.Model for a pruned prompt holding `keep` image (video) tokens, batch 1; the prompt
    length (`sequence`) is dynamic, `prompt_len` only sizes the example."""
    cfg, _, pos = _lm_example(model, prompt_len)
    prefill = Qwen3VLPrefill(model, video)
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    ids = torch.full((1, prompt_len), 1, dtype=torch.long)
    ids[0, 1:1 + keep] = prefill.placeholder_id
    seq = torch.export.Dim.DYNAMIC
    return export_part(prefill, PartSpec(
        (ids, torch.zeros(keep, cfg.hidden_size), torch.zeros(levels, keep, cfg.hidden_size), pos),
        ({1: seq}, None, None, {2: seq}), ["input_ids", "image_features", "deepstack_features", "position_ids"],
        ["logits", *cache_names(cfg.num_hidden_layers, "present")], {"input_ids": {1: "sequence"}}),
        what=f"{FAMILY} lm_prefill")


def export_lm_decode(model: nn.Module, prompt_len: int):
    """lm_decode as an onnx_ir.Model (batch 1): one token on a past of dynamic length (`past_sequence`; the example
    has `prompt_len`); the same for images and videos."""
    cfg, head_dim, pos = _lm_example(model, prompt_len)
    n_layers = cfg.num_hidden_layers
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, prompt_len, head_dim) for _ in range(2 * n_layers))
    past_names = cache_names(n_layers, "past")
    seq = torch.export.Dim.DYNAMIC
    return export_part(Qwen3VLDecode(model), PartSpec(
        (torch.ones(1, 1, dtype=torch.long), pos[:, :, :1].contiguous(), *past),
        (None, None, tuple({2: seq} for _ in past)), ["input_ids", "position_ids", *past_names],
        ["logits", *cache_names(n_layers, "present")], {n: {2: "past_sequence"} for n in past_names}),
        what=f"{FAMILY} lm_decode")


# --------------------------------------------------------------------------- FastV (inner pruning in the prefill)
# Qwen2-VL's FastV parts (exporter/vlm/qwen2_vl_fastv.py, the shared layer loop fastv.FastvLayers, which calls each
# decoder layer as a module, so the DeepStack hooks fire in it) with the DeepStack input and the exportable M-RoPE.
# FastV after layer L gathers the hidden states to T' tokens; the DeepStack rows are (T) long, so every level must be
# added before that: L >= D - 1 (check_fastv_layer). At L = D - 1 the last level is added to layer L's output before
# the gather, which is the order HF's layer-then-DeepStack gives a kept token.


def check_fastv_layer(model: nn.Module, spec) -> None:
    """One-line ConfigError if FastV prunes after a layer L < D - 1 (DeepStack still adds its levels after it)."""
    levels = min(len(model.config.vision_config.deepstack_visual_indexes), model.config.text_config.num_hidden_layers)
    if spec.layer < levels - 1:
        raise ConfigError(f"inner {spec.shorthand()!r}: {FAMILY} adds its {levels} DeepStack levels to the visual "
                          f"tokens after decoder layers 0..{levels - 1}, so FastV must prune after layer "
                          f"{levels - 1} or later; use @{levels - 1}:R or a later layer")


class Qwen3VLFastvPrefill(Qwen2VLFastvPrefill):
    """(input_ids (1, T), image_features (K, H), deepstack_features (D, K, H), position_ids (3, 1, T)) -> (logits, k0,
    v0, ..., keep_idx (T',), image_keep_idx (R,)): Qwen2-VL's FastV prefill with the DeepStack additions after layers
    0..D-1 (all before the pruning layer's gather)."""

    def __init__(self, model: nn.Module, spec, video: bool = False):
        check_fastv_layer(model, spec)
        super().__init__(model, spec, video)

    def forward(self, input_ids: Tensor, image_features: Tensor, deepstack_features: Tensor,
                position_ids: Tensor) -> tuple[Tensor, ...]:
        added = deepstack_rows(input_ids, deepstack_features, self.placeholder_id)
        with deepstack_hooks(self.layers, added), exportable_mrope(self.rotary_emb):
            return super().forward(input_ids, image_features, position_ids)


class Qwen3VLFastvDecode(Qwen2VLFastvDecode):
    """Qwen2-VL's FastV decode step (caches of two lengths) with the exportable interleaved M-RoPE."""

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        with exportable_mrope(self.rotary_emb):
            return super().forward(input_ids, position_ids, *past)


def export_fastv_prefill(model: nn.Module, spec, prompt_len: int, video: bool = False):
    """The FastV lm_prefill as an onnx_ir.Model (batch 1, `sequence` dynamic; `prompt_len` >= K + 2 sizes the example,
    whose K placeholders sit at 1..K)."""
    cfg, _, pos = _lm_example(model, prompt_len)
    prefill = Qwen3VLFastvPrefill(model, spec, video).eval()
    k, levels = spec.num_image_tokens, len(model.config.vision_config.deepstack_visual_indexes)
    ids = torch.full((1, prompt_len), 1, dtype=torch.long)
    ids[0, 1:1 + k] = prefill.placeholder_id
    seq = torch.export.Dim.DYNAMIC
    return export_part(prefill, PartSpec(
        (ids, torch.zeros(k, cfg.hidden_size), torch.zeros(levels, k, cfg.hidden_size), pos),
        ({1: seq}, None, None, {2: seq}), ["input_ids", "image_features", "deepstack_features", "position_ids"],
        ["logits", *cache_names(cfg.num_hidden_layers, "present"), "keep_idx", "image_keep_idx"],
        {"input_ids": {1: "sequence"}}), what=f"{FAMILY} FastV lm_prefill")


def export_fastv_decode(model: nn.Module, spec):
    """The FastV lm_decode as an onnx_ir.Model (batch 1): `past_sequence` for layers 0..L, `pruned_past_sequence` for
    the rest (example lengths p and p - dropped, distinct and >= 2, as Qwen2-VL's)."""
    cfg, head_dim, _ = _lm_example(model, 1)
    p = 12 + max(spec.dropped, 1)
    q = p - max(spec.dropped, 1)
    layers = cfg.num_hidden_layers
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, p if i // 2 <= spec.layer else q, head_dim)
                 for i in range(2 * layers))
    past_names = cache_names(layers, "past")
    dims = {name: {2: "past_sequence" if int(name.split(".")[1]) <= spec.layer else "pruned_past_sequence"}
            for name in past_names}
    seq = torch.export.Dim.DYNAMIC
    return export_part(Qwen3VLFastvDecode(model, spec).eval(), PartSpec(
        (torch.ones(1, 1, dtype=torch.long), torch.full((3, 1, 1), p), *past),
        (None, None, tuple({2: seq} for _ in past)), ["input_ids", "position_ids", *past_names],
        ["logits", *cache_names(layers, "present")], dims), what=f"{FAMILY} FastV lm_decode")
