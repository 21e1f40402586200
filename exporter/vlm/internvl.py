"""InternVL's vision side (InternViT + pixel shuffle + MLP projector) with outer visual-token pruning, per tile.

    pixel_values (T, 3, S, S): T static tiles (InternVL's dynamic tiling, the count fixed at export)
    -> InternViT embeddings ([CLS] + g x g patches, absolute positions) -> layers 0..L (L = the layer whose output
    InternVL takes, `vision_feature_layer`; -1: the last, through the tower's final norm as HF's last_hidden_state)
    -> drop [CLS] -> g x g grid -> HF's own pixel shuffle (downsample_ratio 0.5: each 2 x 2 patch block -> one token
    of 4C channels) -> projector -> (T, N, H_lm), N = (g/2)^2 image tokens per tile
    -> score -> fixed-budget select per tile (TopK K -> sort) -> gather
    -> image_features (1, T·K, H_lm): the tiles' kept tokens in tile order, each tile's in raster order
       keep_idx (T, K) int64: per tile, the kept image tokens (0-based over the tile's (g/2) x (g/2) token grid)

Where the stage prunes: the image tokens after the pixel shuffle, not the patches before it. The shuffle is a static
reshape of the whole g x g grid, so pruning patches before it would have to keep whole 2 x 2 blocks anyway (any other
subset cannot be shuffled); choosing blocks is exactly choosing shuffled tokens, which is static (K of the N per
tile), keeps keep_idx in the units of the LLM's image tokens and lets a TOKENS method (divprune, uniform, random)
score the tokens the LLM really sees (the projected features, as for Qwen2-VL's merged tokens). Scores read from the
feature layer (attention, hidden states) are per patch; a token's score is the mean over its 2 x 2 block, pooled
with the same pixel shuffle as the features (so the grouping is HF's by construction). cls-topk (FasterVLM) is
defined faithfully: InternViT keeps a [CLS] token through every layer (InternVL only drops it after the tower), so its
attention row at layer L is FasterVLM's score; a token gets its block's mean [CLS] attention (the same ranking as the
attention mass [CLS] puts on the block). The per-patch score is computed per tile (a tile is one ViT sequence), and
every tile keeps K: a fixed budget per tile, not a global one across tiles.

Refused in one line: methods that merge, carry state, keep an input-dependent count, read two layers, are video
methods, add tokens (fuse/pospad), export a Loop, or place part of their budget at evenly spaced *patch* positions by
attention (feather: those positions have no per-token meaning after the shuffle; uniform on the tokens does apply).
Running this module eagerly is the reference; exporting it is the graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import lm_layout_of
from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.exporter.vlm.llava import LlavaLayout
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.spec import PruneMethod, Reduce, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage, score_call

NUM_PREFIX_TOKENS = 1  # InternViT's [CLS]


@dataclass(frozen=True)
class InternVLLayout(LlavaLayout):
    """LLaVA's layout facts (image_size: a tile's side S, num_patches: a tile's patches, feature_layer: the 0-based
    InternViT layer the stage reads, keep_cls False, the language model's sizes) plus the tiles and the shuffle."""

    tiles: int                  # T: tiles per image (pixel_values rows), fixed at export
    grid: int                   # g: patches per side of a tile
    scale: int                  # r = 1 / downsample_ratio: the pixel shuffle joins r x r patches into one token
    tokens_per_tile: int        # N = (g / r)^2 image tokens per tile before pruning
    final_norm: bool            # vision_feature_layer == -1: HF takes last_hidden_state (the tower's final norm)


