"""The VLM API: a VLM (LLaVA, Qwen2-VL) exported in parts with outer visual-token pruning, and its check against eager.

    result = export_vlm(model, "out/llava", "cls-topk:0.25")                     # LLaVA, FasterVLM: keep 25%
    result = export_vlm(model, "out/qwen", "attn-mean:0.5", grid=(1, 28, 28))    # Qwen2-VL: CLS-free, static grid
    result = export_vlm(model, "out/qwen_video", "attn-mean:0.5", grid=(2, 28, 28))  # Qwen2-VL video (t > 1)
    result = export_vlm(model, "out/q25_video", "evs:0.5", grid=(4, 28, 28), second_per_grid=1.0)  # Qwen2.5-VL video
    result = export_vlm(model, "out/internvl", "cls-topk:0.25", tiles=7)         # InternVL: 7 tiles, K per tile
    report = verify_vlm(result)             # ORT greedy ids == eager with the same pruning (keep_idx, logits)
    record_verification(result, report)     # the manifest's "verification" (what `tokensieve inspect` shows)

Everything here is written once over the VLM model adapters (exporter/vlm/adapter.py; the registry
exporter/vlm/families.py maps the HF class to LlavaAdapter / Qwen2VLAdapter): the plan (every check before any
write), the parts -> ONNX -> manifest pipeline, verification (the parts' greedy decoding vs the adapter's eager
reference: tokens, every step's logits, keep_idx, image features, FastV's kept tokens) and the engine profiles.
export_vlm writes vision_prune.onnx, lm_prefill.onnx and lm_decode.onnx into out_dir, each atomically, plus the
family's extra files (LLaVA: embed_tokens.npy, the pipeline's text embeddings) and the manifest (one schema,
tokensieve.manifest.VlmManifest, in the family's file: llava_parts.json / manifest.json), and returns one
VlmExportResult; verify_vlm returns one VlmVerifyReport.

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
(exporter/vlm/fastv.py, one layer loop for every family: drop image tokens after decoder layer 1 by the last prompt
position's attention, keep R); lm_prefill.onnx / lm_decode.onnx are then the FastV parts and verify_vlm compares
against the eager FastV reference. `inner="fastv(debias=true)@1:8"` also needs `inner_bias=` (calibrate_fastv_bias;
Qwen2-VL: calibrate_qwen2_fastv_bias(model, vision, pixel_values, input_ids, layer), both re-exported here);
`inner="fastv(merge=true)@1:0.5"` merges the dropped image tokens into the kept ones (HoliTom's inner merge; HoliTom =
outer `holitom` + this, HoliTom's layer k = our L + 1). Qwen2-VL (images and videos):
`export_vlm(model, out, "uniform:1.0", grid=(1, 8, 8), inner="fastv@1:0.5")` (M-RoPE positions gathered at the kept
columns); R counts among the K image tokens the outer stage keeps (ToDRE-style: outer keeps K, inner R of those K);
the manifest records "inner".

export_llava / verify_llava are export_vlm / verify_vlm restricted to a LLaVA.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from tokensieve.errors import ConfigError, ExportError, TargetError
from tokensieve.exporter.onnx_files import data_path, stage_onnx
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.export_part import initializer_bytes
from tokensieve.exporter.vlm.families import ADAPTERS, adapter_by_type, adapter_class, adapter_for
from tokensieve.exporter.vlm.fastv import FastvSpec, calibrate_fastv_bias, parse_fastv
from tokensieve.exporter.vlm.llava import LlavaLayout, llava_layout
from tokensieve.exporter.vlm.llava_adapter import (PROMPT_TEXT, llava_prompt, reference_generate,
                                                   unpruned_generate)
from tokensieve.exporter.vlm.qwen2_vl_adapter import PROMPT_EXTRA, PROMPT_LEN, calibrate_qwen2_fastv_bias
from tokensieve.api import STAGING_PREFIX, remove_stale_engines
from tokensieve.fileio import ensure_writable_dir
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static, op_census
from tokensieve.manifest import VLM_MANIFEST_VERSION, VlmManifest, write_vlm_manifest
from tokensieve.recipe import Stage, parse_stage_text
from tokensieve.targets.base import DEFAULT_PRECISION, DEFAULT_TARGET, BuildSpec, Precision

__all__ = ["export_vlm", "verify_vlm", "plan_vlm", "build_vlm", "vlm_profiles", "VlmExportResult", "VlmVerifyReport",
           "VlmPlan", "VlmProfiles", "VLM_TYPES", "vlm_type", "export_llava", "verify_llava", "parse_outer_recipe",
           "llava_prompt", "reference_generate", "unpruned_generate", "write_parts", "EXTERNAL_DATA_THRESHOLD",
           "calibrate_fastv_bias", "calibrate_qwen2_fastv_bias", "staged_folder", "record_verification"]

# model_type -> what the messages call it (the registry's families)
VLM_TYPES = {cls.model_type: cls.label for cls in ADAPTERS.values()}
ARTIFACTS = {"vision": "vision_prune.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx",
             "embed": "embed_tokens.npy"}
QWEN2_VL_MANIFEST = "manifest.json"       # the families' manifest files: adapter.manifest_name
QWEN2_VL_PROMPT_LEN = PROMPT_LEN          # sizes the example the Qwen2-VL LM parts are traced with
# A part whose weights reach this many bytes gets external data (torch.onnx's ONNXProgram.save switches at 1.5 GiB too:
# protobuf refuses to serialize over 2 GB and the graph itself needs headroom).
EXTERNAL_DATA_THRESHOLD = 1536 << 20


def vlm_type(model: nn.Module) -> str:
    """The family's model_type ("llava", "qwen2_vl") from the registry; a one-line ConfigError naming the supported
    families otherwise."""
    return adapter_class(model).model_type


# --------------------------------------------------------------------------- plan: every check before any export


@dataclass(frozen=True)
class VlmPlan:
    """The checked export of one model: which family, its layout, the outer stage and its static K."""

    model_type: str                       # the family: "llava" | "qwen2_vl"
    layout: object                        # the family's layout (LlavaLayout, ImageLayout)
    stage: Stage                          # the outer stage (after the whole tower: after_block is unused)
    keep: int                             # K: image tokens the outer stage keeps
    num_tokens: int                       # what it keeps them from: LLaVA's patches, Qwen2-VL's merged image tokens
    num_image_tokens: int                 # image tokens a prompt carries (K; LLaVA 'full': K + 1 for [CLS])
    inner: FastvSpec | None = None        # FastV inside the LLM prefill (its N: the num_image_tokens above)
    max_positions: int | None = None      # the language model's max_position_embeddings (default --max-sequence)
    placed: bool = True                   # the stage sits after a named vision layer (written back with @LAYER)

    @property
    def prune(self) -> str:
        """The outer stage written back in full: `cls-topk@1:4` (LLaVA) or `attn-mean:6` (Qwen2-VL, no layer)."""
        return self.stage.shorthand(place=self.placed)


def plan_vlm(model: nn.Module, prune: str = "cls-topk:0.25", *, grid=None, inner: str | None = None,
             inner_bias=None, tiles: int | None = None, second_per_grid: float | None = None) -> VlmPlan:
    """Check export_vlm's arguments against `model` without exporting anything; one-line ConfigError otherwise."""
    adapter = adapter_for(model)
    if inner_bias is not None and inner is None:
        raise ConfigError("inner_bias is the calibrated bias of inner='fastv(debias=true)@L:R'; pass inner too")
    layout = adapter.layout(grid) if tiles is None else adapter.tiled_layout(grid, tiles)  # tiles: InternVL's
    layout = adapter.timed_layout(layout, second_per_grid)  # a Qwen2.5-VL video's seconds per temporal patch
    layer = adapter.outer_layer(layout)
    # a stage after a named vision layer (LLaVA's feature layer) or after the whole tower (Qwen2-VL's merger)
    stage = parse_qwen2_vl_prune(prune, adapter.label.split(" (")[0]) if layer is None else \
        parse_outer_recipe(prune, layout)[0]
    keep, num_tokens, num_image_tokens = adapter.check_outer(layout, stage)
    # FastV keeps R of the image tokens the outer stage leaves in the prompt
    fastv = None if inner is None else parse_fastv(inner, adapter.lm_layout().num_text_layers, num_image_tokens,
                                                   inner_bias)
    return VlmPlan(adapter.model_type, layout, stage, keep, num_tokens, num_image_tokens, fastv,
                   _max_positions(adapter.text_config), layer is not None)


