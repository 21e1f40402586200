"""The deployment forms of one recipe on the default ViT-S, timed in one run: fp32, ORT-optimized (`--optimize`) and
int8 (`--precision int8`), each dense vs pruned, plus the stages' placement (in the block vs on the block output).
Writes docs/deploy.json and docs/deploy.md.

    python -m tokensieve.scripts.bench_deploy                    # cls-topk@3,6,9:0.7, ~5 min on 2 cores
    python -m tokensieve.scripts.bench_deploy --blocks 2 --iters 5 -o /tmp/deploy     # a quick try

Two exports (`tokensieve export --optimize --precision int8` of the recipe, and the recipe with every stage
`at=block_out`), then ONE alternating-block run on ONNX Runtime (CPU, batch 1) over the eight graphs: dense.onnx,
model.onnx, dense.opt.onnx, model.opt.onnx, dense.int8.onnx, model.int8.onnx and the block-output model.onnx (+ its
optimized form). Every pair's speedup is reported next to the MAC-ideal speedup of its recipe (traced MACs) and the
ratio between the two; int8's kept-token overlap and output cosine against fp32 come from the export (random
calibration: the default ViT-S has random weights, so images would mean no more). Only measured numbers are written.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tokensieve import api
from tokensieve.fileio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from tokensieve.measure import time_models
from tokensieve.recipe import parse_recipe
from tokensieve.runtime.onnxruntime_runner import OrtRunner

RECIPE = "cls-topk@3,6,9:0.7"


def block_out(recipe: str) -> str:
    """The recipe with every stage on its block's output (`at=block_out`), in shorthand."""
    return "+".join(replace(s, params=(*(p for p in s.params if p[0] != "at"), ("at", "block_out"))).shorthand()
                    for s in parse_recipe(recipe).stages)


