"""The VLM model-adapter interface: everything the family-independent pipeline needs from one VLM family.

The pipeline (tokensieve.vlm_api: plan -> parts -> ONNX -> manifest -> verify -> engine profiles), FastV / FEATHER /
merge inner pruning (exporter/vlm/fastv.py: prefill layers with a score row, the eager reference, debias
calibration) and the benchmarks are written once over this interface; a family implements it once
(exporter/vlm/llava_adapter.py: LlavaAdapter, exporter/vlm/qwen2_vl_adapter.py: Qwen2VLAdapter, images and videos)
and is registered in exporter/vlm/families.py (one dict from the HF class name to its adapter).

What an adapter answers, part by part:
    vision part      `layout(grid)` (`tiled_layout(grid, tiles)`: InternVL's static tiles; `timed_layout(layout,
                     second_per_grid)`: Qwen2.5-VL's seconds per temporal patch of a video), `outer_layer(layout)`
                     (where the outer stage sits), `check_outer(layout, stage)` (K and the prompt's image-token count);
                     `vision_module(plan)` the eager vision_prune (pixels -> image features + keep_idx) that is both
                     the reference and what is exported; `sample_pixels`.
    prompt layout    `placeholder_id(layout)`, `sample_prompt(layout, n, batch, seed)` (the verify prompt),
                     `prompt_extra` (its non-image tokens: the engine profiles' opt), `batched` (batch axis or 1).
    positions        `gather_positions(pos, cols)`: 1-D ids (B, T) for LLaVA, M-RoPE ids (3, B, T) for Qwen2-VL; the
                     kept-column gather FastV and its reference apply after the pruning layer; `next_positions`
                     gives the generated tokens' ids in the reference.
    LM parts         `lm_layout()`, `part_exporters(plan, vision)` (vision / prefill / decode -> onnx_ir models with
                     a flat KV cache), `part_modules(plan)` (the torch prefill / decode the exporters trace),
                     `extra_files(out)` (LLaVA: the pipeline's text embeddings).
    generation       `generate_parts` (the exported parts on ONNX Runtime / TensorRT) and `generate_reference` (eager,
                     the same pruning, FastV through fastv.reference_generate_layers) -> one Generation each;
                     verify_vlm compares the two. `part_feeds` (one prompt's inputs of every part) is what the
                     benchmarks time.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import onnx_ir as ir
from torch import Tensor, nn

from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation


@dataclass(frozen=True)
class LmLayout:
    """The language model's sizes every family shares (fastv.prefill_macs and the flat KV-cache parts read them)."""

    text_hidden_size: int
    num_text_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def lm_layout_of(text_config) -> LmLayout:
    """LmLayout of a HF text config (Llama / Qwen2 style attribute names)."""
    heads = text_config.num_attention_heads
    return LmLayout(text_config.hidden_size, text_config.num_hidden_layers,
                    getattr(text_config, "num_key_value_heads", None) or heads,
                    getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
                    text_config.vocab_size)