def _max_positions(text_config) -> int | None:
    n = getattr(text_config, "max_position_embeddings", None)
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


def parse_qwen2_vl_prune(text: str, family: str = "Qwen2-VL") -> Stage:
    """A family whose stage runs after its whole tower (Qwen2-VL's merger, Gemma 3's pooling): `attn-mean:0.5` -> the
    one stage (its after_block is a placeholder 0)."""
    st = _outer_stage_text(text)
    if st.places is not None:
        raise ConfigError(f"prune {text!r}: {family} prunes once, after the vision tower; write {OUTER_EXAMPLE}"
                          .replace(", e.g. cls-topk:0.25", ", e.g. attn-mean:0.5"))
    return st.stage(0)


# --------------------------------------------------------------------------- export


@dataclass
class VlmExportResult:
    """What export_vlm wrote, and the eager modules verify_vlm compares the parts against (every family)."""

    model_type: str                 # the family: "llava" | "qwen2_vl"
    out_dir: Path
    paths: dict[str, Path]          # vision, prefill, decode, manifest (+ the family's extra files, LLaVA: embed); a
                                    # part written with external data also has "<part>_data" (<part>.onnx.data)
    prune: str                      # the outer stage written back in full, e.g. cls-topk@1:4 / attn-mean:6
    method: str
    options: dict                   # the method's options, defaults filled in
    keep: int                       # K: image tokens the outer stage keeps
    num_tokens: int                 # what it keeps them from: LLaVA's patches, Qwen2-VL's merged image tokens
    num_image_tokens: int           # image tokens a prompt must carry (K; LLaVA 'full': K + 1)
    layout: object                  # the family's layout (LlavaLayout, ImageLayout)
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
    verification: dict | None = None  # record_verification: the manifest's "verification" entry (None: none recorded)

    @property
    def adapter(self) -> VlmAdapter:
        return adapter_by_type(self.model_type)(self.model)

    @property
    def external_data(self) -> dict[str, Path]:
        """{part: its `<part>.onnx.data`} for the parts written with external data."""
        return {k[:-len("_data")]: p for k, p in self.paths.items() if k.endswith("_data")}

    @property
    def grid(self) -> tuple[int, int, int] | None:
        """The static image or video grid (t, h, w) in patches (t > 1: a video); None for a family without one."""
        grid = self.adapter.manifest_fields(self.layout)["grid_thw"]
        return None if grid is None else tuple(grid)

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type, "prune": self.prune, "method": self.method, "options": self.options,
               "keep": self.keep, "num_tokens": self.num_tokens, "num_image_tokens": self.num_image_tokens,
               "layout": asdict(self.layout), "files": {k: p.name for k, p in self.paths.items()},
               "sizes": self.sizes, "seconds": self.seconds, "vision_ops": self.vision_ops,
               "prefill_ops": self.prefill_ops}
        if self.grid is not None:
            out["grid"] = list(self.grid)
            out["modality"] = self.adapter.manifest_fields(self.layout)["modality"]
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        if self.engines:
            out["engines"] = self.engines
        if self.verification is not None:
            out["verification"] = self.verification
        return out

    def manifest(self) -> VlmManifest:
        """The folder's manifest (tokensieve.manifest's one schema)."""
        adapter = self.adapter
        fields = adapter.manifest_fields(self.layout)
        return VlmManifest(
            version=VLM_MANIFEST_VERSION, model_type=self.model_type, modality=fields["modality"],
            grid_thw=fields["grid_thw"], prune=self.prune, method=self.method, options=dict(self.options),
            keep=self.keep, image_tokens=self.num_tokens, num_image_tokens=self.num_image_tokens,
            placeholder_token_id=adapter.placeholder_id(self.layout),
            num_text_layers=adapter.lm_layout().num_text_layers, layout=asdict(self.layout),
            files={k: p.name for k, p in self.paths.items() if k != "manifest"}, sizes=dict(self.sizes),
            seconds=dict(self.seconds), vision_ops=dict(self.vision_ops), prefill_ops=dict(self.prefill_ops),
            inner=None if self.inner is None else self.inner.to_dict(), engines=dict(self.engines),
            verification=None if self.verification is None else dict(self.verification))


