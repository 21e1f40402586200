"""LLaVA in parts: dense vs outer (FasterVLM-style) vs inner (FastV) pruning, per part, timed in one alternating run.

    python -m tokensieve.scripts.bench_vlm [--prune cls-topk:0.25] [--inner fastv@2:0.25] [--text 32] [--batch 1] -o docs

The model is a random-init LLaVA built from a config (no hub, no weights to download): a CLIP-style vision tower
at 224 px with 16 px patches (196 patches + [CLS]), a Llama-style language model. Random weights change nothing about
latency. Each variant is exported with `export_vlm` and verified (greedy ids and kept tokens equal the eager model
on ONNX Runtime) before it is timed; a variant that does not verify stops the benchmark.

Per variant and part (vision_prune, lm_prefill on the whole prompt, one lm_decode step with the prompt's cache),
the parts are timed with only one ONNX Runtime session resident at a time, in alternating blocks (FACTS.md
"Benchmarking"). The MAC-ideal speedup of a part is counted on its graph traced with the measured shapes
(tokensieve.flops: matrix products and attention's two N×N products). "time to first token" = vision + prefill.
Writes vlm.json + vlm.md.
"""
from __future__ import annotations

import argparse
import inspect
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tokensieve.errors import ConfigError, TokenSieveError, VerificationError
from tokensieve.fileio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from tokensieve.flops import count_macs
from tokensieve.runtime import OrtRunner
from tokensieve.runtime.timing import measure_alternating

PARTS = ("vision", "prefill", "decode")