def internvl_layout(model: nn.Module, tiles: int) -> InternVLLayout:
    """The layout of an `InternVLForConditionalGeneration` with `tiles` tiles per image; one-line ConfigError when
    the model or the tile count cannot hold it."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "internvl" or not hasattr(model, "lm_head") \
            or not hasattr(getattr(model, "model", None), "vision_tower"):
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise ConfigError(f"InternVL export needs a transformers InternVLForConditionalGeneration, got {kind!r}; "
                          "load it with InternVLForConditionalGeneration.from_pretrained")
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
        raise ConfigError(f"tiles={tiles!r} must be a positive integer (the static tile count per image, e.g. 1, or "
                          "InternVL's 6 tiles + 1 thumbnail = 7)")
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    size, patch = tuple(vcfg.image_size), tuple(vcfg.patch_size)
    if size[0] != size[1] or patch[0] != patch[1] or size[0] % patch[0]:
        raise ConfigError(f"InternVL vision image_size {size} / patch_size {patch}: tiles must be square and a whole "
                          "number of patches (HF reshapes the patches to a square grid)")
    grid = size[0] // patch[0]
    inverse = 1 / cfg.downsample_ratio
    scale = round(inverse)
    if scale < 1 or abs(inverse - scale) > 1e-6 or grid % scale:
        raise ConfigError(f"downsample_ratio={cfg.downsample_ratio} does not tile a {grid} x {grid} patch grid "
                          f"({size[0]} px / {patch[0]} px patches): 1 / ratio must be an integer dividing {grid}")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer={layer!r} selects several layers; outer pruning needs one int layer")
    if cfg.vision_feature_select_strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: the pixel shuffle "
                          "takes the patches without [CLS]; only 'default' is supported")
    n_layers = len(model.model.vision_tower.encoder.layer)
    hidden_index = layer % (n_layers + 1)  # into hidden_states: 0 = embeddings, i = output of layer i - 1
    if hidden_index == 0:
        raise ConfigError(f"vision_feature_layer={layer} is the embedding output: no attention to score; "
                          "use a transformer layer")
    return InternVLLayout(
        image_size=size[0], patch_size=patch[0], num_patches=grid * grid, feature_layer=hidden_index - 1,
        num_vision_layers=n_layers, keep_cls=False, image_token_id=int(cfg.image_token_id),
        **asdict(lm_layout_of(tcfg)),  # text_hidden_size, num_text_layers, num_kv_heads, head_dim, vocab_size
        tiles=tiles, grid=grid, scale=scale, tokens_per_tile=(grid // scale) ** 2, final_norm=layer == -1)


def _refusal(spec: PruneMethod, options: dict) -> str | None:
    """Why the InternVL stage cannot run `spec` with `options`, or None."""
    if spec.video:
        return "is a video method (frames x positions) and InternVL's tiles are one image"
    if spec.reduce is not Reduce.GATHER:
        return "merges tokens; the stage keeps whole image tokens (keep_idx), use a gather method"
    if spec.score_input is ScoreInput.ATTENTION_QK_TWO_BLOCKS:
        return "reads two vision layers; the stage reads one (the feature layer)"
    if spec.stateful(options) or spec.compacts:
        return "carries token state or keeps an input-dependent count; the stage keeps a fixed K per tile"
    if spec.score_input is ScoreInput.ATTENTION_QK and spec.needs_keep:
        return ("places part of its budget at evenly spaced patch positions, which have no per-token meaning after "
                "the 2 x 2 pixel shuffle")
    if options.get("fuse") or options.get("pospad"):
        return "with fuse/pospad adds tokens that are not image tokens; turn them off"
    if options.get("loop"):
        return "with loop=true exports an ONNX Loop; vision_prune must stay loop-free (loop=false)"
    return None


def usable_methods() -> list[str]:
    """The registry methods (default options) the InternVL stage runs."""
    return [name for name, spec in METHODS.items() if _refusal(spec, spec.defaults()) is None]


def check_internvl_method(method: str, options: dict, layout: InternVLLayout, keep: int) -> dict:
    """The method's full options; one-line ConfigError unless it can keep `keep` of each tile's image tokens."""
    spec = METHODS.get(method)
    if spec is None:
        raise ConfigError(f"Unknown method {method!r}; InternVL takes one of: {', '.join(usable_methods())}")
    options = {**spec.defaults(), **options}
    reason = _refusal(spec, options)
    if reason:
        raise ConfigError(f"{method} {reason}; InternVL takes one of: {', '.join(usable_methods())}")
    n = layout.tokens_per_tile
    if not 1 <= keep <= n:
        raise ConfigError(f"keep={keep} is out of range; each tile has {n} image tokens after the pixel shuffle, "
                          f"keep 1..{n} (or a ratio) per tile")
    reason = spec.validate(n, keep, options) if spec.validate else None
    if reason:
        raise ConfigError(f"{method}: {reason}")
    return options


class InternVLVisionPrune(nn.Module):
    """pixel_values (T, 3, S, S) -> (image features (1, T·K, H_lm), keep_idx (T, K) int64 per tile, ascending).

    keep = layout.tokens_per_tile keeps every token, in order: HF's get_image_features, tiles concatenated."""

    def __init__(self, model: nn.Module, layout: InternVLLayout, method: str, keep: int, options: dict):
        super().__init__()
        self.options = check_internvl_method(method, options, layout, keep)
        self.spec = METHODS[method]
        tower = model.model.vision_tower
        self.embeddings = tower.embeddings
        self.layers = nn.ModuleList(tower.encoder.layer[: layout.feature_layer + 1])
        self.norm = tower.layernorm if layout.final_norm else nn.Identity()
        self.projector = model.model.multi_modal_projector
        # HF's own pixel shuffle (a reshape/permute function of InternVLModel; not registered: no weights)
        self._pixel_shuffle, self._ratio = model.model.pixel_shuffle, model.config.downsample_ratio
        self.layout, self.method, self.keep = layout, method, keep

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype))
        for layer in self.layers[:-1]:
            x = layer(x)
        last = self.layers[-1]
        q, k, scale = _query_key(last, x)
        x_out = last(x)
        tokens = self.projector(self.shuffle(self.norm(x_out)[:, NUM_PREFIX_TOKENS:]))    # (T, N, H_lm)
        scores = self._scores(q, k, scale, x, x_out, tokens)
        # the one stage dispatcher with the scores pooled here: TopK / the method's own select, per tile (the batch)
        kept, idx, _ = run_stage(self.spec, self.options, self.keep, 0, scores=scores, x_out=tokens)
        return kept.reshape(1, -1, kept.shape[-1]), idx

    def shuffle(self, patches: Tensor) -> Tensor:
        """(T, g·g, C) patches -> (T, N, r·r·C) tokens: HF's pixel shuffle of the g x g grid, flattened row-major."""
        t, g = patches.shape[0], self.layout.grid
        out = self._pixel_shuffle(patches.reshape(t, g, g, -1), scale_factor=self._ratio)
        return out.reshape(t, -1, out.shape[-1])

    def _scores(self, q: Tensor, k: Tensor, scale: float, x_in: Tensor, x_out: Tensor, tokens: Tensor) -> Tensor:
        """(T, N) scores of each tile's image tokens (a (T, N, N) similarity for divprune): a TOKENS score on the
        projected tokens; else the per-patch score of the feature layer, [CLS] column dropped, averaged over each
        token's r x r block by the same pixel shuffle as the features."""
        if self.spec.score_input is ScoreInput.TOKENS:
            fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, x_out=tokens)
            return fn(*args, **kwargs)
        fn, args, kwargs = score_call(self.spec, self.options, self.keep, NUM_PREFIX_TOKENS, q=q, k=k, scale=scale,
                                      x_in=x_in, x_out=x_out)
        patch = fn(*args, **kwargs)[:, NUM_PREFIX_TOKENS:]                            # (T, g·g)
        return self.shuffle(patch.unsqueeze(-1)).mean(dim=-1)                        # (T, N): block means


def vision_spec(layout: InternVLLayout) -> PartSpec:
    """Every shape static: T tiles of S x S pixels."""
    args = (torch.randn(layout.tiles, 3, layout.image_size, layout.image_size),)
    return PartSpec(args, (None,), ["pixel_values"], ["image_features", "keep_idx"], {})


def _query_key(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """q, k (B, heads, N, D) of an InternViT layer's self-attention for input x, as its SDPA gets them (after the
    optional q/k RMS norms over the full width), and the scale."""
    attn = layer.attention
    h = layer.layernorm_before(x)
    shape = (*h.shape[:-1], attn.num_heads, attn.head_dim)
    q = attn.q_norm(attn.q_proj(h)).reshape(shape).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h)).reshape(shape).transpose(1, 2)
    return q, k, attn.scale