def export_vlm(model: nn.Module, out_dir: str | Path, prune: str = "cls-topk:0.25", *, grid=None,
               inner: str | None = None, inner_bias=None, tiles: int | None = None,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
               second_per_grid: float | None = None) -> VlmExportResult:
    """Export `model` (a registered VLM family: LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration; eval
    mode is set) as three ONNX parts with `prune` after the vision tower into `out_dir`. Qwen2-VL needs
    `grid=(t, h, w)`, InternVL takes `tiles=N` (static tiles per image, default 1); all take `inner="fastv@L:R"`
    (FastV inside the LLM prefill, R of the image tokens the prompt carries). A Qwen2.5-VL video (grid t > 1) needs
    `second_per_grid` (seconds per temporal patch: temporal_patch_size / fps, HF's second_per_grid_ts), which spaces
    its M-RoPE time positions; the manifest's layout records it. A part whose weights reach
    `external_data_threshold` bytes is written with its weights in `<part>.onnx.data` (0: every part)."""
    if isinstance(external_data_threshold, bool) or not isinstance(external_data_threshold, int) \
            or external_data_threshold < 0:
        raise ConfigError(f"external_data_threshold={external_data_threshold!r} must be a byte count >= 0 "
                          f"(0 writes every part with external data; default {EXTERNAL_DATA_THRESHOLD})")
    plan = plan_vlm(model, prune, grid=grid, inner=inner, inner_bias=inner_bias, tiles=tiles,
                    second_per_grid=second_per_grid)  # checks, then writes
    model.eval()
    adapter = adapter_for(model)
    vision = adapter.vision_module(plan)
    parts = adapter.part_exporters(plan, vision)
    out = ensure_writable_dir(out_dir)
    models, seconds = {}, {}
    for key, make in parts.items():
        t0 = time.perf_counter()
        models[key] = make()  # onnx_ir models whose weights are still the module's tensors
        seconds[key] = time.perf_counter() - t0
    paths, ops = write_parts(models, out, external_data_threshold)
    paths |= adapter.extra_files(out)
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    result = VlmExportResult(plan.model_type, out, paths, plan.prune, plan.stage.method, dict(vision.options),
                             plan.keep, plan.num_tokens, plan.num_image_tokens, plan.layout, ops["vision"],
                             ops["prefill"], sizes, seconds, model, vision, plan.inner, plan.max_positions)
    _write_manifest(result)
    return result