def run(model: str = "default", recipe: str = RECIPE, *, blocks: int = 6, iters: int = 40, warmup: int = 10,
        threads: int | None = None, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="tokensieve-deploy-") as tmp:
        paper, out = Path(tmp) / "paper", Path(tmp) / "block_out"
        t0 = time.perf_counter()
        log(f"export {recipe} --optimize --precision int8")
        rp = api.export_folder(model, recipe, paper, build=False, bench=False, optimize=True, precision="int8",
                               threads=threads)
        other = block_out(recipe)
        log(f"export {other} --optimize")
        ro = api.export_folder(model, other, out, build=False, bench=False, optimize=True, threads=threads)
        export_s = time.perf_counter() - t0
        paths = {"dense": paper / "dense.onnx", "pruned": paper / "model.onnx",
                 "dense.opt": paper / "dense.opt.onnx", "pruned.opt": paper / "model.opt.onnx",
                 "dense.int8": paper / "dense.int8.onnx", "pruned.int8": paper / "model.int8.onnx",
                 "block_out": out / "model.onnx", "block_out.opt": out / "model.opt.onnx"}
        log(f"timing {len(paths)} graphs: {blocks} alternating blocks x {iters} runs")
        opts = {"threads": threads} if threads else {}
        stats = time_models(OrtRunner, paths, batch=1, blocks=blocks, iters=iters, warmup=warmup, options=opts,
                            progress=lambda m: log(f"  {m}"))
    ms = {k: v["median_ms"] for k, v in stats.items()}
    ideal, ideal_out = rp["ideal_speedup"], ro["ideal_speedup"]

    def pair(form: str, dense: str, pruned: str, ideal_speedup: float) -> dict:
        speedup = ms[dense] / ms[pruned]
        return {"form": form, "dense": dense, "pruned": pruned, "dense_ms": ms[dense], "pruned_ms": ms[pruned],
                "dense_p90_ms": stats[dense]["p90_ms"], "pruned_p90_ms": stats[pruned]["p90_ms"],
                "speedup": speedup, "ideal_speedup": ideal_speedup, "ratio_to_ideal": speedup / ideal_speedup}

    pairs = [pair("fp32", "dense", "pruned", ideal), pair("optimized", "dense.opt", "pruned.opt", ideal),
             pair("int8", "dense.int8", "pruned.int8", ideal),
             pair("fp32, stages at block_out", "dense", "block_out", ideal_out),
             pair("optimized, stages at block_out", "dense.opt", "block_out.opt", ideal_out)]
    return {
        "model": model, "recipe": recipe, "recipe_block_out": other, "tokens": [rp["layout"]["num_tokens"], *(st["tokens_out"] for st in rp["stages"])],
        "macs": {"dense": rp["macs_dense"], "pruned": rp["macs_pruned"], "pruned_block_out": ro["macs_pruned"]},
        "verify": {"fp32": rp["verify"]["passed"], "optimized": rp["optimize"]["verify"]["passed"],
                   "block_out": ro["verify"]["passed"], "block_out_optimized": ro["optimize"]["verify"]["passed"]},
        "fused": rp["optimize"]["fused"], "int8": {k: rp["int8"][k] for k in ("kept_overlap", "cosine", "calibration")},
        "latency": stats, "pairs": pairs,
        "in_block_vs_block_out": {"fp32": ms["block_out"] / ms["pruned"], "optimized": ms["block_out.opt"] / ms["pruned.opt"]},
        "settings": {"backend": "onnxruntime:CPUExecutionProvider", "batch": 1, "blocks": blocks, "iters": iters,
                     "warmup": warmup, "threads": threads},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "export_seconds": export_s,
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(r: dict) -> str:
    m, q = r["macs"], r["int8"]
    lines = [
        "# Deployment forms: fp32, ORT-optimized, int8 — and where the stages sit",
        "",
        f"Generated by `python -m tokensieve.scripts.bench_deploy` on {r['date']} ({r['machine']}); do not edit by "
        "hand. Model",
        f"`{r['model']}`{' (ViT-S/16-224, random weights)' if r['model'] == 'default' else ''}, recipe `{r['recipe']}` (tokens {'→'.join(map(str, r['tokens']))}). "
        f"All {len(r['latency'])} graphs timed in one",
        f"run: {r['settings']['backend']}, batch 1, median of {r['settings']['blocks']} alternating blocks x "
        f"{r['settings']['iters']} runs. MACs: dense {m['dense'] / 1e9:.3f} G, pruned {m['pruned'] / 1e9:.3f} G "
        f"(stages in the block), {m['pruned_block_out'] / 1e9:.3f} G (`at=block_out`).",
        "",
        "| form | dense ms (p90) | pruned ms (p90) | speedup | MAC-ideal | ratio to ideal |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["pairs"]:
        lines.append(f"| {p['form']} | {p['dense_ms']:.2f} ({p['dense_p90_ms']:.2f}) | {p['pruned_ms']:.2f} "
                     f"({p['pruned_p90_ms']:.2f}) | {p['speedup']:.2f}x | {p['ideal_speedup']:.2f}x | "
                     f"{p['ratio_to_ideal']:.2f} |")
    fused = r["fused"]
    ops = ", ".join(f"{op} {fused['dense'].get(op, 0)}/{fused['model'].get(op, 0)}"
                    for op in sorted(set(fused["dense"]) | set(fused["model"])))
    v = r["verify"]
    lines += [
        "",
        f"- Verified against eager (kept indices identical, outputs within 1e-4): fp32 {_yes(v['fp32'])}, optimized "
        f"{_yes(v['optimized'])}, block_out {_yes(v['block_out'])}, block_out optimized {_yes(v['block_out_optimized'])}.",
        f"- ORT transformer optimizer fusions (dense/pruned): {ops}.",
        f"- int8 (ORT static Q/DQ, symmetric, MatMuls only, score math float; {q['calibration']} calibration) vs fp32: "
        f"kept-token overlap {', '.join(f'{x:.1%}' for x in q['kept_overlap'])} per stage, output cosine min "
        f"{q['cosine']['min']:.4f}, mean {q['cosine']['mean']:.4f}.",
        f"- Stages in the block vs on the block output: block_out / in-block latency {r['in_block_vs_block_out']['fp32']:.3f} "
        f"(fp32), {r['in_block_vs_block_out']['optimized']:.3f} (optimized); > 1 means in-block is faster.",
    ]
    return "\n".join(lines) + "\n"


def _yes(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prune", default=RECIPE)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = ap.parse_args(argv)
    out = ensure_writable_dir(args.output)
    r = run(args.model, args.prune, blocks=args.blocks, iters=args.iters, threads=args.threads,
            log=lambda m: print(m, file=sys.stderr))
    write_json_atomic(out / "deploy.json", r)
    write_bytes_atomic(out / "deploy.md", markdown(r).encode())
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
