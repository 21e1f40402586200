"""LLaVA's vision side with outer visual-token pruning (FasterVLM-style), as one exportable module.

    pixel_values (B, 3, H, W) -> CLIP embeddings -> CLIP layers 0..L (L = the layer that produces the hidden state
    LLaVA takes, `vision_feature_layer`, default -2: the penultimate) -> score (e.g. the [CLS] row of layer L's
    attention, recomputed from its q/k) -> fixed-budget select (TopK K -> sort) -> gather -> multi-modal projector
    -> image features (B, K, H_lm) + keep_idx (B, K) int64, the kept patch positions (0-based over the patch grid),
    ascending.

The CLIP layers after L are never run (LLaVA discards them). The stage makes the calls the ViT FX pass inserts
(`methods.stage.run_stage`: score, then the method's reduce_fn or `tokensieve::prune_topk`), so every gather method of the
registry that reads q/k, the layer's input/output or its output tokens works unchanged. Running this module
eagerly is the reference; exporting it is the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.spec import Reduce, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage

NUM_PREFIX_TOKENS = 1  # CLIP's [CLS]


@dataclass(frozen=True)
class LlavaLayout:
    """The static facts of one LLaVA model that the parts and the pipeline need."""

    image_size: int
    patch_size: int
    num_patches: int
    feature_layer: int          # 0-based CLIP layer whose output LLaVA takes (the stage runs after it)
    num_vision_layers: int
    keep_cls: bool              # vision_feature_select_strategy == "full": the [CLS] feature goes to the LLM too
    image_token_id: int
    text_hidden_size: int
    num_text_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def llava_layout(model: nn.Module) -> LlavaLayout:
    """Read the layout of a `LlavaForConditionalGeneration` with a CLIP vision tower; ConfigError otherwise."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llava" or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise ConfigError(f"LLaVA export needs a transformers LlavaForConditionalGeneration, got {kind!r}; "
                          "export other models with tokensieve.api.export")
    tower = model.model.vision_tower
    if not all(hasattr(tower, a) for a in ("embeddings", "pre_layrnorm", "encoder")):
        raise ConfigError(f"LLaVA vision tower {type(tower).__name__} is not CLIP-like (embeddings, pre_layrnorm, "
                          "encoder.layers); only CLIP vision towers are supported")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer={layer!r} selects several layers; outer pruning needs one int layer")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not 'default' or 'full'")
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    n_layers = len(tower.encoder.layers)
    hidden_index = layer % (n_layers + 1)  # index into hidden_states: 0 = embeddings, i = output of layer i - 1
    if hidden_index == 0:
        raise ConfigError(f"vision_feature_layer={layer} is the embedding output: no attention to score; "
                          "use a transformer layer")
    heads = tcfg.num_attention_heads
    return LlavaLayout(
        image_size=vcfg.image_size, patch_size=vcfg.patch_size, num_patches=(vcfg.image_size // vcfg.patch_size) ** 2,
        feature_layer=hidden_index - 1, num_vision_layers=n_layers,
        keep_cls=cfg.vision_feature_select_strategy == "full", image_token_id=int(cfg.image_token_id),
        text_hidden_size=tcfg.hidden_size, num_text_layers=tcfg.num_hidden_layers,
        num_kv_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads, vocab_size=tcfg.vocab_size,
    )


def check_outer_method(method: str, options: dict, num_patches: int, keep: int) -> None:
    """ConfigError unless `method` can keep `keep` of `num_patches` as one outer stage on CLIP's feature layer."""
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)} (see `tokensieve methods`)")
    spec = METHODS[method]
    if spec.video:
        raise ConfigError(f"{method} is a video method (frames x positions) and LLaVA takes one image; use it on a "
                          f"Qwen2-VL video (export-vlm --grid T,H,W with T > 1)")
    if not 1 <= keep <= num_patches:
        raise ConfigError(f"keep={keep} is out of range; the vision tower has {num_patches} patch tokens, "
                          f"keep 1..{num_patches}")
    if spec.score_input is ScoreInput.ATTENTION_QK_TWO_BLOCKS:
        raise ConfigError(f"{method} reads two vision layers; outer VLM pruning supports one-layer methods only")
    options = {**spec.defaults(), **options}
    if spec.reduce is not Reduce.GATHER:
        raise ConfigError(f"{method} merges tokens; outer VLM pruning keeps patches (keep_idx), use a gather method")
    if spec.stateful(options) or spec.compacts:
        raise ConfigError(f"{method} with these options carries token state or compacts; outer pruning needs a "
                          "fixed K with no validity mask")
    if options.get("fuse") or options.get("pospad"):
        raise ConfigError(f"{method}: fuse/pospad add tokens that are not kept patches; not supported for outer "
                          "VLM pruning, drop the option")
    reason = spec.validate(num_patches, keep, options) if spec.validate else None
    if reason:
        raise ConfigError(f"{method}: {reason}")


class VisionPrune(nn.Module):
    """pixel_values -> (image features (B, K [+1 with 'full'], H_lm), keep_idx (B, K) int64 patch positions)."""

    def __init__(self, model: nn.Module, layout: LlavaLayout, method: str, keep: int, options: dict):
        super().__init__()
        check_outer_method(method, options, layout.num_patches, keep)
        options = {**METHODS[method].defaults(), **options}
        tower = model.model.vision_tower
        self.embeddings, self.pre_layrnorm = tower.embeddings, tower.pre_layrnorm
        self.layers = nn.ModuleList(tower.encoder.layers[: layout.feature_layer + 1])
        self.projector = model.model.multi_modal_projector
        self.layout, self.method, self.keep, self.options = layout, method, keep, dict(options)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.layers[:-1]:
            x = layer(x, None)
        last = self.layers[-1]
        q, k, scale = _query_key(last, x)
        x_out = last(x, None)
        # the one stage dispatcher (as the ViT FX pass and eager reference): score -> TopK / the method's own
        # select (DivPrune, MMR) -> recycled dropped patches
        tokens, idx, _ = run_stage(METHODS[self.method], self.options, self.keep, NUM_PREFIX_TOKENS,
                                   q=q, k=k, scale=scale, x_in=x, x_out=x_out)
        if not self.layout.keep_cls:
            tokens = tokens[:, NUM_PREFIX_TOKENS:]
        return self.projector(tokens), idx - NUM_PREFIX_TOKENS


def vision_spec(layout: LlavaLayout) -> PartSpec:
    args = (torch.randn(2, 3, layout.image_size, layout.image_size),)  # batch 2: see lm_parts.EXAMPLE_BATCH
    return PartSpec(args, ({0: Dim("batch", min=1, max=4096)},), ["pixel_values"], ["image_features", "keep_idx"],
                    {"pixel_values": {0: "batch"}})


def _query_key(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """q, k (B, heads, N, D) of a CLIP layer's self-attention for input x, as its SDPA gets them, and the scale."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    return q, k, attn.scale