def _write_manifest(result: VlmExportResult) -> Path:
    """Write the folder's manifest (the family's file name, tokensieve.manifest's schema) atomically; sets
    paths["manifest"]. Then delete the part engines (ENGINES + .json) it does not list: an earlier build's, of the ONNX
    just replaced (result.removed_engines gets their names)."""
    path = result.out_dir / result.adapter.manifest_name
    result.paths["manifest"] = write_vlm_manifest(path, result.manifest())
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


def export_llava(model: nn.Module, out_dir: str | Path, recipe: str = "cls-topk:0.25", *, inner: str | None = None,
                 inner_bias=None) -> VlmExportResult:
    """export_vlm for a LlavaForConditionalGeneration only (a one-line ConfigError for any other model)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "llava":
        llava_layout(model)  # raises: names LlavaForConditionalGeneration and what it got
    return export_vlm(model, out_dir, recipe, inner=inner, inner_bias=inner_bias)


# --------------------------------------------------------------------------- engines


ENGINES = {"vision": "vision_prune.engine", "prefill": "lm_prefill.engine", "decode": "lm_decode.engine"}
LLAVA_PROMPT_TEXT = PROMPT_TEXT       # llava_prompt's text tokens before / after the image tokens: verify_vlm's prompt
QWEN2_VL_PROMPT_EXTRA = PROMPT_EXTRA  # vlm_qwen2.sample_prompt: 7 text tokens + <vision_start> + <vision_end>


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
    hold: batch 1..B (a family whose parts are batch 1, Qwen2-VL: 1); prefill `sequence` 1..S, opt = the example
    prompt (the one verify_vlm uses, pruned: the image tokens + the adapter's prompt_extra); decode `past_sequence`
    0..S. FastV: the prefill takes at least N + 1 tokens (N image tokens, then text) and its keep TopK takes
    K = sequence - (N - R) <= 3840 (TensorRT's TopK limit), so S defaults to at most 3840 + N - R; decode's
    `pruned_past_sequence` is 0..S - (N - R). S defaults to the language model's max_position_embeddings."""
    from tokensieve.targets.tensorrt.lint import TOPK_MAX_K

    for flag, value in (("--max-batch", max_batch), ("--max-sequence", max_sequence)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} {value!r} must be a positive integer")
    family = adapter_by_type(export.model_type)
    if not family.batched and max_batch != 1:
        raise ConfigError(f"--max-batch {max_batch}: the {family.label.split(' (')[0]} parts are exported for batch 1; "
                          "build them with --max-batch 1")
    spec = export.inner
    dropped = spec.dropped if spec is not None else 0
    prompt, what = export.num_image_tokens + family.prompt_extra, family.prompt_extra_what
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


