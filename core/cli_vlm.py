"""`tokensieve export-vlm`: a local LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint -> pruned vision part + LM prefill/decode ONNX,
verified by greedy decoding against the eager model with the same pruning, then one TensorRT engine per part.
Qwen2-VL exports one image (--grid 1,H,W) or one video (--grid T,H,W with T > 1 temporal patches); a Qwen2.5-VL video
also takes --seconds-per-grid (its M-RoPE time spacing)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokensieve.errors import ConfigError, ModelError, TargetError
from tokensieve.targets.base import DEFAULT_PRECISION, DEFAULT_TARGET, PRECISIONS


def _families() -> dict:
    """model_type -> the family's adapter class (exporter/vlm/families.py; imported when a VLM command runs)."""
    from tokensieve.exporter.vlm.families import BY_MODEL_TYPE

    return BY_MODEL_TYPE


def _label(kind: str) -> str:
    """What messages call the family: "LLaVA", "Qwen2-VL"."""
    return _families()[kind].label.split(" (")[0]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ExportVlm:
    """Export a VLM in parts with outer visual-token pruning, verify greedy decoding against eager, build engines.

        tokensieve export-vlm llava_dir --prune cls-topk:0.25 -o out_llava/          # FasterVLM
        tokensieve export-vlm llava_dir --prune cls-topk:1.0 --inner fastv@1:0.5 -o out_fastv/   # FastV in the LLM
        tokensieve export-vlm qwen2vl_dir --prune attn-mean:0.5 --grid 1,28,28 -o out_qwen/   # CLS-free
        tokensieve export-vlm qwen2vl_dir --prune divprune:0.25 --grid 2,28,28 -o out_video/  # a 4-frame video
        tokensieve export-vlm qwen25vl_dir --prune evs:0.25 --grid 8,28,28 --seconds-per-grid 1.0 -o out_q25v/
        tokensieve export-vlm qwen2vl_dir --prune uniform:1.0 --grid 1,28,28 --inner fastv@1:0.5 -o out_qfastv/
        tokensieve export-vlm internvl_dir --prune cls-topk:0.25 --tiles 7 -o out_internvl/   # K per tile
        tokensieve export-vlm llava_dir --inner "fastv(debias=true)@1:0.5" --inner-bias bias.npy -o out_debias/
        tokensieve export-vlm llava_dir -o out/ --target rtx-sm89 --precision fp16 --max-batch 4 --max-sequence 2048
        tokensieve export-vlm llava_dir -o out/ --no-build            # ONNX only
        # writes vision_prune.onnx, lm_prefill.onnx, lm_decode.onnx (a part over 1.5 GiB of weights: + <part>.onnx.data)
        # and the manifest; prints the kept image tokens, the greedy tokens of ONNX Runtime vs eager, then builds
        # vision_prune.engine, lm_prefill.engine, lm_decode.engine (profiles: batch 1..B, sequence 1..S, opt = the
        # verify prompt) and prints their sizes and build times
    """

    name = "export-vlm"

    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="local Hugging Face folder of a LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint (save_pretrained)")
        p.add_argument("--prune", default="cls-topk:0.25", help="METHOD[(options)]:KEEP, one outer stage after the "
                       "vision tower (default cls-topk:0.25; Qwen2-VL has no [CLS]: attn-mean, divprune, ttv, ...; a "
                       "Qwen2-VL video also takes the video methods evs and holitom)")
        p.add_argument("-o", "--output", required=True, help="output folder")
        p.add_argument("--grid", default=None, help="Qwen2-VL / Qwen2.5-VL: the static grid t,h,w in patches: 1,28,28 an image "
                       "(392 px); t > 1 a video of t temporal patches (temporal_patch_size frames each, e.g. 2,28,28 "
                       "for 4 frames), attended per temporal patch, its prompt holding video tokens")
        p.add_argument("--seconds-per-grid", type=float, default=None, metavar="S", help="Qwen2.5-VL videos "
                       "(needed with --grid t,h,w, t > 1): the seconds one temporal patch spans, temporal_patch_size "
                       "/ the processor's fps (HF's second_per_grid_ts; e.g. 1.0 for 2 frames per patch at 2 fps); "
                       "spaces the video's M-RoPE time positions tokens_per_second x S apart, fixed at export and "
                       "recorded in the manifest")
        p.add_argument("--tiles", type=int, default=None, help="InternVL: the static tile count per image (default "
                       "1): vision_prune takes pixel_values (N, 3, S, S), the prompt the image tokens of all N tiles "
                       "in order; each tile keeps KEEP of its tokens")
        p.add_argument("--inner", default=None, help="inner pruning inside the LLM prefill, fastv@LAYER:KEEP "
                       "(drop image tokens after 0-based decoder LAYER by the last prompt position's attention; KEEP "
                       "a ratio of the prompt's image tokens, i.e. of those --prune keeps, or a count), e.g. "
                       "fastv@1:0.5 (LLaVA and Qwen2-VL, images and videos); fastv(uniform=0.5)@L:R is FEATHER, "
                       "fastv(merge=true)@L:R merges each dropped image token into its most similar kept one "
                       "(HoliTom's inner merge; HoliTom = --prune holitom:... --inner fastv(merge=true)@k-1:R)")
        p.add_argument("--inner-bias", default=None, metavar="FILE.npy", help="the calibrated per-position bias "
                       "--inner fastv(debias=true)@L:R subtracts from the FastV score: a float (N,) .npy, N = the "
                       "image tokens the inner stage sees (those --prune keeps; LLaVA 'full': + 1 for [CLS]). Make "
                       "it in Python with the same --prune and L: bias = tokensieve.vlm_api.calibrate_fastv_bias("
                       "model, input_ids, image_features, L, image_token_id) (LLaVA) or "
                       "calibrate_qwen2_fastv_bias(model, vision, pixel_values, input_ids, L) (Qwen2-VL, vision = "
                       "the outer Qwen2VLVisionPrune), then numpy.save('bias.npy', bias)")
        p.add_argument("--steps", type=int, default=8, help="greedy tokens compared against eager (default 8)")
        p.add_argument("--no-verify", action="store_true", help="skip the greedy comparison")
        p.add_argument("--target", default=DEFAULT_TARGET, help="engine target: rtx-sm75|80|86|89|120|121 (TensorRT-RTX, "
                       f"no GPU needed) or local (TensorRT, this GPU) (default {DEFAULT_TARGET})")
        p.add_argument("--precision", default=DEFAULT_PRECISION.value, choices=[p for p in PRECISIONS if p != "int8"],
                       help=f"engine precision; fp16 keeps scores, TopK inputs, norms, softmax fp32 (default {DEFAULT_PRECISION})")
        p.add_argument("--max-batch", type=int, default=1, help="largest batch of the engines' profiles (default 1; "
                       "the Qwen2-VL parts are batch 1)")
        p.add_argument("--max-sequence", type=int, default=None, help="longest sequence (prompt + generated tokens) "
                       "of the LM engines: prefill sequence 1..S, decode past_sequence 0..S (default: the language "
                       "model's max_position_embeddings; FastV: at most 3840 + the dropped image tokens)")
        p.add_argument("--no-build", action="store_true", help="skip the TensorRT engines (a re-export "
                       "still removes the part engines an earlier one built in the folder)")

    def run(self, args: argparse.Namespace) -> int:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps} must be >= 1")
        if not args.no_build:  # a bad --target/--precision/--max-batch, or no TensorRT, fails now, not after the export
            _check_build_args(args)
        kind = vlm_kind(args.model)  # check the arguments before loading any weights
        bias = _inner_bias(args.inner, args.inner_bias)
        grid, family = None, _families()[kind]
        if args.tiles is not None and (not family.tiled or args.tiles < 1):
            raise ConfigError(f"--tiles {args.tiles} must be >= 1" if family.tiled else
                              f"--tiles is for InternVL; a {_label(kind)} takes no tiles, drop --tiles")
        if args.grid and not family.static_grid:
            t = args.grid.split(",")[0].strip()
            video = t.isdigit() and int(t) > 1  # t > 1 temporal patches: a video grid
            raise ConfigError(f"--grid {args.grid} is a video grid (t > 1), but {_label(kind)} takes one image, not a "
                              "video; drop --grid (videos: Qwen2-VL / Qwen2.5-VL)" if video else
                              f"--grid is for Qwen2-VL / Qwen2.5-VL; {_label(kind)}'s image size comes from its vision "
                              "config, drop --grid")
        seconds = args.seconds_per_grid
        if seconds is not None and not (family.static_grid and 0 < seconds < float("inf")):
            raise ConfigError(f"--seconds-per-grid {seconds:g} must be a finite number of seconds > 0 per temporal "
                              "patch (temporal_patch_size / fps)" if family.static_grid else
                              f"--seconds-per-grid is for Qwen2.5-VL videos; a {_label(kind)} takes none, drop it")
        if family.static_grid:  # the grid, and the one stage after the whole tower, checked before the weights load
            from tokensieve.vlm_api import parse_qwen2_vl_prune

            grid = _grid(args.grid)
            parse_qwen2_vl_prune(args.prune)
        return _export(load_vlm(args.model)[1], args, kind, grid, bias)


