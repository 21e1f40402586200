"""The VLM API: a LLaVA or Qwen2-VL exported in parts with outer visual-token pruning, and its check against eager.

    result = export_vlm(model, "out/llava", "cls-topk:0.25")                     # LLaVA, FasterVLM: keep 25%
    result = export_vlm(model, "out/qwen", "attn-mean:0.5", grid=(1, 28, 28))    # Qwen2-VL: CLS-free, static grid
    result = export_vlm(model, "out/qwen_video", "attn-mean:0.5", grid=(2, 28, 28))  # Qwen2-VL video (t > 1)
    report = verify_vlm(result)             # ORT greedy ids == eager with the same pruning (keep_idx, logits)

Both write vision_prune.onnx, lm_prefill.onnx and lm_decode.onnx into out_dir, each atomically, plus the manifest
their pipeline reads (LLaVA: llava_parts.json for runtime.llava_pipeline, with embed_tokens.npy, the pipeline's text
embeddings; Qwen2-VL: manifest.json), and return one VlmExportResult; verify_vlm returns one VlmVerifyReport.

Parts over 2 GB (a real LLaVA-1.5-7B or Qwen2-VL-2B language model): a part whose weights reach
`external_data_threshold` bytes (default EXTERNAL_DATA_THRESHOLD, 1.5 GiB, torch.onnx's own switch) is written as
`<part>.onnx` + one `<part>.onnx.data` next to it, straight from the module's torch tensors (the exporter's onnx_ir
model; no proto of the weights is built in memory). Every file is staged under a temporary name and renamed into place
only once all parts passed their checks (check_static / op census, on the graph without its weights). ONNX Runtime,
the pipelines and `tokensieve build` (TensorRT-RTX: the parser reads the weights next to the file) load them as they
are. `external_data_threshold=0` writes every part that way.

Engines: `build_vlm(result, target="rtx-sm86", max_batch=1, max_sequence=S)` builds one engine per part
(vision_prune.engine, lm_prefill.engine, lm_decode.engine, each with its `.json`) with the optimization profiles
`vlm_profiles` derives from the parts (batch 1..B; prefill `sequence` 1..S, opt = the example prompt; decode
`past_sequence` 0..S; FastV: `pruned_past_sequence` 0..S - dropped and a prompt of at least N + 1 tokens), and records
them in the manifest under "engines" (`LlavaPipeline(out_dir, backend="tensorrt")` runs them). Writing a manifest
deletes the part engines it does not list, so a re-export (its manifest has no "engines" until build_vlm) leaves no
engine of the replaced ONNX behind; other files in the folder stay.

prune: `METHOD[(name=value,...)]:KEEP`, one stage after the vision tower. KEEP is a ratio of the image tokens the
tower gives (1.0 = all: the control that equals the unpruned model) or a count. LLaVA: the stage runs after the CLIP
layer LLaVA takes its features from (`vision_feature_layer`; `METHOD@LAYER:KEEP` must name that 0-based layer).
Qwen2-VL: after the merger, CLS-free methods only (attn-mean, divprune, ttv, ...); `grid=(t, h, w)` in patches fixes
the layout: t = 1 an image, t > 1 a video of t temporal patches (temporal_patch_size frames each, already stacked in
one pixel_values row), whose vision tower attends within each temporal step, whose prompt carries video_token_id
placeholders and whose M-RoPE positions come from video_grid_thw; the manifest records "modality": "image" | "video".

Inner pruning: `export_vlm(model, out, "cls-topk:1.0", inner="fastv@1:0.5")` adds FastV inside the LLM prefill
(exporter/vlm/fastv.py: drop image tokens after decoder layer 1 by the last prompt position's attention, keep R);
lm_prefill.onnx / lm_decode.onnx are then the FastV parts and verify_vlm compares against the eager FastV
reference. `inner="fastv(debias=true)@1:8"` also needs `inner_bias=` (calibrate_fastv_bias; Qwen2-VL:
calibrate_qwen2_fastv_bias(model, vision, pixel_values, input_ids, layer), both re-exported here);
`inner="fastv(merge=true)@1:0.5"` merges the dropped image tokens into the kept ones (HoliTom's inner merge; HoliTom =
outer `holitom` + this, HoliTom's layer k = our L + 1). Qwen2-VL (images and
videos): `export_vlm(model, out, "uniform:1.0", grid=(1, 8, 8), inner="fastv@1:0.5")` (exporter/vlm/qwen2_vl_fastv.py,
M-RoPE positions gathered at the kept columns); R counts among the K image tokens the outer stage keeps (ToDRE-style:
outer keeps K, inner R of those K); the manifest records "inner".

export_llava / verify_llava are export_vlm / verify_vlm restricted to a LLaVA.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from tokensieve.errors import ConfigError, ExportError, TargetError
from tokensieve.exporter.onnx_files import data_path, stage_onnx
from tokensieve.exporter.vlm.export_part import export_part, initializer_bytes
from tokensieve.exporter.vlm.fastv import (FastvDecode, FastvPrefill, FastvSpec, calibrate_fastv_bias,
                                           fastv_decode_spec, fastv_prefill_spec, parse_fastv,
                                           reference_fastv_generate)
from tokensieve.exporter.vlm.llava import (LlavaLayout, VisionPrune, check_outer_method, llava_layout,
                                           vision_spec)
from tokensieve.exporter.vlm.lm_parts import LmDecode, LmPrefill, decode_spec, prefill_spec
from tokensieve.exporter.vlm.qwen2_vl import (ImageLayout, Qwen2VLVisionPrune, check_keep, export_lm_decode,
                                              export_lm_prefill, export_vision_prune, image_layout,
                                              placeholder_token_id, resolve_method)
from tokensieve.exporter.vlm.qwen2_vl_fastv import (calibrate_qwen2_fastv_bias, export_fastv_decode,
                                                    export_fastv_prefill)
from tokensieve.api import remove_stale_engines
from tokensieve.fileio import atomic_path, ensure_writable_dir, write_json_atomic
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static, op_census
from tokensieve.recipe import Stage, parse_stage_text
from tokensieve.runtime.llava_pipeline import MANIFEST, Generation, LlavaPipeline

__all__ = ["export_vlm", "verify_vlm", "plan_vlm", "build_vlm", "vlm_profiles", "VlmExportResult", "VlmVerifyReport",
           "VlmPlan", "VlmProfiles", "VLM_TYPES", "vlm_type", "export_llava", "verify_llava", "parse_outer_recipe",
           "llava_prompt", "reference_generate", "unpruned_generate", "write_parts", "EXTERNAL_DATA_THRESHOLD",
           "calibrate_fastv_bias", "calibrate_qwen2_fastv_bias"]

# model_type -> what the messages call it
VLM_TYPES = {"llava": "LLaVA (LlavaForConditionalGeneration)", "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration)"}
ARTIFACTS = {"vision": "vision_prune.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx",
             "embed": "embed_tokens.npy"}
QWEN2_VL_MANIFEST = "manifest.json"
QWEN2_VL_PROMPT_LEN = 16  # only sizes the example the Qwen2-VL LM parts are traced with (their axes are dynamic)
# A part whose weights reach this many bytes gets external data (torch.onnx's ONNXProgram.save switches at 1.5 GiB too:
# protobuf refuses to serialize over 2 GB and the graph itself needs headroom).
EXTERNAL_DATA_THRESHOLD = 1536 << 20


def vlm_type(model: nn.Module) -> str:
    """"llava" or "qwen2_vl" from the model's config; a one-line ConfigError naming the supported types otherwise."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in VLM_TYPES:
        got = type(model).__name__ if kind is None else kind
        raise ConfigError(f"export_vlm supports {' and '.join(VLM_TYPES.values())}, got {got!r}; export other models "
                          "with tokensieve.api.export")
    return kind