def build_vlm(result: VlmExportResult, *, target: str = DEFAULT_TARGET, precision: Precision | str = DEFAULT_PRECISION,
              max_batch: int = 1,
              max_sequence: int | None = None, progress=None) -> dict:
    """Build one engine per part (vision_prune.engine, lm_prefill.engine, lm_decode.engine + their .json) into the
    export folder with vlm_profiles' profiles, and record them in the manifest under "engines" (also
    `result.engines`). Returns {part: EngineInfo}; a part that does not build is a one-line TargetError naming it."""
    from tokensieve.targets import get_target

    precision = Precision.parse(precision)
    if precision is Precision.INT8:
        raise ConfigError("--precision int8 is for ViT exports (tokensieve export); the VLM parts build as fp32 or fp16")
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
            info = get_target("tensorrt").build(result.paths[key], spec, engine, extra)
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
    bad = [w for w in info.metadata["build_warnings"] if "values are not self-consistent" in w]
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


# --------------------------------------------------------------------------- the output folder (export-vlm)


MANIFESTS = tuple(dict.fromkeys(cls.manifest_name for cls in ADAPTERS.values()))  # llava_parts.json, manifest.json
# every file an export-vlm owns in its folder besides its manifest: removed before a new export's files move in
OWNED = (*ARTIFACTS.values(), *(data_path(Path(ARTIFACTS[k])).name for k in ENGINES), *ENGINES.values(),
         *(f"{e}.json" for e in ENGINES.values()))


@contextmanager
def staged_folder(out_dir: str | Path, removed: list[str] | None = None):
    """`tokensieve export-vlm`'s output folder, written the way `tokensieve export` writes its own
    (api.export_folder): lock `out_dir` (a second writer, either command, fails at once with one line), yield a fresh
    staging folder inside it for export_vlm / verify_vlm / build_vlm, and on a clean exit swap the staged files in,
    the manifest last. Until the swap the folder holds the previous complete export; a run that stops early (an
    error, Ctrl-C) leaves it so, and removes the staging folder and `out_dir` itself if it created it. A killed run
    (SIGKILL) leaves a staging folder and temp files that the next run removes. `removed` (a list) receives the names
    of the previous export's engine files that the swap deleted and nothing replaced (a --no-build re-export)."""
    import shutil
    import tempfile

    from tokensieve.fileio import check_interrupted, folder_lock, interruptible, remove_stale_temps, write_error

    created = not os.path.lexists(out_dir)
    out = ensure_writable_dir(out_dir)
    with interruptible(), folder_lock(out) as out:  # before anything in it is touched
        try:
            for leftover in out.glob(STAGING_PREFIX + "*"):  # a killed run's (we hold the lock: nobody else's)
                shutil.rmtree(leftover, ignore_errors=True)
            remove_stale_temps(out, (*OWNED, *MANIFESTS))
            try:
                stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            except OSError as e:
                raise write_error(e, out / STAGING_PREFIX, "create a staging folder in") from e
            try:
                yield stage
                check_interrupted()
                gone = _swap_in(stage, out)
                if removed is not None:
                    removed += gone
            except ConfigError as e:  # a write that failed in the staging folder: name the file where the user looks
                if str(stage) not in str(e):
                    raise
                raise type(e)(str(e).replace(str(stage), str(out))) from e
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        except BaseException:
            if created:  # leave no output folder behind that this run made
                with suppress(OSError):
                    out.rmdir()
            raise