def bench_llava(vision_layers: int = 6, text_layers: int = 6, image_size: int = 224, seed: int = 0):
    """A random-init LLaVA of a size that times meaningfully on a CPU: vision 384 wide, LM 512 wide, vocab 8192."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=vision_layers,
                              num_attention_heads=6, image_size=image_size, patch_size=16, projection_dim=384)
    text = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=text_layers, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=8192, max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=8191, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def _feeds(result, batch: int, text: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of each part (the adapter's part_feeds): seeded pixels, a prompt with the image tokens in the middle of
    `text` text tokens, and the decode step after it."""
    from tokensieve.vlm_api import llava_prompt

    lay, adapter = result.layout, result.adapter
    ids = llava_prompt(lay, result.num_image_tokens, batch, before=text // 2, after=text - text // 2, seed=seed)
    return adapter.part_feeds(result, ids, adapter.sample_pixels(lay, batch, seed))


def check_verified(name: str, result, report) -> None:
    """One-line VerificationError unless variant `name`'s verify_vlm report passed: nothing unverified is timed."""
    if not report.passed:
        raise VerificationError(
            f"variant {name} ({result.prune}) does not match eager: tokens_match={report.tokens_match}, "
            f"keep_idx_match={report.keep_idx_match}, max |logits diff|={report.max_abs_diff_logits:.3g} "
            f"(atol {report.atol:g})")


def time_parts(results: dict, feeds: dict, *, threads: int | None, blocks: int, iters: int, parts=PARTS) -> dict:
    """Median/p90 of every variant's parts (`results[v].paths[part]` on `feeds[v][part]`), with one ONNX Runtime
    session resident at a time, in alternating blocks (FACTS.md "Benchmarking"); keys "variant/part"."""
    runners = {(v, p): OrtRunner(res.paths[p], name=f"{v}/{p}", threads=threads) for v, res in results.items()
               for p in parts}
    active = {"runner": None}

    def load(case: str) -> None:
        runner = runners[tuple(case.split("/"))]
        if active["runner"] is not runner:
            if active["runner"] is not None:
                active["runner"].deactivate()
            active["runner"] = runner.activate()

    cases = {f"{v}/{p}": (lambda r=runners[(v, p)], f=feeds[v][p]: r.infer(f)) for p in parts for v in results}
    try:
        return measure_alternating(cases, blocks=blocks, iters=iters, warmup=3, before_block=load,
                                   progress=lambda m: print(m, file=sys.stderr))
    finally:
        for r in runners.values():
            r.deactivate()


def part_macs(result, feeds: dict[str, dict[str, np.ndarray]]) -> dict[str, int]:
    """MACs per sample of each part (any family: the eager vision_prune and the adapter's prefill / decode modules),
    on its module traced with exactly these (static) shapes; the named inputs in forward's order, then the caches."""
    adapter = result.adapter
    modules = {"vision": result.vision, **adapter.part_modules(result)}
    out = {}
    for part, module in modules.items():
        f = feeds[part]
        params = inspect.signature(module.forward).parameters.values()
        names = [p.name for p in params if p.kind is not p.VAR_POSITIONAL and p.name in f]
        names += sorted((n for n in f if n.startswith("past.")),
                        key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        args = tuple(torch.from_numpy(f[n]) for n in names)
        with torch.no_grad():
            ep = torch.export.export(module.eval(), args, strict=False)
        batch = next(iter(f.values())).shape[0] if adapter.batched else 1
        out[part] = count_macs(ep.graph_module) // batch
    return out


def run_script(name: str, run, args) -> int:
    """`run(args)`, a TokenSieveError printed as one line `NAME: error: ...` and exit code 2."""
    try:
        return run(args)
    except TokenSieveError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


def write_results(out: Path, stem: str, meta: dict, rows: list[dict], markdown: str) -> int:
    """STEM.json ({"meta", "rows"}) and STEM.md into `out` atomically, the table printed; 0 (the exit code)."""
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": rows})
    write_bytes_atomic(out / f"{stem}.md", markdown.encode())
    print(markdown)
    return 0


def run_variants(model, variants: dict, make_feeds, *, grid=None, verify: dict, threads: int | None, blocks: int,
                 iters: int, label: str = "") -> tuple[dict, dict, dict, dict]:
    """Every variant {name: (outer prune, inner or None)} of `model` (any VLM family) exported into a temporary folder,
    verified against eager (nothing unverified is timed), its part inputs (`make_feeds(result)`) and MACs taken; then
    the parts timed in alternating blocks -> (results, feeds, macs, stats)."""
    from tokensieve.vlm_api import export_vlm, verify_vlm

    results, feeds, macs = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="tokensieve-vlm-") as tmp:
        for name, (prune, inner) in variants.items():
            print(f"[{name}] export {prune}{label}" + (f" --inner {inner}" if inner else ""), file=sys.stderr)
            res = export_vlm(model, Path(tmp) / name, prune, grid=grid, inner=inner)
            check_verified(name, res, verify_vlm(res, max_new_tokens=2, **verify))
            results[name], feeds[name] = res, make_feeds(res)
            macs[name] = part_macs(res, feeds[name])
        stats = time_parts(results, feeds, threads=threads, blocks=blocks, iters=iters)
    return results, feeds, macs, stats


def part_rows(results: dict, macs: dict, stats: dict) -> dict[str, dict]:
    """{variant: {part: median/p90 ms, MACs, speedup and MAC-ideal vs dense, their ratio}, "ttft_ms", "ttft_speedup"}
    (time to first token = vision + prefill medians)."""
    dense = {p: stats[f"dense/{p}"] for p in PARTS}
    out = {}
    for v in results:
        row = {}
        for p in PARTS:
            s = stats[f"{v}/{p}"]
            row[p] = {"median_ms": s.median_ms, "p90_ms": s.p90_ms, "macs": macs[v][p],
                      "speedup": dense[p].median_ms / s.median_ms, "mac_ideal": macs["dense"][p] / macs[v][p]}
            row[p]["ratio"] = row[p]["speedup"] / row[p]["mac_ideal"]
        ttft = row["vision"]["median_ms"] + row["prefill"]["median_ms"]
        row["ttft_ms"] = ttft
        row["ttft_speedup"] = (dense["vision"].median_ms + dense["prefill"].median_ms) / ttft
        out[v] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prune", default="cls-topk:0.25", help="outer pruning of the pruned variant (default cls-topk:0.25)")
    ap.add_argument("--inner", default="fastv@2:0.25", help="inner pruning of the FastV variant (outer: all patches)")
    ap.add_argument("--text", type=int, default=32, help="text tokens around the image tokens (default 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--text-layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224, help="pixels (16 px patches; default 224: 196 patches)")
    ap.add_argument("--variants", default="dense,outer,inner", help="which of dense,outer,inner to run (dense first)")
    ap.add_argument("-o", "--output", default="docs")
    return run_script("bench_vlm", _run, ap.parse_args(argv))


def _run(args) -> int:
    if args.text < 2 or args.batch < 1:
        raise ConfigError("--text must be >= 2 (the prompt must end with text) and --batch >= 1")
    out = ensure_writable_dir(args.output)
    every = {"dense": ("cls-topk:1.0", None), "outer": (args.prune, None), "inner": ("cls-topk:1.0", args.inner)}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not chosen or chosen[0] != "dense" or not set(chosen) <= set(every) or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--variants {args.variants!r} must start with dense and list each of dense,outer,inner "
                          "at most once, e.g. dense,outer")
    if args.image_size < 32 or args.image_size % 16:
        raise ConfigError(f"--image-size {args.image_size} must be a multiple of 16 (the patch size), at least 32")
    variants = {v: every[v] for v in chosen}
    model = bench_llava(args.vision_layers, args.text_layers, args.image_size)
    results, feeds, macs, stats = run_variants(
        model, variants, lambda res: _feeds(res, args.batch, args.text), verify={"batch": max(2, args.batch)},
        threads=args.threads, blocks=args.blocks, iters=args.iters)
    rows = _rows(results, feeds, macs, stats)
    meta = {"model": f"random-init LLaVA (vision 384x{args.vision_layers}, LM 512x{args.text_layers}, "
                     f"{args.image_size} px / 16 px patches)",
            "batch": args.batch, "text_tokens": args.text, "blocks": args.blocks, "iters": args.iters,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "backend": "onnxruntime CPU",
            "variants": {v: {"prune": results[v].prune, "inner": results[v].inner.shorthand() if results[v].inner else None}
                         for v in variants}}
    return write_results(out, "vlm", meta, rows, _markdown(meta, rows))


def _rows(results, feeds, macs, stats) -> list[dict]:
    rows, timed = [], part_rows(results, macs, stats)
    for v, res in results.items():
        pre = feeds[v]["prefill"]["inputs_embeds"].shape[1]
        past = feeds[v]["decode"]["past.0.key"].shape[2]
        last = feeds[v]["decode"][f"past.{res.layout.num_text_layers - 1}.key"].shape[2]
        rows.append({"variant": v, "prune": res.prune, "inner": res.inner.shorthand() if res.inner else None,
                     "image_tokens": res.num_image_tokens, "prompt_tokens": pre,
                     "image_tokens_after_inner": res.inner.keep if res.inner else res.num_image_tokens,
                     "decode_cache": [past, last]} | timed[v])
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# LLaVA in parts: dense vs outer vs inner pruning", "",
             f"Generated by `python -m tokensieve.scripts.bench_vlm` ({meta['machine']}; {meta['backend']}). "
             f"Model: {meta['model']}; batch {meta['batch']}, {meta['text_tokens']} text tokens around the image "
             "tokens. Each variant is verified against eager before timing; parts are timed one session at a time in "
             f"alternating blocks ({meta['blocks']} x {meta['iters']} runs). MAC-ideal: dense MACs / variant MACs on "
             "the traced part; ratio = measured speedup / MAC-ideal.", "",
             "| variant | recipe | image tokens (LLM) | prompt | part | median ms | p90 ms | speedup | MAC-ideal | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recipe = r["prune"] + (f" + {r['inner']}" if r["inner"] else "")
        tokens = f"{r['image_tokens']}" + (f"→{r['image_tokens_after_inner']}" if r["inner"] else "")
        for p in PARTS:
            c = r[p]
            label = {"decode": f"decode (cache {r['decode_cache'][0]}"
                               + (f"/{r['decode_cache'][1]})" if r['decode_cache'][1] != r['decode_cache'][0] else ")")
                     }.get(p, p)
            lines.append(f"| {r['variant']} | {recipe} | {tokens} | {r['prompt_tokens']} | {label} | {c['median_ms']:.2f} "
                         f"| {c['p90_ms']:.2f} | {c['speedup']:.2f}x | {c['mac_ideal']:.2f}x | {c['ratio']:.2f} |")
    lines += ["", "| variant | time to first token (vision + prefill) | speedup |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ttft_ms']:.2f} ms | {r['ttft_speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