# --------------------------------------------------------------------------- plan: every check before any export


@dataclass(frozen=True)
class VlmPlan:
    """The checked export of one model: which architecture, its layout, the outer stage and its static K."""

    model_type: str                       # "llava" | "qwen2_vl"
    layout: LlavaLayout | ImageLayout
    stage: Stage                          # the outer stage (Qwen2-VL: after_block is unused)
    keep: int                             # K: image tokens the outer stage keeps
    num_tokens: int                       # what it keeps them from: LLaVA's patches, Qwen2-VL's merged image tokens
    num_image_tokens: int                 # image tokens a prompt carries (K; LLaVA 'full': K + 1 for [CLS])
    inner: FastvSpec | None = None        # FastV inside the LLM prefill (its N: the num_image_tokens above)
    max_positions: int | None = None      # the language model's max_position_embeddings (default --max-sequence)

    @property
    def prune(self) -> str:
        """The outer stage written back in full: `cls-topk@1:4` (LLaVA) or `attn-mean:6` (Qwen2-VL, no layer)."""
        return self.stage.shorthand(place=self.model_type == "llava")


def plan_vlm(model: nn.Module, prune: str = "cls-topk:0.25", *, grid=None, inner: str | None = None,
             inner_bias=None) -> VlmPlan:
    """Check export_vlm's arguments against `model` without exporting anything; one-line ConfigError otherwise."""
    kind = vlm_type(model)
    if inner_bias is not None and inner is None:
        raise ConfigError("inner_bias is the calibrated bias of inner='fastv(debias=true)@L:R'; pass inner too")
    if kind == "llava":
        if grid is not None:
            raise ConfigError("grid is for Qwen2-VL; a LLaVA's image size comes from its vision config, drop grid")
        layout = llava_layout(model)
        stage, keep = parse_outer_recipe(prune, layout)
        check_outer_method(stage.method, stage.options(), layout.num_patches, keep)
        num_image_tokens = keep + int(layout.keep_cls)
        fastv = None if inner is None else parse_fastv(inner, layout.num_text_layers, num_image_tokens, inner_bias)
        return VlmPlan(kind, layout, stage, keep, layout.num_patches, num_image_tokens, fastv, _max_positions(model))
    if grid is None:
        raise ConfigError("Qwen2-VL needs the static image grid: pass grid=(t, h, w) in patches, e.g. (1, 28, 28) "
                          "for a 392 px image, (2, 28, 28) for a 4-frame video")
    _check_qwen2_vl(model)
    layout = image_layout(model.config.vision_config, grid)
    stage = parse_qwen2_vl_prune(prune)
    spec, options = resolve_method(stage.method, stage.options(), layout)  # a [CLS] method (a video: feather) fails
    keep = stage.keep.resolve(layout.num_merged)
    check_keep(layout, keep, spec, options)
    # FastV keeps R of the K image tokens the outer stage leaves in the prompt
    fastv = None if inner is None else parse_fastv(inner, model.config.text_config.num_hidden_layers, keep, inner_bias)
    return VlmPlan(kind, layout, stage, keep, layout.num_merged, keep, fastv, _max_positions(model))


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model.config, "text_config", model.config)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