_MAKE_BIAS = ("make it with tokensieve.vlm_api.calibrate_fastv_bias (LLaVA) or calibrate_qwen2_fastv_bias (Qwen2-VL) "
              "and numpy.save('bias.npy', bias)")


def _inner_bias(inner: str | None, path: str | None):
    """--inner-bias FILE.npy -> the float (N,) array (its length is checked against the model in _export), None
    without; one-line ConfigError unless --inner is fastv(debias=true) exactly when a finite float .npy is given."""
    import numpy as np

    debias = False
    if inner is not None:
        from tokensieve.exporter.vlm.fastv import split_fastv

        debias = split_fastv(inner)[0]
    if path is None:
        if debias:
            raise ConfigError(f"--inner {inner} needs the calibrated bias: pass --inner-bias FILE.npy ({_MAKE_BIAS})")
        return None
    if not debias:
        got = "no --inner is given" if inner is None else f"--inner is {inner!r}"
        raise ConfigError(f"--inner-bias is the calibrated bias of --inner fastv(debias=true)@L:R, but {got}; pass "
                          "that --inner or drop --inner-bias")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--inner-bias {path!r} does not exist; {_MAKE_BIAS}")
    if file.suffix != ".npy":
        raise ConfigError(f"--inner-bias {path!r} is not a .npy file; {_MAKE_BIAS}")
    try:
        bias = np.load(file, allow_pickle=False)  # never unpickle: an object array is refused, not loaded
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError / OSError / EOFError for broken files
        with open(file, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"  # numpy calls any non-.npy bytes "pickled data"
        if is_npy and "allow_pickle" in str(e):
            raise ConfigError(f"--inner-bias {file.name!r} holds Python objects (allow_pickle), which tokensieve "
                              "never loads; save a 1-D float array with numpy.save") from e
        raise ConfigError(f"--inner-bias {path!r} cannot be read as .npy ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {_MAKE_BIAS}") from e
    if not isinstance(bias, np.ndarray) or not np.issubdtype(bias.dtype, np.floating) or bias.ndim != 1:
        what = f"{bias.dtype} values of shape {bias.shape}" if isinstance(bias, np.ndarray) else type(bias).__name__
        raise ConfigError(f"--inner-bias {path!r} holds {what}; it must be a 1-D float array (N,), one value per "
                          f"image token")
    bad = int((~(np.abs(bias) < np.finfo(np.float32).max)).sum())  # the graph subtracts it in float32
    if bad:
        raise ConfigError(f"--inner-bias {path!r} holds {bad} value(s) that are NaN, inf or beyond float32; "
                          "recalibrate")
    return bias.astype(np.float64)


def _check_build_args(args: argparse.Namespace) -> None:
    from tokensieve.runtime import tensorrt_flavors
    from tokensieve.targets.base import BuildSpec

    if args.max_sequence is not None and args.max_sequence < 1:
        raise ConfigError(f"--max-sequence {args.max_sequence} must be a positive integer")
    spec = BuildSpec(target=args.target, precision=args.precision, max_batch=args.max_batch)
    try:
        tensorrt_flavors.import_flavor(spec.parsed_target.flavor)
    except TargetError as e:
        raise TargetError(f"{e}; or pass --no-build to export the ONNX parts only") from e


def vlm_kind(path: str | os.PathLike) -> str:
    """The model_type of a local LLaVA / Qwen2-VL folder; one-line ModelError otherwise."""
    from tokensieve.manifest import read_json_object

    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json); pass the folder "
                         "written by save_pretrained()")
    kind = read_json_object(config, "a model config", "re-save the model with save_pretrained()",
                            error=ModelError).get("model_type")
    if kind not in _families():
        raise ModelError(f"model_type {kind!r} is not a supported VLM ({', '.join(_families())}); ViTs go through "
                         "`tokensieve export --model DIR`")
    return kind