def _swap_in(stage: Path, out: Path) -> list[str]:
    """Replace the folder's export by the staged one; returns the earlier engine files removed and not replaced.
    With Ctrl-C held, only unlinks and renames: the old manifest goes first (from here the folder holds no complete
    export), then every file of the earlier export, then the staged files move in, the manifest last. A run killed in
    between leaves files of one run only, without a manifest."""
    from tokensieve.fileio import deferred_interrupts, write_error

    staged = sorted((p for p in stage.iterdir() if p.name not in MANIFESTS), key=lambda p: p.name)
    staged += [stage / name for name in MANIFESTS if (stage / name).is_file()]
    names = {p.name for p in staged}
    engines = [name for e in ENGINES.values() for name in (e, f"{e}.json")]  # remove_stale_engines' order
    was_export = (out / ARTIFACTS["vision"]).is_file()  # another family's manifest goes too, not a stray user file
    removed = []
    with deferred_interrupts():
        try:
            for name in (*MANIFESTS, *OWNED):
                file = out / name
                if (name in names or was_export or name in OWNED) and (file.is_file() or file.is_symlink()):
                    file.unlink()
                    if name in engines and name not in names:
                        removed.append(name)
            for file in staged:
                os.replace(file, out / file.name)
        except OSError as e:
            raise write_error(e, out, "move the new export into") from e
    return sorted(removed, key=engines.index)


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
    """The parts' greedy decoding (ONNX Runtime; backend="tensorrt": the engines build_vlm recorded) vs the adapter's
    eager reference with the same pruning on one batch (seeded random images and a prompt unless given): greedy ids,
    every step's logits they were chosen from, keep_idx, the image features, and FastV's kept tokens.

    batch defaults to the family's (LLaVA 2); the Qwen2-VL parts are batch 1 (`pixel_values` (N, patch_dim),
    `input_ids` (1, T) with the image's or video's placeholder tokens, as vlm_qwen2.image_prompt / video_prompt
    build)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    adapter = result.adapter
    batch = adapter.check_verify_batch(batch)
    t0 = time.perf_counter()
    if pixel_values is None:
        pixel_values = adapter.sample_pixels(result.layout, batch, seed)
    if input_ids is None:
        rows = pixel_values.shape[0] if adapter.batched else 1
        input_ids = adapter.sample_prompt(result.layout, result.num_image_tokens, rows, seed)
    got = adapter.generate_parts(result, input_ids, pixel_values, max_new_tokens, threads, backend)
    want = adapter.generate_reference(result, input_ids, pixel_values, max_new_tokens)
    inner_match = None
    if result.inner is not None:
        inner_match = bool(np.array_equal(got.inner_keep_idx, want.inner_keep_idx)
                           and np.array_equal(got.inner_prompt_keep_idx, want.inner_prompt_keep_idx))
    return VlmVerifyReport(
        model_type=result.model_type, batch=int(got.tokens.shape[0]), max_new_tokens=max_new_tokens, atol=atol,
        tokens_match=bool(np.array_equal(got.tokens, want.tokens)),
        keep_idx_match=got.keep_idx.shape == want.keep_idx.shape and bool((got.keep_idx == want.keep_idx).all()),
        max_abs_diff_logits=float(np.abs(got.logits - want.logits).max()),
        max_abs_diff_features=float(np.abs(got.image_features - want.image_features).max()),
        tokens=got.tokens.tolist(), seconds=time.perf_counter() - t0, inner_keep_idx_match=inner_match,
        backend=backend)


def record_verification(result: VlmExportResult, report: VlmVerifyReport | None) -> dict:
    """Record in the export's manifest (rewritten atomically) how its parts were checked against eager: `report`
    (verify_vlm's; status "passed" / "failed") or None (status "not run", --no-verify), with the time in UTC.
    Returns the entry (also `result.verification`); build_vlm's manifest keeps it. `tokensieve inspect` prints it."""
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if report is None:
        entry = {"status": "not run", "when": when}
    else:
        entry = {"status": "passed" if report.passed else "failed", "when": when, "backend": report.backend,
                 "batch": report.batch, "steps": report.max_new_tokens, "tokens_match": report.tokens_match,
                 "keep_idx_match": report.keep_idx_match, "inner_keep_idx_match": report.inner_keep_idx_match,
                 "max_abs_diff_logits": report.max_abs_diff_logits,
                 "max_abs_diff_features": report.max_abs_diff_features, "atol": report.atol}
    result.verification = entry
    _write_manifest(result)
    return entry


def verify_llava(result: VlmExportResult, input_ids: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 8, batch: int = 2, seed: int = 0,
                 atol: float = 1e-4, threads: int | None = None) -> VlmVerifyReport:
    """verify_vlm for a LLaVA export (a one-line ConfigError for any other family's)."""
    if result.model_type != "llava":
        raise ConfigError(f"verify_llava got a {VLM_TYPES[result.model_type]} export; use verify_vlm")
    return verify_vlm(result, input_ids, pixel_values, max_new_tokens=max_new_tokens, batch=batch, seed=seed,
                      atol=atol, threads=threads)