OUTER_EXAMPLE = "METHOD[(options)]:KEEP for the one stage after the vision tower, e.g. cls-topk:0.25"


def _outer_stage_text(text: str):
    parts = str(text).split("+")
    if len(parts) > 1:
        raise ConfigError(f"Outer pruning takes exactly one stage, got {len(parts)} in {str(text).strip()!r}; write "
                          f"{OUTER_EXAMPLE}")
    return parse_stage_text(text, OUTER_EXAMPLE)


def parse_outer_recipe(text: str, layout: LlavaLayout) -> tuple[Stage, int]:
    """LLaVA: `cls-topk:0.25` / `divprune@22:144` -> (the stage after LLaVA's feature layer, static K)."""
    st = _outer_stage_text(text)
    if st.places is not None and st.places != (layout.feature_layer,):
        raise ConfigError(f"Outer pruning runs after CLIP layer {layout.feature_layer} (LLaVA's vision_feature_layer), "
                          f"not {','.join(map(str, st.places))}; write {st.method}:{st.keep} or "
                          f"@{layout.feature_layer}")
    stage = st.stage(layout.feature_layer)
    k = stage.keep.resolve(layout.num_patches)
    if k > layout.num_patches:
        raise ConfigError(f"keep={k} is out of range; the vision tower has {layout.num_patches} patch tokens, "
                          f"keep 1..{layout.num_patches} or a ratio")
    return stage, k


def parse_qwen2_vl_prune(text: str) -> Stage:
    """Qwen2-VL: `attn-mean:0.5` -> the one stage after the merger (its after_block is a placeholder 0)."""
    st = _outer_stage_text(text)
    if st.places is not None:
        raise ConfigError(f"prune {text!r}: Qwen2-VL prunes once, after the vision tower's merger; write {OUTER_EXAMPLE}"
                          .replace(", e.g. cls-topk:0.25", ", e.g. attn-mean:0.5"))
    return st.stage(0)


def _check_qwen2_vl(model: nn.Module) -> None:
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "visual"):
        raise ConfigError(f"{type(model).__name__} is not a Qwen2VLForConditionalGeneration; load one with "
                          "transformers' Qwen2VLForConditionalGeneration")


# --------------------------------------------------------------------------- export


@dataclass
class VlmExportResult:
    """What export_vlm wrote, and the eager modules verify_vlm compares the parts against (either architecture)."""

    model_type: str                 # "llava" | "qwen2_vl"
    out_dir: Path
    paths: dict[str, Path]          # vision, prefill, decode, manifest (LLaVA: + embed, the text embeddings); a part
                                    # written with external data also has "<part>_data" (<part>.onnx.data)
    prune: str                      # the outer stage written back in full, e.g. cls-topk@1:4 / attn-mean:6
    method: str
    options: dict                   # the method's options, defaults filled in
    keep: int                       # K: image tokens the outer stage keeps
    num_tokens: int                 # what it keeps them from: LLaVA's patches, Qwen2-VL's merged image tokens
    num_image_tokens: int           # image tokens a prompt must carry (K; LLaVA 'full': K + 1)
    layout: LlavaLayout | ImageLayout
    vision_ops: dict[str, int]      # op census of vision_prune.onnx (checked static)
    prefill_ops: dict[str, int]     # op census of lm_prefill.onnx (checked free of data-dependent ops)
    sizes: dict[str, int]           # bytes per file (same keys as paths, but the manifest)
    seconds: dict[str, float]       # export seconds per part
    model: nn.Module = field(repr=False)
    vision: nn.Module = field(repr=False)     # the eager reference of vision_prune.onnx
    inner: FastvSpec | None = None            # FastV inside the LLM prefill, if any
    max_positions: int | None = None          # the language model's max_position_embeddings
    engines: dict[str, dict] = field(default_factory=dict)  # build_vlm: part -> its manifest "engines" entry
    removed_engines: list[str] = field(default_factory=list)  # engine files of an earlier export the manifest no
                                                               # longer lists, deleted when it was written

    @property
    def external_data(self) -> dict[str, Path]:
        """{part: its `<part>.onnx.data`} for the parts written with external data."""
        return {k[:-len("_data")]: p for k, p in self.paths.items() if k.endswith("_data")}

    @property
    def grid(self) -> tuple[int, int, int] | None:
        """Qwen2-VL's static image or video grid (t, h, w) in patches (t > 1: a video); None for LLaVA."""
        lay = self.layout
        return (lay.t, lay.h, lay.w) if isinstance(lay, ImageLayout) else None

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type, "prune": self.prune, "method": self.method, "options": self.options,
               "keep": self.keep, "num_tokens": self.num_tokens, "num_image_tokens": self.num_image_tokens,
               "layout": asdict(self.layout), "files": {k: p.name for k, p in self.paths.items()},
               "sizes": self.sizes, "seconds": self.seconds, "vision_ops": self.vision_ops,
               "prefill_ops": self.prefill_ops}
        if self.grid is not None:
            out["grid"] = list(self.grid)
            out["modality"] = self.layout.modality
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        if self.engines:
            out["engines"] = self.engines
        return out