def load_vlm(path: str | os.PathLike):
    """-> (model_type, eval model) for a local LLaVA / Qwen2-VL folder; one-line ModelError otherwise."""
    kind, folder = vlm_kind(path), Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from tokensieve.models import SAFE_LOADING, quiet_loading
    from tokensieve.trust import check_model_folder

    check_model_folder(folder)  # custom code (auto_map) is refused before transformers reads the folder
    cls = getattr(transformers, _families()[kind].hf_class)
    try:
        with quiet_loading():
            model = cls.from_pretrained(str(folder), attn_implementation="sdpa", local_files_only=True,
                                        **SAFE_LOADING)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for broken folders
        raise ModelError(f"Could not load {str(folder)!r} as {_families()[kind].hf_class}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return kind, model.eval()


def _export(model, args, kind: str, grid, bias=None) -> int:
    from tokensieve.vlm_api import plan_vlm, staged_folder, vlm_profiles

    if bias is not None:  # N is the image tokens the outer stage leaves in the prompt: known once the model is loaded
        n = plan_vlm(model, args.prune, grid=grid, tiles=args.tiles,
                     second_per_grid=args.seconds_per_grid).num_image_tokens
        if bias.shape != (n,):
            raise ConfigError(f"--inner-bias {args.inner_bias!r} holds {bias.shape[0]} values but the inner stage "
                              f"sees {n} image tokens (--prune {args.prune}); calibrate with the same --prune")
    # range checks need the model: before the export
    plan = plan_vlm(model, args.prune, grid=grid, inner=args.inner, inner_bias=bias, tiles=args.tiles,
                    second_per_grid=args.seconds_per_grid)
    profiles = None if args.no_build else vlm_profiles(plan, max_batch=args.max_batch, max_sequence=args.max_sequence)
    removed = []
    # one writer per folder; everything is written into a staging folder and swapped in at the end (the manifest
    # last): an error or Ctrl-C leaves the previous export as it was, a killed run leaves what the next run removes
    with staged_folder(args.output, removed) as stage:
        lines, ok, files = _export_into(model, args, kind, grid, bias, plan, profiles, stage)
    result = getattr(args, "vlm_result", None)
    if result is not None:  # swapped in: the result names the files where they now are
        final = Path(args.output)
        result.paths = {k: final / Path(v).relative_to(stage) if Path(v).is_relative_to(stage) else v
                        for k, v in result.paths.items()}
        result.out_dir = final
    if removed:  # built from the parts just replaced; the new manifest lists no engines
        _log(f"      removed stale engines of an earlier export: {', '.join(removed)}")
    lines.append(_files_line(Path(args.output), files))
    print("\n".join(lines))
    return 0 if ok else 1


def _export_into(model, args, kind: str, grid, bias, plan, profiles, stage: Path):
    """Export, verify and build into the staging folder `stage` -> (summary lines, verified, files written)."""
    from tokensieve.vlm_api import build_vlm, export_vlm, record_verification, verify_vlm

    build = not args.no_build
    label = _label(kind)
    inner = f" + {args.inner}" if args.inner else ""
    where = f" ({plan.layout.modality} grid {grid})" if grid else ""
    _log(f"[1/3] exporting {label} in parts with {args.prune}{inner}{where}")
    result = export_vlm(model, stage, args.prune, grid=grid, inner=args.inner, inner_bias=bias, tiles=args.tiles,
                        second_per_grid=args.seconds_per_grid)
    args.vlm_result = result
    lines = [f"tokensieve: {args.model}  ({label})  {args.prune}{inner}", ""]
    adapter = result.adapter  # the family's facts (exporter/vlm/adapter.py)
    lines.append(adapter.tokens_line(result))
    if result.inner is not None:
        from tokensieve.exporter.vlm.fastv import prefill_macs

        # the verify prompt: the image tokens + the family's text (and vision-marker) tokens
        spec, lay, t = result.inner, adapter.lm_layout(), result.num_image_tokens + adapter.prompt_extra
        what = adapter.manifest_fields(result.layout)["modality"]
        ratio = prefill_macs(lay, model.config.text_config, t, spec) / prefill_macs(lay, model.config.text_config, t,
                                                                                    None)
        merged = f", the other {spec.dropped} merged in (HoliTom)" if spec.merge else ""
        lines.append(f"  inner (FastV)   {spec.num_image_tokens} -> {spec.keep} {what} tokens after LLM layer "
                     f"{spec.layer}{merged} (layers {spec.layer + 1}..{spec.num_layers - 1} see T - {spec.dropped}); "
                     f"prefill MACs x{ratio:.2f} for a {t}-token prompt")
    external = f" (external data: {', '.join(p.name for p in result.external_data.values())})" \
        if result.external_data else ""
    lines.append(f"  export          {sum(result.seconds.values()):.1f} s{external}")
    ok = True
    if not args.no_verify:
        _log(f"[2/3] greedy decoding {args.steps} tokens: ONNX Runtime vs eager")
        rep = verify_vlm(result, max_new_tokens=args.steps)
        ok = rep.passed
        record_verification(result, rep)  # the manifest says passed / failed (`tokensieve inspect` shows it)
        lines.append(_verify_line(rep.passed, rep.tokens_match, rep.keep_idx_match, rep.max_abs_diff_logits,
                                  rep.atol, args.steps, rep.batch, rep.inner_keep_idx_match))
    else:
        _log("[2/3] verification skipped (--no-verify)")
        record_verification(result, None)  # the manifest says "not run": inspect shows the folder as UNVERIFIED
        lines.append("  verify          UNVERIFIED: skipped (--no-verify)")
    engines = []
    if build and ok:
        _log(f"[3/3] building engines for {args.target} ({args.precision})")
        infos = build_vlm(result, target=args.target, precision=args.precision, max_batch=args.max_batch,
                          max_sequence=profiles.max_sequence, progress=lambda m: _log(f"      {m}"))
        lines += _engine_lines(infos, profiles)
        engines = [p for info in infos.values() for p in (info.engine_path, info.metadata_path)]
    elif build:
        _log("[3/3] engines not built: verification failed")
        lines.append("  engines         not built: verification failed")
    else:
        _log("[3/3] engine build skipped (--no-build)")
    return lines, ok, [*result.paths.values(), *engines]


def _engine_lines(infos: dict, profiles) -> list[str]:
    """`engine` (flavor, target, precision; per part: size, build seconds) and `profile` (batch, per-part dims)."""
    from tokensieve.vlm_api import ARTIFACTS

    m = next(iter(infos.values())).metadata
    built = ", ".join(f"{info.engine_path.stem} {info.size_bytes / 2**20:.1f} MiB in {info.build_seconds:.1f} s"
                      for info in infos.values())
    lo, _, hi = profiles.batch
    dims = "; ".join(f"{ARTIFACTS[k].removesuffix('.onnx')} " + ", ".join(f"{n} {a}..{c} (opt {b})"
                                                                          for n, (a, b, c) in d.items())
                     for k, d in profiles.dims.items() if d)
    return [f"  engine          {m.get('flavor')} {m.get('tensorrt_version')} {m.get('target')} {m.get('precision')}: "
            f"{built}", f"  profile         batch {lo}..{hi}; {dims}"]


def _grid(text: str | None) -> tuple[int, ...]:
    if not text:
        raise ConfigError("Qwen2-VL needs the static image grid: pass --grid t,h,w (patches, e.g. 1,28,28 for a "
                          "392 px image, 2,28,28 for a 4-frame video)")
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3:
        raise ConfigError(f"--grid {text!r} must be three integers t,h,w, e.g. 1,28,28 (an image) or 2,28,28 (a video)")
    if min(grid) < 1:
        raise ConfigError(f"--grid {text!r}: t, h and w must be >= 1 (t = 1 an image, t > 1 a video)")
    return grid


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
