"""`tokensieve export-vlm`: a local LLaVA or Qwen2-VL checkpoint -> pruned vision part + LM prefill/decode ONNX,
verified by greedy decoding against the eager model with the same pruning."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokensieve.errors import ConfigError, ModelError
from tokensieve.recipe import parse_recipe

SUPPORTED = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ExportVlm:
    """Export a VLM in parts with outer visual-token pruning, then verify greedy decoding against eager.

        tokensieve export-vlm llava_dir --prune cls-topk:0.25 -o out_llava/          # FasterVLM
        tokensieve export-vlm llava_dir --prune cls-topk:1.0 --inner fastv@1:0.5 -o out_fastv/   # FastV in the LLM
        tokensieve export-vlm qwen2vl_dir --prune attn-mean:0.5 --grid 1,28,28 -o out_qwen/   # CLS-free
        # writes vision_prune.onnx, lm_prefill.onnx, lm_decode.onnx (+ manifest); prints the kept image tokens,
        # the greedy tokens of ONNX Runtime vs eager, and the files
    """

    name = "export-vlm"

    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="local Hugging Face folder of a LLaVA or Qwen2-VL checkpoint (save_pretrained)")
        p.add_argument("--prune", default="cls-topk:0.25", help="METHOD[(options)]:KEEP, one outer stage after the "
                       "vision tower (default cls-topk:0.25; Qwen2-VL has no [CLS]: attn-mean, divprune, ttv, ...)")
        p.add_argument("-o", "--output", required=True, help="output folder")
        p.add_argument("--grid", default=None, help="Qwen2-VL: the static image grid t,h,w in patches, e.g. 1,28,28")
        p.add_argument("--inner", default=None, help="LLaVA: inner pruning inside the LLM prefill, fastv@LAYER:KEEP "
                       "(drop image tokens after 0-based decoder LAYER by the last prompt position's attention; KEEP "
                       "a ratio of the prompt's image tokens or a count), e.g. fastv@1:0.5")
        p.add_argument("--steps", type=int, default=8, help="greedy tokens compared against eager (default 8)")
        p.add_argument("--no-verify", action="store_true", help="skip the greedy comparison")

    def run(self, args: argparse.Namespace) -> int:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps} must be >= 1")
        kind = vlm_kind(args.model)  # check the arguments before loading any weights
        if args.inner is not None:
            from tokensieve.exporter.vlm.fastv import split_fastv

            if kind != "llava":
                raise ConfigError("--inner (FastV) is supported for LLaVA only; Qwen2-VL exports outer pruning")
            if split_fastv(args.inner)[0]:
                raise ConfigError("--inner fastv(debias=true) needs a calibrated bias; use the Python API "
                                  "(export_llava(..., inner_bias=calibrate_fastv_bias(...)))")
        if kind == "llava":
            if args.grid:
                raise ConfigError("--grid is for Qwen2-VL; a LLaVA's image size comes from its vision config")
            return _llava(load_vlm(args.model)[1], args)
        grid, stage = _grid(args.grid), _one_outer_stage(args.prune)
        return _qwen2_vl(load_vlm(args.model)[1], args, grid, stage)


def vlm_kind(path: str | os.PathLike) -> str:
    """The model_type of a local LLaVA / Qwen2-VL folder; one-line ModelError otherwise."""
    import json

    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json); pass the folder "
                         "written by save_pretrained()")
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except ValueError as e:
        raise ModelError(f"{str(config)!r} is not valid JSON ({e}); re-save the model") from e
    if kind not in SUPPORTED:
        raise ModelError(f"model_type {kind!r} is not a supported VLM ({', '.join(SUPPORTED)}); ViTs go through "
                         "`tokensieve export --model DIR`")
    return kind


def load_vlm(path: str | os.PathLike):
    """-> (model_type, eval model) for a local LLaVA / Qwen2-VL folder; one-line ModelError otherwise."""
    kind, folder = vlm_kind(path), Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from tokensieve.models import quiet_loading

    cls = getattr(transformers, SUPPORTED[kind])
    try:
        with quiet_loading():
            model = cls.from_pretrained(str(folder), attn_implementation="sdpa", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for broken folders
        raise ModelError(f"Could not load {str(folder)!r} as {SUPPORTED[kind]}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return kind, model.eval()


def _llava(model, args) -> int:
    from tokensieve.vlm_api import export_llava, verify_llava

    inner = f" + {args.inner}" if args.inner else ""
    if args.inner:  # range checks need the model; do them before the progress line and the export
        from tokensieve.exporter.vlm.fastv import parse_fastv
        from tokensieve.exporter.vlm.llava import llava_layout
        from tokensieve.vlm_api import parse_outer_recipe

        layout = llava_layout(model)
        keep = parse_outer_recipe(args.prune, layout)[1]
        parse_fastv(args.inner, layout.num_text_layers, keep + int(layout.keep_cls))
    _log(f"[1/2] exporting LLaVA in parts with {args.prune}{inner}")
    result = export_llava(model, args.output, args.prune, inner=args.inner)
    lines = [f"tokensieve: {args.model}  (LLaVA)  {args.prune}{inner}", "",
             f"  image tokens    {result.num_patches} patches -> {result.keep} kept "
             f"({result.num_image_tokens} image tokens per prompt)"]
    if result.inner is not None:
        from tokensieve.exporter.vlm.fastv import prefill_macs

        spec, t = result.inner, result.num_image_tokens + 7  # the verify prompt: 4 text + image tokens + 3 text
        ratio = prefill_macs(result.layout, model.config.text_config, t, spec) / \
            prefill_macs(result.layout, model.config.text_config, t, None)
        lines.append(f"  inner (FastV)   {spec.num_image_tokens} -> {spec.keep} image tokens after LLM layer "
                     f"{spec.layer} (layers {spec.layer + 1}..{spec.num_layers - 1} see T - {spec.dropped}); "
                     f"prefill MACs x{ratio:.2f} for a {t}-token prompt")
    lines.append(f"  export          {sum(result.seconds.values()):.1f} s")
    if not args.no_verify:
        _log(f"[2/2] greedy decoding {args.steps} tokens: ONNX Runtime vs eager")
        rep = verify_llava(result, max_new_tokens=args.steps)
        lines.append(_verify_line(rep.passed, rep.tokens_match, rep.keep_idx_match, rep.max_abs_diff_logits,
                                  rep.atol, args.steps, rep.batch, rep.inner_keep_idx_match))
    lines.append(_files_line(result.out_dir, result.paths.values()))
    print("\n".join(lines))
    return 0 if args.no_verify or rep.passed else 1


def _grid(text: str | None) -> tuple[int, ...]:
    if not text:
        raise ConfigError("Qwen2-VL needs the static image grid: pass --grid t,h,w (patches, e.g. 1,28,28 for 392 px)")
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3:
        raise ConfigError(f"--grid {text!r} must be three integers t,h,w, e.g. 1,28,28")
    return grid


def _qwen2_vl(model, args, grid, stage) -> int:
    import torch

    from tokensieve import vlm_qwen2 as q
    from tokensieve.exporter.vlm.qwen2_vl import image_layout, resolve_method

    layout = image_layout(model.config.vision_config, grid)
    resolve_method(stage.method, stage.options())  # a [CLS] method fails here, before the export
    keep = stage.keep.resolve(layout.num_merged)
    _log(f"[1/2] exporting Qwen2-VL in parts with {args.prune} (grid {grid})")
    import time

    t0 = time.perf_counter()
    result = q.export_qwen2_vl(model, grid, stage.method, keep, stage.options())
    paths = q.save_qwen2_vl(result, args.output)
    seconds = time.perf_counter() - t0
    lines = [f"tokensieve: {args.model}  (Qwen2-VL)  {args.prune}", "",
             f"  image tokens    {layout.num_merged} merged tokens -> {keep} kept",
             f"  export          {seconds:.1f} s"]
    ok = True
    if not args.no_verify:
        _log(f"[2/2] greedy decoding {args.steps} tokens: ONNX Runtime vs eager")
        cfg = model.config
        special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
                   getattr(cfg.text_config, "bos_token_id", None), getattr(cfg.text_config, "eos_token_id", None),
                   getattr(cfg.text_config, "pad_token_id", None)}
        text = [i for i in range(3, 64) if i not in special][:7]
        prompt = q.image_prompt(cfg, result.layout, text[:3], text[3:])
        pixels = torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(0))
        want, want_logits = q.greedy_eager(model, result.vision, pixels, prompt, args.steps)
        got, got_logits = q.greedy_onnx(model, paths, result.layout, pixels, prompt, args.steps)
        diff = float((got_logits - want_logits).abs().max())
        ok = list(got) == list(want) and diff <= 1e-4
        lines.append(_verify_line(ok, list(got) == list(want), None, diff, 1e-4, args.steps, 1))
    lines.append(_files_line(Path(args.output), paths.values()))
    print("\n".join(lines))
    return 0 if ok else 1


def _one_outer_stage(text: str):
    head, colon, keep = str(text).strip().rpartition(":")
    if not colon or "@" in head:
        raise ConfigError(f"--prune {text!r}: write METHOD[(options)]:KEEP for the one stage after the vision tower, "
                          "e.g. attn-mean:0.5")
    stages = parse_recipe(f"{head}@0:{keep}").stages
    if len(stages) != 1:
        raise ConfigError(f"--prune {text!r} must be one stage")
    return stages[0]


def _verify_line(passed, tokens_match, keep_match, diff, atol, steps, batch, inner_match=None) -> str:
    parts = [f"{steps} greedy tokens {'identical' if tokens_match else 'DIFFER'}"]
    if keep_match is not None:
        parts.append(f"keep_idx {'identical' if keep_match else 'DIFFERS'}")
    if inner_match is not None:
        parts.append(f"FastV kept image tokens {'identical' if inner_match else 'DIFFER'}")
    parts.append(f"max |Δ logits| {diff:.1e} (atol {atol:g})")
    return f"  verify          {'PASS' if passed else 'FAIL'}: batch {batch}, " + ", ".join(parts) + \
        " vs eager, ONNX Runtime CPU"


def _files_line(out: Path, paths) -> str:
    return f"\n  wrote {out}/: " + ", ".join(sorted(Path(p).name for p in paths))