class VlmAdapter(ABC):
    """One VLM family; see the module docstring. Instances wrap one HF model (`self.model`)."""

    model_type: ClassVar[str]           # HF config.model_type, e.g. "llava"
    hf_class: ClassVar[str]             # e.g. "LlavaForConditionalGeneration" (the registry key)
    label: ClassVar[str]                # what messages call it, e.g. "LLaVA (LlavaForConditionalGeneration)"
    manifest_name: ClassVar[str]        # the export folder's manifest file
    batched: ClassVar[bool]             # the parts take a batch axis (else batch 1)
    static_grid: ClassVar[bool]         # the export takes a grid (t, h, w) (else the tower's fixed image size)
    default_verify_batch: ClassVar[int]
    prompt_extra: ClassVar[int]         # non-image tokens of the verify prompt (the engine profiles' opt)
    prompt_extra_what: ClassVar[str]    # what they are, for messages
    tiled: ClassVar[bool] = False       # the export takes a static tile count per image (InternVL: tiles=N)

    def __init__(self, model: nn.Module):
        self.model = model

    # ---------------------------------------------------------------- vision part
    @abstractmethod
    def layout(self, grid):
        """The static layout of the vision part (`grid` for a family with a static grid, else None); ConfigError."""

    def tiled_layout(self, grid, tiles: int):
        """The layout with `tiles` static tiles per image (a `tiled` family); the others refuse in one line."""
        from tokensieve.errors import ConfigError

        raise ConfigError(f"tiles={tiles!r}: {self.label.split(' (')[0]} takes no tiles (InternVL does); drop tiles "
                          "/ --tiles")

    def timed_layout(self, layout, second_per_grid: float | None):
        """The layout with `second_per_grid` seconds per temporal patch (Qwen2.5-VL's video M-RoPE time spacing);
        None: `layout` as it is. A family whose positions take no time spacing refuses a value in one line."""
        if second_per_grid is None:
            return layout
        from tokensieve.errors import ConfigError

        raise ConfigError(f"second_per_grid={second_per_grid!r}: {self.label.split(' (')[0]} takes no seconds per "
                          "temporal patch (only a Qwen2.5-VL video spaces its M-RoPE time positions by it); drop "
                          "second_per_grid / --seconds-per-grid")

    @abstractmethod
    def outer_layer(self, layout) -> int | None:
        """The vision layer the outer stage runs after (LLaVA's feature layer), or None: after the whole tower."""

    @abstractmethod
    def check_outer(self, layout, stage: Stage) -> tuple[int, int, int]:
        """Check the outer stage against the tower -> (K kept, tokens it keeps them from, image tokens a prompt
        carries); one-line ConfigError."""

    @abstractmethod
    def vision_module(self, plan) -> nn.Module:
        """The eager vision_prune of `plan`: pixel_values -> (image features, keep_idx)."""

    @abstractmethod
    def sample_pixels(self, layout, batch: int, seed: int) -> Tensor:
        """Seeded random pixel_values the vision part takes."""

    # ---------------------------------------------------------------- prompt layout
    @abstractmethod
    def placeholder_id(self, layout) -> int:
        """The token the prompt carries where the image (video) features go."""

    @abstractmethod
    def sample_prompt(self, layout, num_image_tokens: int, batch: int, seed: int) -> Tensor:
        """The verify prompt: (batch, T) ids with `num_image_tokens` placeholders."""

    def manifest_fields(self, layout) -> dict:
        """Family facts the manifest records: modality ("image" | "video") and grid_thw (None without a grid)."""
        return {"modality": "image", "grid_thw": None}

    @abstractmethod
    def tokens_line(self, result) -> str:
        """The export summary's line on the outer stage's tokens (`tokensieve export-vlm` prints it)."""

    # ---------------------------------------------------------------- positions
    @abstractmethod
    def gather_positions(self, positions: Tensor, cols: Tensor) -> Tensor:
        """Position ids at the kept columns `cols` (B, T'): each kept token keeps its original position."""

    # ---------------------------------------------------------------- LM parts
    def lm_layout(self) -> LmLayout:
        return lm_layout_of(self.text_config)

    @property
    def text_config(self):
        return self.model.config.text_config

    @abstractmethod
    def part_exporters(self, plan, vision: nn.Module) -> dict[str, Callable[[], ir.Model]]:
        """{"vision" | "prefill" | "decode": a call exporting that part (FastV parts when plan.inner)}."""

    @abstractmethod
    def part_modules(self, plan) -> dict[str, nn.Module]:
        """The torch prefill / decode modules of `plan` (FastV's when plan.inner), as exported."""

    def extra_files(self, out: Path) -> dict[str, Path]:
        """Files besides the parts the family's pipeline reads, written atomically into `out`: {key: path}."""
        return {}

    # ---------------------------------------------------------------- generation
    @abstractmethod
    def generate_parts(self, result, input_ids: Tensor, pixel_values: Tensor, steps: int, threads: int | None,
                       backend: str) -> Generation:
        """Greedy decoding with the exported parts (ONNX Runtime, or the engines the manifest lists)."""

    @abstractmethod
    def generate_reference(self, result, input_ids: Tensor, pixel_values: Tensor, steps: int) -> Generation:
        """Eager greedy decoding with the same pruning (result.vision; FastV's independent reference with
        result.inner)."""

    @abstractmethod
    def part_feeds(self, result, input_ids: Tensor, pixel_values: Tensor) -> dict[str, dict]:
        """The inputs of each exported part for one prompt (numpy, by ONNX input name): vision's pixels, the prefill
        of the prompt with vision_prune's features, and the decode step after it (its cache from one prefill run on
        ONNX Runtime). The benchmarks time the parts on them and count their MACs."""

    def check_verify_batch(self, batch: int | None) -> int:
        """The verify batch (default_verify_batch when None); one-line ConfigError if the parts cannot take it."""
        from tokensieve.errors import ConfigError

        if batch is None:
            return self.default_verify_batch
        if not self.batched and batch != 1:
            raise ConfigError(f"batch={batch}: the {self.label.split(' (')[0]} parts are exported for batch 1; verify "
                              "with batch=1")
        if batch < 1:
            raise ConfigError(f"batch={batch} must be >= 1")
        return batch
