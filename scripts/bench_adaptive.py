"""Adaptive token count: dense vs the capped form vs compact=true, one alternating run per batch size.

    python -m tokensieve.scripts.bench_adaptive [--model default] [--recipe 'adaptive@4:0.9'] [--batch 1,8] -o docs

The capped form computes all K slots whatever the count; compact=true cuts the sequence to the largest valid count
in the batch, so its latency should follow the count. Besides the MAC-ideal at the cap, the table gives the
MAC-ideal at the measured count (a fixed-budget `cls-topk` export with that many tokens, for its MACs only), which
is what compact=true can reach. The count is the eager reference's on the very inputs the benchmark feeds.
Writes adaptive.json + adaptive.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from tokensieve import api
from tokensieve.benchmark import parse_batches
from tokensieve.measure import time_models
from tokensieve.errors import ConfigError
from tokensieve.fileio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from tokensieve.models import load_model
from tokensieve.recipe import parse_recipe
from tokensieve.runtime import OrtRunner


def compact_recipe(recipe: str) -> str:
    """'adaptive(threshold=1.2)@4:0.9' -> the same with compact=true on its (single) adaptive stage."""
    stages = parse_recipe(recipe).stages
    if len(stages) != 1 or stages[0].method != "adaptive" or stages[0].options().get("compact"):
        raise ConfigError(f"--recipe {recipe!r} must be one capped adaptive stage, e.g. 'adaptive@4:0.9'")
    head, _, tail = recipe.partition("@")
    inner = head[len("adaptive("):-1] if head.endswith(")") else ""
    return f"adaptive({inner + ',' if inner else ''}compact=true)@{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--recipe", default="adaptive@4:0.9")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", default="docs")
    args = ap.parse_args(argv)
    batches = parse_batches(args.batch)
    out = ensure_writable_dir(args.output)
    model, shape = load_model(args.model)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    capped = api.export(model, example, args.recipe)
    compact = api.export(model, example, compact_recipe(args.recipe))
    stage = capped.stages[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokensieve-adaptive-") as tmp:
        paths = {"dense": api.save(capped, Path(tmp) / "capped", parts=("model", "dense"))["dense"],
                 "capped": Path(tmp) / "capped" / "model.onnx",
                 "compact": api.save(compact, Path(tmp) / "compact", parts=("model",))["model"]}
        for label in ("capped", "compact"):
            report = api.verify(capped if label == "capped" else compact, num_inputs=4, batch=max(batches))
            if not report.passed:
                raise SystemExit(f"{label} export does not match eager (max |Δ| {report.max_abs_diff:.2e})")
        for batch in batches:
            feeds = OrtRunner(paths["dense"]).make_random_feeds(batch=batch, seed=0)  # what time_models feeds
            _, kept = capped.reference(torch.from_numpy(feeds["pixel_values"]))
            counts = (kept[0] >= 0).sum(-1)
            largest = int(counts.max())  # compact=true runs the whole batch at the largest count
            ideal_at_count = _ideal_at(model, example, stage.stage.after_block, largest, capped)
            stats = time_models(OrtRunner, paths, batch=batch, blocks=args.blocks, iters=args.iters, warmup=5,
                                options={"threads": args.threads} if args.threads else None)
            d, c, k = stats["dense"]["median_ms"], stats["capped"]["median_ms"], stats["compact"]["median_ms"]
            rows.append({
                "batch": batch, "cap": stage.keep, "counts": counts.tolist(), "largest_count": largest,
                "dense_ms": d, "capped_ms": c, "compact_ms": k,
                "capped_p90_ms": stats["capped"]["p90_ms"], "compact_p90_ms": stats["compact"]["p90_ms"],
                "speedup_capped": d / c, "speedup_compact": d / k, "compact_vs_capped": c / k,
                "ideal_at_cap": capped.ideal_speedup, "ideal_at_count": ideal_at_count,
                "ratio_compact": (d / k) / ideal_at_count,
            })
            r = rows[-1]
            print(f"batch {batch}: dense {d:.2f} ms, capped {c:.2f} ms ({r['speedup_capped']:.2f}x), compact {k:.2f} ms "
                  f"({r['speedup_compact']:.2f}x; ideal at count {largest}: {ideal_at_count:.2f}x)", file=sys.stderr)
    meta = {"model": args.model, "recipe": args.recipe, "compact_recipe": compact_recipe(args.recipe),
            "tokens_capped": capped.tokens, "backend": stats["dense"]["device"], "threads": args.threads,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(out / "adaptive.json", {"meta": meta, "rows": rows})
    text = render(meta, rows)
    write_bytes_atomic(out / "adaptive.md", text.encode())
    print(text)
    return 0


def _ideal_at(model, example, after_block: int, count: int, capped: api.ExportResult) -> float:
    """MAC-ideal speedup of a sequence cut to `count` patch tokens after `after_block` (cls-topk has those shapes)."""
    fixed = api.export(model, example, f"cls-topk@{after_block}:{count}")
    return capped.macs_dense / fixed.macs_pruned


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Adaptive token count: capped vs compact=true",
        "",
        f"Generated by `python -m tokensieve.scripts.bench_adaptive` on {meta['date']} ({meta['machine']}; {meta['backend']}).",
        f"Model `{meta['model']}`, `{meta['recipe']}` (capped: tokens {'→'.join(map(str, meta['tokens_capped']))}) vs "
        f"`{meta['compact_recipe']}`. Dense, capped and compact are timed in one run, alternating blocks, on the same",
        "inputs; the count is the eager reference's on those inputs. compact=true runs the batch at its largest count;",
        "\"MAC-ideal @ count\" is the MAC-ideal speedup at that count, the bound compact=true can reach.",
        "",
        "| batch | cap | kept count (largest) | dense ms | capped ms | compact ms | capped speedup | compact speedup | compact vs capped | MAC-ideal @ cap | MAC-ideal @ count | compact ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['cap']} | {r['largest_count']} | {r['dense_ms']:.2f} | {r['capped_ms']:.2f} | "
            f"{r['compact_ms']:.2f} | {r['speedup_capped']:.2f}x | {r['speedup_compact']:.2f}x | "
            f"{r['compact_vs_capped']:.2f}x | {r['ideal_at_cap']:.2f}x | {r['ideal_at_count']:.2f}x | {r['ratio_compact']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
