"""Qwen2-VL video in parts: dense vs video-token pruning (evs, holitom, attn-mean, + inner), per part, timed alternately.

    python -m tokensieve.scripts.bench_video [--grid 8,16,16] [--keep 0.25] [--variants dense,evs,holitom,attn-mean,holitom+merge] -o docs

The model is a random-init Qwen2-VL built from a config (no hub, no weights to download): a vision tower 384 wide
(patch 14, spatial merge 2, temporal patch 2), a language model 512 wide, vocab 8192. Random weights change nothing
about latency. The video is one static grid (t, h, w) in patches: t temporal patches (2 frames each) of h x w patches,
t·h·w / 4 merged video tokens, which the outer stage prunes to K before the LLM. Variants: `dense` keeps every token
(uniform:1.0, so its vision_prune costs what HF's tower does) and each other variant is a method name run at --keep
(graph_passes/methods/video.py: evs, holitom; or an image method such as attn-mean, scored per temporal step);
`METHOD+fastv` / `METHOD+merge` add inner pruning in the LLM prefill, fastv@L:R / HoliTom's inner merge
fastv(merge=true)@L:R (--inner-layer, --inner-keep), so holitom+merge is HoliTom whole. Each is exported with
`export_vlm` and verified (greedy ids, kept tokens and logits equal the eager model on ONNX Runtime) before it is
timed; a variant that does not verify stops the benchmark.

Per variant and part (vision_prune, whose time includes the selection: its time vs dense's is the selection's
overhead; lm_prefill on the pruned prompt, --text text tokens around the video; one lm_decode step with that prompt's
cache), the parts are timed with only one ONNX Runtime session resident at a time, in alternating blocks (FACTS.md
"Benchmarking"). The MAC-ideal speedup of a part is counted on its module traced with the measured shapes
(tokensieve.flops: matrix products and attention's two N×N products, plus the patch embedding's Conv3d).
"time to first token" = vision + prefill medians. Writes video.json + video.md.
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from tokensieve.errors import ConfigError
from tokensieve.fileio import ensure_writable_dir
from tokensieve.scripts.bench_vlm import PARTS, part_rows, run_script, run_variants, write_results

DENSE = "uniform:1.0"  # keeps every video token in order: the unpruned model
DEFAULT_VARIANTS = "dense,evs,holitom,attn-mean,holitom+merge"
# a variant METHOD+fastv / METHOD+merge adds inner pruning in the LLM prefill: fastv@L:R / fastv(merge=true)@L:R
# (HoliTom's inner merge), L = --inner-layer, R = --inner-keep of the K tokens the outer METHOD keeps
INNER = {"fastv": "fastv", "merge": "fastv(merge=true)"}
# special ids at the top of the vocabulary; the prompt's text ids are drawn below them
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 8188, 8189, 8190, 8191


def bench_qwen2_vl(vision_layers: int = 4, text_layers: int = 6, seed: int = 0):
    """A random-init Qwen2-VL of a size that times meaningfully on a CPU: vision 384 wide (patch 14, merge 2, temporal
    patch 2), LM 512 wide (8 heads, 2 KV heads as Qwen2-VL's GQA), vocab 8192."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=vision_layers, embed_dim=384, hidden_size=512, num_heads=6, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=4),
        # head_dim 64: M-RoPE sections (t, h, w) of its 32 rotary pairs, Qwen2-VL's [16, 24, 24] halved
        text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=text_layers,
                         num_attention_heads=8, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(cfg).eval()


def _prompt(model, layout, text: int, seed: int = 0) -> torch.Tensor:
    """(1, T) ids: text // 2 random text ids, <vision_start> + video tokens + <vision_end>, the rest of the text."""
    from tokensieve.vlm_qwen2 import vision_prompt

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN, (text,), generator=gen).tolist()  # never a special or bos/eos/pad id
    return vision_prompt(model.config, layout, ids[:text // 2], ids[text // 2:])


def _feeds(result, text: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of each part (the adapter's part_feeds): the video's seeded pixel rows, the prompt (its M-RoPE positions
    from the unpruned one, the kept columns gathered) with vision_prune's features, and the decode step after it."""
    adapter = result.adapter
    return adapter.part_feeds(result, _prompt(result.model, result.layout, text, seed),
                              adapter.sample_pixels(result.layout, 1, seed))


def _parse_grid(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or grid[0] < 2:
        raise ConfigError(f"--grid {text!r} must be T,H,W in patches with T >= 2 temporal patches (a video), "
                          "e.g. 8,16,16")
    return grid  # h, w are checked against the vision config by plan_vlm


def _variant(name: str, args) -> tuple[str, str | None]:
    """A variant name -> (outer recipe, inner recipe or None): dense, METHOD, METHOD+fastv or METHOD+merge."""
    if name == "dense":
        return DENSE, None
    method, plus, inner = name.partition("+")
    if plus and inner not in INNER:
        raise ConfigError(f"variant {name!r}: the part after '+' must be one of {', '.join(INNER)} (inner pruning in "
                          "the LLM), e.g. holitom+merge")
    return f"{method}:{args.keep}", (f"{INNER[inner]}@{args.inner_layer}:{args.inner_keep}" if plus else None)


def _parse_variants(text: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    if not chosen or chosen[0] != "dense" or "dense" in chosen[1:] or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--variants {text!r} must start with dense and list each variant at most once, e.g. "
                          f"{DEFAULT_VARIANTS}")
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="8,16,16",
                    help="video grid T,H,W in patches (default 8,16,16: 2048 patches, 512 video tokens)")
    ap.add_argument("--keep", default="0.25", help="budget of every pruned variant: a ratio or a count (default 0.25)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"dense, then method names run at --keep (default {DEFAULT_VARIANTS})")
    ap.add_argument("--inner-layer", type=int, default=1, help="LLM layer L of the +fastv / +merge variants (default 1)")
    ap.add_argument("--inner-keep", default="0.5", help="R of the +fastv / +merge variants, of the K outer-kept "
                    "tokens (default 0.5)")
    ap.add_argument("--text", type=int, default=32, help="text tokens around the video tokens (default 32)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=6)
    ap.add_argument("-o", "--output", default="docs")
    return run_script("bench_video", _run, ap.parse_args(argv))


def _run(args) -> int:
    from tokensieve.vlm_api import plan_vlm

    if args.text < 2:
        raise ConfigError(f"--text {args.text} must be >= 2 (text before the video, and the prompt must end with text)")
    if args.vision_layers < 1 or args.text_layers < 1:
        raise ConfigError("--vision-layers and --text-layers must be >= 1")
    if args.blocks < 1 or args.iters < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--blocks and --iters must be >= 1 (and --threads, when given)")
    grid = _parse_grid(args.grid)
    chosen = _parse_variants(args.variants)
    variants = {v: _variant(v, args) for v in chosen}
    out = ensure_writable_dir(args.output)
    model = bench_qwen2_vl(args.vision_layers, args.text_layers)
    for name, (prune, inner) in variants.items():  # every recipe checked (one line) before the first export
        try:
            plan_vlm(model, prune, grid=grid, inner=inner)
        except ConfigError as e:
            raise ConfigError(f"variant {name} ({prune}{' + ' + inner if inner else ''}, --grid {args.grid}): {e}") from e
    results, feeds, macs, stats = run_variants(
        model, variants, lambda res: _feeds(res, args.text), grid=grid, verify={"threads": args.threads},
        threads=args.threads, blocks=args.blocks, iters=args.iters, label=f" --grid {args.grid}")
    rows = _rows(results, feeds, macs, stats)
    lay = results["dense"].layout
    meta = {"model": f"random-init Qwen2-VL (vision 384x{args.vision_layers}, patch 14, merge 2, temporal patch 2; "
                     f"LM 512x{args.text_layers}, vocab 8192)",
            "grid": list(grid), "patches": lay.num_patches, "video_tokens": lay.num_merged,
            "frames_per_temporal_patch": int(results["dense"].model.config.vision_config.temporal_patch_size),
            "text_tokens": args.text, "keep": args.keep, "blocks": args.blocks, "iters": args.iters,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "backend": "onnxruntime CPU",
            "variants": {v: {"prune": results[v].prune, "method": results[v].method, "options": results[v].options,
                             "inner": results[v].inner.shorthand() if results[v].inner else None}
                         for v in variants}}
    return write_results(out, "video", meta, rows, _markdown(meta, rows))


def _rows(results, feeds, macs, stats) -> list[dict]:
    rows, timed = [], part_rows(results, macs, stats)
    layers = results["dense"].model.config.text_config.num_hidden_layers
    dense_vision = timed["dense"]["vision"]["median_ms"]
    for v, res in results.items():
        row = {"variant": v, "prune": res.prune, "inner": res.inner.shorthand() if res.inner else None,
               "video_tokens": res.num_tokens, "kept_tokens": res.keep,
               "kept_after_inner": res.inner.keep if res.inner else res.keep,
               "prompt_tokens": int(feeds[v]["prefill"]["input_ids"].shape[1]),
               "decode_cache": [int(feeds[v]["decode"][f"past.{i}.key"].shape[2]) for i in (0, layers - 1)]}
        row |= {p: timed[v][p] for p in PARTS}
        # the vision part runs the same tower in every variant: what differs is the selection after the merger
        row["selection_overhead_ms"] = row["vision"]["median_ms"] - dense_vision
        row["ttft_ms"], row["ttft_speedup"] = timed[v]["ttft_ms"], timed[v]["ttft_speedup"]
        rows.append(row)
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    t, h, w = meta["grid"]
    lines = ["# Qwen2-VL video in parts: dense vs video-token pruning", "",
             f"Generated by `python -m tokensieve.scripts.bench_video` ({meta['machine']}; {meta['backend']}). "
             f"Model: {meta['model']}. Video: grid ({t}, {h}, {w}) = {t} temporal patches of "
             f"{meta['frames_per_temporal_patch']} frames x {h}x{w} patches ({meta['patches']} patches, "
             f"{meta['video_tokens']} video tokens), {meta['text_tokens']} text tokens around them. Each variant is "
             "verified against eager before timing; parts are timed one session at a time in alternating blocks "
             f"({meta['blocks']} x {meta['iters']} runs). vision = the tower + the selection (its time vs dense's is "
             "the selection's overhead). MAC-ideal: dense MACs / variant MACs on the traced part; ratio = measured "
             "speedup / MAC-ideal.", "",
             "| variant | recipe | video tokens (LLM) | prompt | part | median ms | p90 ms | speedup | MAC-ideal | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in PARTS:
            c = r[p]
            first, last = r["decode_cache"]
            label = (f"decode (cache {first}" + (f"/{last})" if last != first else ")")) if p == "decode" else p
            recipe = r["prune"] + (f" + {r['inner']}" if r["inner"] else "")
            tokens = f"{r['kept_tokens']}" + (f"→{r['kept_after_inner']}" if r["inner"] else "")
            lines.append(f"| {r['variant']} | {recipe} | {tokens} | {r['prompt_tokens']} | {label} "
                         f"| {c['median_ms']:.2f} | {c['p90_ms']:.2f} | {c['speedup']:.2f}x | {c['mac_ideal']:.2f}x "
                         f"| {c['ratio']:.2f} |")
    lines += ["", "| variant | selection overhead (vision vs dense) | time to first token (vision + prefill medians) "
              "| speedup |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['selection_overhead_ms']:+.2f} ms | {r['ttft_ms']:.2f} ms | "
              f"{r['ttft_speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