def export_vlm(model: nn.Module, out_dir: str | Path, prune: str = "cls-topk:0.25", *, grid=None,
               inner: str | None = None, inner_bias=None,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> VlmExportResult:
    """Export `model` (LlavaForConditionalGeneration or Qwen2VLForConditionalGeneration; eval mode is set) as three
    ONNX parts with `prune` after the vision tower into `out_dir`. Qwen2-VL needs `grid=(t, h, w)`; both take
    `inner="fastv@L:R"` (FastV inside the LLM prefill, R of the image tokens the prompt carries). A part whose weights
    reach `external_data_threshold` bytes is written with its weights in `<part>.onnx.data` (0: every part)."""
    if isinstance(external_data_threshold, bool) or not isinstance(external_data_threshold, int) \
            or external_data_threshold < 0:
        raise ConfigError(f"external_data_threshold={external_data_threshold!r} must be a byte count >= 0 "
                          f"(0 writes every part with external data; default {EXTERNAL_DATA_THRESHOLD})")
    plan = plan_vlm(model, prune, grid=grid, inner=inner, inner_bias=inner_bias)  # every check before any write
    model.eval()
    if plan.model_type == "llava":
        vision = VisionPrune(model, plan.layout, plan.stage.method, plan.keep, plan.stage.options()).eval()
        options = vision.options
        specs = {"vision": (vision, vision_spec(plan.layout)), "prefill": (LmPrefill(model), prefill_spec(plan.layout)),
                 "decode": (LmDecode(model), decode_spec(plan.layout))}
        if plan.inner is not None:
            specs |= {"prefill": (FastvPrefill(model, plan.inner).eval(), fastv_prefill_spec(plan.layout, plan.inner)),
                      "decode": (FastvDecode(model, plan.inner).eval(), fastv_decode_spec(plan.layout, plan.inner))}
        parts = {key: partial(export_part, module, spec, what=ARTIFACTS[key]) for key, (module, spec) in specs.items()}
    else:
        vision = Qwen2VLVisionPrune(model.model.visual, plan.layout, plan.stage.method, plan.keep,
                                    plan.stage.options()).eval()
        options = vision.options
        prompt_len = max(QWEN2_VL_PROMPT_LEN, plan.keep + 2)
        parts = {"vision": lambda: export_vision_prune(vision),
                 "prefill": lambda: export_lm_prefill(model, plan.keep, prompt_len, plan.layout.is_video),
                 "decode": lambda: export_lm_decode(model, prompt_len)}
        if plan.inner is not None:
            parts |= {"prefill": lambda: export_fastv_prefill(model, plan.inner, prompt_len, plan.layout.is_video),
                      "decode": lambda: export_fastv_decode(model, plan.inner)}
    out = ensure_writable_dir(out_dir)
    models, seconds = {}, {}
    for key, make in parts.items():
        t0 = time.perf_counter()
        models[key] = make()  # onnx_ir models whose weights are still the module's tensors
        seconds[key] = time.perf_counter() - t0
    paths, ops = write_parts(models, out, external_data_threshold)
    if plan.model_type == "llava":
        paths["embed"] = out / ARTIFACTS["embed"]
        with atomic_path(paths["embed"]) as tmp, open(tmp, "wb") as f:
            np.save(f, model.model.language_model.embed_tokens.weight.detach().float().cpu().numpy())
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    result = VlmExportResult(plan.model_type, out, paths, plan.prune, plan.stage.method, dict(options), plan.keep,
                             plan.num_tokens, plan.num_image_tokens, plan.layout, ops["vision"], ops["prefill"], sizes,
                             seconds, model, vision, plan.inner, plan.max_positions)
    _write_manifest(result)
    return result


def _write_manifest(result: VlmExportResult) -> Path:
    """Write the manifest the pipeline reads (llava_parts.json / manifest.json) atomically; sets paths["manifest"].
    Then delete the part engines (ENGINES + .json) it does not list: an earlier build's, of the ONNX just replaced
    (result.removed_engines gets their names)."""
    if result.model_type == "llava":
        path, content = result.out_dir / MANIFEST, _llava_manifest(result)
    else:
        path, content = result.out_dir / QWEN2_VL_MANIFEST, _qwen2_vl_manifest(result)
    result.paths["manifest"] = write_json_atomic(path, content)
    listed = {entry["file"] for entry in result.engines.values()}
    result.removed_engines += remove_stale_engines(result.out_dir, ENGINES.values(), keep=listed)
    return path


def write_parts(models: dict[str, ir.Model], out: Path,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write the parts {"vision"|"prefill"|"decode": model} into `out` (emptying `models`, so each part's proto is freed
    once written) -> (paths, op census per part). A part whose weights reach `external_data_threshold` bytes gets
    `<part>.onnx.data` (paths["<part>_data"]). All files are staged and renamed into place only once every part passed
    its check (ExportError otherwise: nothing changes on disk); a part now inline deletes the stale .data of an earlier
    export."""
    paths, ops = {}, {}
    with ExitStack() as staged:  # nothing is renamed into place before every part passed its check
        for key in list(models):
            model = models.pop(key)
            paths[key] = out / ARTIFACTS[key]
            external = initializer_bytes(model) >= external_data_threshold
            proto = stage_onnx(model, paths[key], external, staged)
            del model
            ops[key] = _check_part(key, proto)  # on the graph as written: external weights are not loaded
            del proto
            if external:
                paths[f"{key}_data"] = data_path(paths[key])
    for key in ARTIFACTS:
        if key in paths and f"{key}_data" not in paths:
            data_path(paths[key]).unlink(missing_ok=True)
    return paths, ops


def _check_part(key: str, proto: onnx.ModelProto) -> dict[str, int]:
    """The part's op census; ExportError if it is data-dependent (vision: every size static but batch)."""
    if key == "vision":
        return dict(check_static(proto)["ops"])  # raises if a data-dependent op or size slipped in
    census = dict(op_census(proto))  # the LM parts' sequence axes are dynamic: the op census only
    bad = sorted(set(census) & set(FORBIDDEN_OPS))
    if bad:
        raise ExportError(f"{ARTIFACTS[key]} contains {bad[0]} ({FORBIDDEN_OPS[bad[0]]}); the LM parts must stay free "
                          "of data-dependent ops (inner pruning: a fixed-budget TopK + Gather)")
    return census


def _llava_manifest(result: VlmExportResult) -> dict:
    """llava_parts.json, read by runtime.llava_pipeline (its files: the parts and the embeddings)."""
    lay = result.layout
    out = {"recipe": result.prune, "keep": result.keep, "num_patches": result.num_tokens,
           "num_image_tokens": result.num_image_tokens, "layout": asdict(lay),
           "files": {k: p.name for k, p in result.paths.items()}, "sizes": result.sizes, "seconds": result.seconds,
           "vision_ops": result.vision_ops}
    if result.inner is not None:
        out["inner"] = result.inner.to_dict()
    if result.engines:
        out["engines"] = result.engines
    return out | {"image_token_id": lay.image_token_id, "num_text_layers": lay.num_text_layers}


def _qwen2_vl_manifest(result: VlmExportResult) -> dict:
    """manifest.json: the grid and its modality ("video" for t > 1), the placeholder the prompt carries, the method."""
    lay = result.layout
    out = {"model": "qwen2_vl", "modality": lay.modality, "grid_thw": [lay.t, lay.h, lay.w],
           "spatial_merge_size": lay.merge, "num_patches": lay.num_patches, "patch_dim": lay.patch_dim,
           "image_tokens": lay.num_merged, "placeholder_token_id": placeholder_token_id(result.model.config, lay),
           "method": result.method, "options": result.options, "keep": result.keep,
           "files": {k: p.name for k, p in result.paths.items()}, "vision_ops": result.vision_ops}
    if result.inner is not None:
        out["inner"] = result.inner.to_dict()
    return out | ({"engines": result.engines} if result.engines else {})


def export_llava(model: nn.Module, out_dir: str | Path, recipe: str = "cls-topk:0.25", *, inner: str | None = None,
                 inner_bias=None) -> VlmExportResult:
    """export_vlm for a LlavaForConditionalGeneration only (a one-line ConfigError for any other model)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "llava":
        llava_layout(model)  # raises: names LlavaForConditionalGeneration and what it got
    return export_vlm(model, out_dir, recipe, inner=inner, inner_bias=inner_bias)


# --------------------------------------------------------------------------- engines


ENGINES = {"vision": "vision_prune.engine", "prefill": "lm_prefill.engine", "decode": "lm_decode.engine"}
LLAVA_PROMPT_TEXT = (4, 3)  # llava_prompt's text tokens before / after the image tokens: verify_vlm's prompt
QWEN2_VL_PROMPT_EXTRA = 9   # vlm_qwen2.sample_prompt: 7 text tokens + <vision_start> + <vision_end> around the image


@dataclass(frozen=True)
class VlmProfiles:
    """The optimization profile of each part's engine: one batch range for all, and per part its named dims'
    (min, opt, max), as BuildSpec.dims takes them. A dim derived from one given here ("past_sequence + 1", decode's
    mask) follows it (targets/tensorrt/builder.py)."""

    batch: tuple[int, int, int]
    max_sequence: int                                   # S: the longest sequence (prompt + generated) an engine takes
    prompt_length: int                                  # opt of the sequence axes: the example prompt, as pruned
    dims: dict[str, dict[str, tuple[int, int, int]]]    # part -> {dim name: (min, opt, max)}

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "max_sequence": self.max_sequence, "prompt_length": self.prompt_length,
                "dims": {k: {n: list(r) for n, r in d.items()} for k, d in self.dims.items()}}


def vlm_profiles(export: VlmPlan | VlmExportResult, *, max_batch: int = 1,
                 max_sequence: int | None = None) -> VlmProfiles:
    """The engine profiles of an export's parts (from its plan or its result); one-line ConfigError if they cannot
    hold: batch 1..B (Qwen2-VL's parts are batch 1); prefill `sequence` 1..S, opt = the example prompt (the one
    verify_vlm uses, pruned); decode `past_sequence` 0..S. FastV: the prefill takes at least N + 1 tokens (N image
    tokens, then text) and its keep TopK takes K = sequence - (N - R) <= 3840 (TensorRT's TopK limit), so S defaults
    to at most 3840 + N - R; decode's `pruned_past_sequence` is 0..S - (N - R). S defaults to the language model's
    max_position_embeddings."""
    from tokensieve.targets.tensorrt.lint import TOPK_MAX_K

    for flag, value in (("--max-batch", max_batch), ("--max-sequence", max_sequence)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} {value!r} must be a positive integer")
    if export.model_type == "qwen2_vl" and max_batch != 1:
        raise ConfigError(f"--max-batch {max_batch}: the Qwen2-VL parts are exported for batch 1; build them with "
                          "--max-batch 1")
    spec = export.inner
    dropped = spec.dropped if spec is not None else 0
    if export.model_type == "llava":
        prompt, what = export.num_image_tokens + sum(LLAVA_PROMPT_TEXT), f"{sum(LLAVA_PROMPT_TEXT)} text tokens"
    else:
        prompt, what = export.keep + QWEN2_VL_PROMPT_EXTRA, f"{QWEN2_VL_PROMPT_EXTRA} text and vision-marker tokens"
    cap = TOPK_MAX_K + dropped if spec is not None else None  # FastV's keep TopK: K = sequence - dropped
    if max_sequence is None:
        if export.max_positions is None:
            raise ConfigError("the language model's config has no max_position_embeddings; give the longest "
                              "sequence with --max-sequence S")
        max_sequence = export.max_positions if cap is None else min(export.max_positions, cap)
    if max_sequence < prompt:
        raise ConfigError(f"--max-sequence {max_sequence} is shorter than the example prompt ({prompt} tokens: "
                          f"{export.num_image_tokens} image tokens + {what}); raise it to {prompt} or more")
    if cap is not None and max_sequence > cap:
        raise ConfigError(f"{ARTIFACTS['prefill']} ({spec.shorthand()}): at --max-sequence {max_sequence} its keep "
                          f"TopK takes K = sequence - {dropped} = {max_sequence - dropped} tokens, over TensorRT's TopK "
                          f"limit of {TOPK_MAX_K}; use --max-sequence {cap} or less")
    first = export.num_image_tokens + 1 if spec is not None else 1
    dims = {"vision": {}, "prefill": {"sequence": (first, prompt, max_sequence)},
            "decode": {"past_sequence": (0, prompt, max_sequence)}}
    if spec is not None:
        dims["decode"]["pruned_past_sequence"] = (0, prompt - dropped, max_sequence - dropped)
    return VlmProfiles((1, 1, max_batch), max_sequence, prompt, dims)


def build_vlm(result: VlmExportResult, *, target: str = "rtx-sm86", precision: str = "fp32", max_batch: int = 1,
              max_sequence: int | None = None, progress=None) -> dict:
    """Build one engine per part (vision_prune.engine, lm_prefill.engine, lm_decode.engine + their .json) into the
    export folder with vlm_profiles' profiles, and record them in the manifest under "engines" (also
    `result.engines`). Returns {part: EngineInfo}; a part that does not build is a one-line TargetError naming it."""
    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    profiles = vlm_profiles(result, max_batch=max_batch, max_sequence=max_sequence)
    specs = {key: BuildSpec(target=target, precision=precision, min_batch=profiles.batch[0],
                            opt_batch=profiles.batch[1], max_batch=profiles.batch[2], dims=profiles.dims[key])
             for key in ENGINES}  # every spec checked before the first build
    infos = {}
    for key, spec in specs.items():
        if progress is not None:
            progress(f"{ENGINES[key]} ({target}, {precision})")
        extra = {"tokensieve": {"vlm_part": key, "model_type": result.model_type, "prune": result.prune,
                                "inner": result.inner.shorthand() if result.inner is not None else None}}
        engine = result.out_dir / ENGINES[key]
        try:
            info = build_engine(result.paths[key], engine, spec, extra)
        except (TargetError, ConfigError) as e:  # name the part: the builder's message names only its file or input
            raise type(e)(f"{ARTIFACTS[key]}: {e}") from e
        _refuse_inconsistent_profile(key, info)
        infos[key] = info
    result.engines = {key: _engine_entry(info) for key, info in infos.items()}
    _write_manifest(result)
    return infos


def _refuse_inconsistent_profile(key: str, info) -> None:
    """TensorRT builds a plan whose profile it cannot run at its max/min/opt shapes (e.g. a TopK whose runtime K
    exceeds 3840) with only a warning: delete that engine and fail in one line naming the part instead."""
    bad = [w for w in info.metadata.get("build_warnings", []) if "values are not self-consistent" in w]
    if bad:
        for path in (info.engine_path, info.metadata_path):
            path.unlink(missing_ok=True)
        raise TargetError(f"{ARTIFACTS[key]}: TensorRT cannot run its profile: {' '.join(bad[0].split())[:300]}; "
                          "narrow --max-sequence / --max-batch")


def _engine_entry(info) -> dict:
    """The manifest's record of one engine: its files, what it was built for, and its profile."""
    m = info.metadata
    return {"file": info.engine_path.name, "metadata": info.metadata_path.name, "target": m["target"],
            "precision": m["precision"], "flavor": m["flavor"], "tensorrt_version": m["tensorrt_version"],
            "size_bytes": info.size_bytes, "seconds": round(info.build_seconds, 3),
            "profile": m.get("optimization_profile", {}), "dims": m.get("dims", {})}


# --------------------------------------------------------------------------- LLaVA eager reference


def llava_prompt(layout: LlavaLayout, num_image_tokens: int, batch: int = 2, *, before: int = 4, after: int = 3,
                 seed: int = 0) -> torch.Tensor:
    """(batch, before + num_image_tokens + after) int64 prompts: random text ids around a block of image tokens."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, layout.vocab_size - 1, (batch, before + after), generator=gen)
    text = text + (text >= layout.image_token_id).long()  # never the image token itself
    image = torch.full((batch, num_image_tokens), layout.image_token_id)
    return torch.cat([text[:, :before], image, text[:, before:]], dim=1)


def _greedy(model: nn.Module, input_ids: torch.Tensor, steps: int, attention_mask: torch.Tensor | None,
            **image) -> tuple[torch.Tensor, torch.Tensor]:
    """HF LLaVA greedy decoding with its own cache; (ids (B, steps), logits (steps, B, V))."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **image)
        for step in range(steps):
            step_logits = out.logits[:, -1].float()
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
    return torch.cat(tokens, dim=1), torch.stack(logits)


def reference_generate(model: nn.Module, vision: VisionPrune, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       max_new_tokens: int = 8, attention_mask: torch.Tensor | None = None, *,
                       inner: FastvSpec | None = None) -> Generation:
    """Eager: `vision` (the same pruning in torch) gives the features, HF LLaVA places them and decodes greedily;
    with `inner`, the eager FastV reference (fastv.reference_fastv_generate) decodes instead."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        features, keep_idx = vision(pixel_values)
    if inner is not None:
        ref = reference_fastv_generate(model, input_ids, features, inner, int(model.config.image_token_id),
                                       max_new_tokens, attention_mask)
        return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                          ref.image_keep_idx.numpy())
    image = BaseModelOutputWithPooling(pooler_output=list(features))
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, mm_encoder_outputs={"image": image})
    return Generation(tokens.numpy(), logits.numpy(), keep_idx.numpy(), features.numpy())


def unpruned_generate(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int = 8,
                      attention_mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The plain HF LLaVA (every patch), greedy: (ids (B, steps), logits (steps, B, V)); the prompt needs N tokens."""
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, pixel_values=pixel_values)
    return tokens.numpy(), logits.numpy()


# --------------------------------------------------------------------------- verify


@dataclass
class VlmVerifyReport:
    """Greedy decoding of the parts (ONNX Runtime, or the TensorRT engines) vs the eager model with the same pruning,
    on one batch."""

    model_type: str                   # "llava" | "qwen2_vl"
    batch: int
    max_new_tokens: int
    atol: float
    tokens_match: bool
    keep_idx_match: bool | None       # the kept image tokens of vision_prune equal the eager module's
    max_abs_diff_logits: float        # every step's logits (LLaVA, FastV); plain Qwen2-VL: the prefill's last
    max_abs_diff_features: float | None  # vision_prune's image features vs the eager module's
    tokens: list[list[int]]           # the parts' greedy ids, (batch, max_new_tokens)
    seconds: float
    inner_keep_idx_match: bool | None = None   # FastV: the kept image tokens are the eager ones
    backend: str = "onnxruntime"               # what ran the parts: "onnxruntime" | "tensorrt"

    @property
    def passed(self) -> bool:
        return (self.tokens_match and self.max_abs_diff_logits <= self.atol and self.keep_idx_match is not False
                and self.inner_keep_idx_match is not False)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_vlm(result: VlmExportResult, input_ids: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 8, batch: int | None = None,
               seed: int = 0, atol: float = 1e-4, threads: int | None = None,
               backend: str = "onnxruntime") -> VlmVerifyReport:
    """The parts' pipeline (ONNX Runtime; backend="tensorrt": the engines build_vlm recorded) vs the eager reference
    on one batch (seeded random images and a prompt unless given): greedy ids, and the logits they were chosen from
    (LLaVA: also keep_idx and the image features).

    batch defaults to 2 for LLaVA; the Qwen2-VL parts are batch 1 (`pixel_values` (N, patch_dim), `input_ids` (1, T)
    with the image's or video's placeholder tokens, as vlm_qwen2.image_prompt / video_prompt build)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if result.model_type == "llava":
        return _verify_llava(result, input_ids, pixel_values, max_new_tokens, 2 if batch is None else batch, seed,
                             atol, threads, backend)
    if batch not in (None, 1):
        raise ConfigError(f"batch={batch}: the Qwen2-VL parts are exported for batch 1; verify with batch=1")
    return _verify_qwen2_vl(result, input_ids, pixel_values, max_new_tokens, seed, atol, threads, backend)


def _verify_llava(result, input_ids, pixel_values, max_new_tokens, batch, seed, atol, threads,
                  backend) -> VlmVerifyReport:
    if batch < 1:
        raise ConfigError(f"batch={batch} must be >= 1")
    t0 = time.perf_counter()
    size = result.layout.image_size
    if pixel_values is None:
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if input_ids is None:
        input_ids = llava_prompt(result.layout, result.num_image_tokens, pixel_values.shape[0], seed=seed)
    with LlavaPipeline(result.out_dir, backend=backend, threads=threads) as pipe:
        got = pipe.generate(input_ids.numpy(), pixel_values.numpy(), max_new_tokens)  # checks the prompt first
    want = reference_generate(result.model, result.vision, input_ids, pixel_values, max_new_tokens,
                              inner=result.inner)
    inner_match = None if result.inner is None else bool(np.array_equal(got.inner_keep_idx, want.inner_keep_idx))
    return VlmVerifyReport(
        model_type="llava", batch=int(pixel_values.shape[0]), max_new_tokens=max_new_tokens, atol=atol,
        tokens_match=bool(np.array_equal(got.tokens, want.tokens)),
        keep_idx_match=got.keep_idx.shape == want.keep_idx.shape and bool((got.keep_idx == want.keep_idx).all()),
        max_abs_diff_logits=float(np.abs(got.logits - want.logits).max()),
        max_abs_diff_features=float(np.abs(got.image_features - want.image_features).max()),
        tokens=got.tokens.tolist(), seconds=time.perf_counter() - t0, inner_keep_idx_match=inner_match,
        backend=backend)


def _verify_qwen2_vl(result, input_ids, pixel_values, max_new_tokens, seed, atol, threads,
                     backend) -> VlmVerifyReport:
    from tokensieve import vlm_qwen2 as q

    t0 = time.perf_counter()
    lay, model = result.layout, result.model
    if pixel_values is None:
        pixel_values = torch.randn(lay.num_patches, lay.patch_dim, generator=torch.Generator().manual_seed(seed))
    if input_ids is None:
        input_ids = q.sample_prompt(model.config, lay)
    vision, inner = {}, {}
    if result.inner is None:
        want, want_logits = q.greedy_eager(model, result.vision, pixel_values, input_ids, max_new_tokens)
    else:  # the independent eager FastV reference; every step's logits are compared
        ref = q.greedy_fastv_reference(model, result.vision, pixel_values, input_ids, result.inner, max_new_tokens)
        want, want_logits = ref.tokens[0].tolist(), ref.logits
    got, got_logits = q.greedy_onnx(model, result.paths, lay, pixel_values, input_ids, max_new_tokens, threads,
                                    backend=backend, vision_out=vision, inner_out=inner)
    inner_match = None
    if result.inner is not None:
        got_logits = torch.from_numpy(inner["logits"])
        inner_match = bool(np.array_equal(inner["image_keep_idx"], ref.image_keep_idx[0].numpy())
                           and np.array_equal(inner["keep_idx"], ref.keep_idx[0].numpy()))
    with torch.no_grad():
        features, keep_idx = result.vision(pixel_values)  # the eager vision_prune on the same image
    return VlmVerifyReport(
        model_type="qwen2_vl", batch=1, max_new_tokens=max_new_tokens, atol=atol,
        tokens_match=list(got) == list(want),
        keep_idx_match=bool(np.array_equal(vision["keep_idx"], keep_idx.numpy())),
        max_abs_diff_logits=float((got_logits - want_logits).abs().max()),
        max_abs_diff_features=float(np.abs(vision["image_features"] - features.numpy()).max()),
        tokens=[list(got)], seconds=time.perf_counter() - t0, inner_keep_idx_match=inner_match, backend=backend)


def verify_llava(result: VlmExportResult, input_ids: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 8, batch: int = 2, seed: int = 0,
                 atol: float = 1e-4, threads: int | None = None) -> VlmVerifyReport:
    """verify_vlm for a LLaVA export (a one-line ConfigError for a Qwen2-VL one)."""
    if result.model_type != "llava":
        raise ConfigError(f"verify_llava got a {VLM_TYPES[result.model_type]} export; use verify_vlm")
    return verify_vlm(result, input_ids, pixel_values, max_new_tokens=max_new_tokens, batch=batch, seed=seed,
                      atol=atol, threads=threads)
