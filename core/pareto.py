"""Accuracy next to latency: sweep pruning recipes on the user's images, keep the Pareto front, and pick the
fastest recipe whose accuracy drop vs dense stays within a budget (`tokensieve tune --images DIR --max-drop PCT`).

    from tokensieve import pareto
    report = pareto.sweep_front(model, example, "val/", processor="model_dir/", model_name="model_dir/",
                                max_drops=(0.5, 2.0))

The grid is methods x keep ratios x stage blocks (`method@B1,B2:keep`: one stage after each listed block, each keeping
that ratio of its incoming patch tokens), bounded by a time budget: once it has run out no further candidate is
started (one is always swept), and what was swept is reported. Per candidate:
- accuracy on the images, screened on the eager reference of the exported recipe (ExportResult.reference: the
  hook stages the export records, checked against ONNX by `tokensieve export`'s verification): top-1 when the
  folder has class folders (DIR/<class>/*), else top-1 agreement with the dense model; Wilson 95 % intervals;
- latency of its ONNX on the chosen backend: every candidate and dense timed in ONE alternating-block run
  (core/measure.time_models: one session or engine resident at a time, FACTS.md "Benchmarking"), so the ratios to
  dense are from one run.
The front keeps each point no other point beats on both axes (dense is a point too). For each budget the choice is
the fastest candidate whose drop vs dense is <= the budget (percentage points) and whose median beats dense's;
its accuracy is then re-measured from its exported ONNX on ONNX Runtime (tokensieve.evaluate, model.onnx vs
dense.onnx): if the ONNX drop exceeds the budget, the next fastest is tried; if none holds, dense is chosen.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensieve.errors import ConfigError, TokenSieveError, first_line

__all__ = ["SCHEMA", "DEFAULT_METHODS", "DEFAULT_KEEPS", "DEFAULT_TIME_BUDGET", "SweepPoint", "pareto_front",
           "within_budget", "default_after_blocks", "parse_methods", "parse_keeps", "parse_after_blocks",
           "check_max_drop", "sweep_front", "format_markdown", "plot_front", "summary_lines", "run_images"]

SCHEMA = "tokensieve.pareto/1"
DEFAULT_METHODS = ("cls-topk", "attn-mean", "tome", "divprune")
DEFAULT_KEEPS = (0.5, 0.7, 0.9)
DEFAULT_TIME_BUDGET = 600.0
MAX_CANDIDATES = 512       # methods x keeps x stage blocks; the time budget bounds the run, this the grid
SCREEN_BATCH = 32          # images per eager / preprocessing batch


# --------------------------------------------------------------------------- the front and the choice (pure)


@dataclass(frozen=True)
class SweepPoint:
    """One measured recipe (or dense): median latency in ms and accuracy as a fraction (top-1 or agreement)."""

    name: str
    latency_ms: float
    accuracy: float


def pareto_front(points: Sequence[SweepPoint]) -> set[str]:
    """Names of the points no other point dominates (no slower, no less accurate, and strictly better in one).

    Identical points do not dominate each other: both stay on the front."""
    front = set()
    for p in points:
        if not any(q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy
                   and (q.latency_ms < p.latency_ms or q.accuracy > p.accuracy) for q in points):
            front.add(p.name)
    return front


def within_budget(points: Sequence[SweepPoint], dense: SweepPoint, max_drop: float) -> list[SweepPoint]:
    """The points faster than dense (median) whose drop vs dense is at most `max_drop` percentage points, fastest
    first (equal latency: the more accurate first). Empty: nothing beats dense within the budget, keep dense."""
    check_max_drop(max_drop)
    tol = 1e-9  # 0.5 pp of 200 images is exactly one image: float rounding must not refuse it
    ok = [p for p in points if p.name != dense.name and p.latency_ms < dense.latency_ms
          and 100 * (dense.accuracy - p.accuracy) <= max_drop + tol]
    return sorted(ok, key=lambda p: (p.latency_ms, -p.accuracy, p.name))


def check_max_drop(max_drop: float) -> float:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 100:
        raise ConfigError(f"--max-drop {max_drop!r} must be a number of percentage points in 0..100, e.g. 0.5")
    return float(max_drop)


# --------------------------------------------------------------------------- the grid


def default_after_blocks(num_blocks: int) -> tuple[tuple[int, ...], ...]:
    """One stage a quarter of the way in, and three stages at 1/4, 1/2, 3/4 (ViT-S: @3 and @3,6,9); never after
    the last block (no block would run on fewer tokens)."""
    last = max(0, num_blocks - 2)
    one = (min(num_blocks // 4, last),)
    three = tuple(sorted({min(b, last) for b in (num_blocks // 4, num_blocks // 2, 3 * num_blocks // 4)}))
    return (one,) if three == one else (one, three)


def _items(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{flag} {str(text)[:40]!r} must be a comma-separated list without empty entries")
    if len(set(items)) != len(items):
        raise ConfigError(f"{flag} {str(text)[:40]!r} names an entry twice; list each once")
    return items


def parse_methods(text: str) -> tuple[str, ...]:
    """`cls-topk,tome` -> ("cls-topk", "tome"); unknown names are a one-line error."""
    from tokensieve.graph_passes.methods.registry import METHODS

    names = _items(text, "--methods")
    for n in names:
        if n not in METHODS:
            raise ConfigError(f"--methods: unknown method {n[:40]!r}; `tokensieve methods` lists them")
    return tuple(names)


def parse_keeps(text: str) -> tuple[float, ...]:
    """`0.5,0.7` -> (0.5, 0.7): keep ratios, each a finite number in (0, 1)."""
    out = []
    for t in _items(text, "--keeps"):
        try:
            k = float(t)
        except ValueError:
            raise ConfigError(f"--keeps: {t[:30]!r} is not a number; use ratios like 0.5,0.7,0.9") from None
        if not (math.isfinite(k) and 0 < k < 1):
            raise ConfigError(f"--keeps: {t[:30]} must be a keep ratio > 0 and < 1, e.g. 0.5,0.7,0.9")
        out.append(k)
    return tuple(out)


def parse_after_blocks(values: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """["3", "3,6,9"] -> ((3,), (3, 6, 9)): each item is the blocks one candidate's stages follow (0-based)."""
    out = []
    for v in values:
        blocks = []
        for t in _items(v, "--after-blocks"):
            if not t.isdigit() or len(t) > 6:
                raise ConfigError(f"--after-blocks: {t[:30]!r} is not a block index; use 0-based integers, e.g. 3 3,6,9")
            blocks.append(int(t))
        if blocks != sorted(blocks):
            raise ConfigError(f"--after-blocks {v[:40]!r}: list the blocks in increasing order, e.g. 3,6,9")
        out.append(tuple(blocks))
    if len(set(out)) != len(out):
        raise ConfigError("--after-blocks names the same stage blocks twice; list each once")
    return tuple(out)


def _shorthand(method: str, blocks: tuple[int, ...], keep: float) -> str:
    return f"{method}@{','.join(map(str, blocks))}:{keep:g}"


# --------------------------------------------------------------------------- the sweep


def _eager_logits(plan, pixels: np.ndarray) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), SCREEN_BATCH):
            out.append(plan.reference(torch.from_numpy(pixels[i:i + SCREEN_BATCH]))[0].float().numpy())
    return np.concatenate(out).reshape(len(pixels), -1)


def _load_pixels(images, processor, want: tuple[int, ...], id2label, say):
    from tokensieve.evaluate import _preprocess, find_processor_dir, load_processor, scan_images

    imgs = scan_images(images, id2label)
    proc_dir = find_processor_dir(Path(processor), {}, processor)
    proc = load_processor(proc_dir)
    pixels = np.concatenate([_preprocess(proc, imgs.paths[i:i + SCREEN_BATCH], want)
                             for i in range(0, len(imgs.paths), SCREEN_BATCH)])
    say(f"{len(imgs.paths)} images from {images}: " + (f"{len(imgs.class_names)} class folders (top-1)"
                                                        if imgs.labels is not None else "no labels (agreement with dense)"))
    return imgs, proc_dir, pixels


def sweep_front(model, example, images: str | Path, *, processor: str | Path, model_name: str = "model",
                methods: Sequence[str] = DEFAULT_METHODS, keeps: Sequence[float] = DEFAULT_KEEPS,
                after_blocks: Sequence[Sequence[int]] | None = None, max_drops: Sequence[float] = (0.5,),
                time_budget: float | None = DEFAULT_TIME_BUDGET, runner_factory: Callable | None = None,
                batch: int = 1, blocks: int = 4, iters: int = 20, warmup: int = 5, eval_batch: int = 32,
                threads: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Sweep methods x keeps x after_blocks on `images`, time every candidate against dense in one alternating run,
    and choose a recipe per budget in `max_drops` (percentage points); a JSON-able report (SCHEMA).

    `processor`: folder with the model's preprocessor_config.json. `model_name`: the model spec (builtin name or
    folder) whose config.json id2label names the class folders. `example`: one (1, C, H, W) input for tracing.
    `runner_factory(onnx_path, name)` times the models (default ONNX Runtime, tune.OrtRunnerFactory). After
    `time_budget` seconds (None: no limit) no further candidate is started; the timing and the ONNX Runtime checks
    of the chosen recipes follow.
    """
    from tokensieve import api
    from tokensieve.evaluate import _id2label, proportion
    from tokensieve.exporter.onnx_files import save_onnx
    from tokensieve.measure import time_models
    from tokensieve.recipe import Recipe, parse_recipe
    from tokensieve.tune import OrtRunnerFactory

    max_drops = tuple(check_max_drop(d) for d in max_drops)
    if not max_drops:
        raise ConfigError("max_drops needs at least one budget, e.g. (0.5,)")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and math.isfinite(time_budget)
                                        and time_budget > 0):
        raise ConfigError(f"--time-budget {time_budget!r} must be a finite number of seconds > 0")
    for name, v in (("--batch", batch), ("--eval-batch", eval_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} {v!r} must be a positive integer")
    methods, keeps = tuple(methods), tuple(float(k) for k in keeps)
    if not methods or not keeps:
        raise ConfigError("the sweep needs at least one method and one keep ratio (--methods, --keeps)")
    grid_size = len(methods) * len(keeps) * (len(after_blocks) if after_blocks else 2)
    if grid_size > MAX_CANDIDATES:
        raise ConfigError(f"{grid_size} candidates (methods x keeps x after-blocks) exceed {MAX_CANDIDATES}; "
                          "sweep fewer --methods, --keeps or --after-blocks")
    factory = runner_factory or OrtRunnerFactory(threads)
    say = progress or (lambda m: None)
    t_start = time.perf_counter()

    id2label = _id2label({"model": str(model_name)})
    imgs, proc_dir, pixels = _load_pixels(images, processor, tuple(example.shape[1:]), id2label, say)
    labelled = imgs.labels is not None
    # dense first: its blocks set the default grid and bound --after-blocks before minutes of sweeping, and its ONNX
    # is the baseline every candidate is timed against (the canonicalization does not depend on the stages)
    base = api.export(model, example, Recipe(()))
    dense_proto = base.onnx_model
    num_blocks = len(base.block_paths)
    after_blocks = tuple(tuple(b) for b in after_blocks) if after_blocks else default_after_blocks(num_blocks)
    for bl in after_blocks:
        if not bl or max(bl) >= num_blocks:
            raise ConfigError(f"--after-blocks {','.join(map(str, bl))}: the model has blocks 0..{num_blocks - 1}; "
                              "pick stage blocks in that range")
    grid = [(m, bl, k) for k in keeps for bl in after_blocks for m in methods]
    for m, bl, k in grid:
        parse_recipe(_shorthand(m, bl, k))  # a malformed candidate fails now, not after minutes of sweeping
    dense_logits = _eager_logits(base, pixels)
    dense_top1 = dense_logits.argmax(1)
    if labelled and int(imgs.labels.max()) >= dense_logits.shape[1]:
        raise ConfigError(f"{len(imgs.class_names)} class folders in {str(images)!r} but the model has "
                          f"{dense_logits.shape[1]} outputs; name the folders after the model's id2label labels")
    truth = imgs.labels if labelled else dense_top1

    def accuracy(logits: np.ndarray) -> dict:
        return proportion(logits.argmax(1) == truth)

    dense_row = {"name": "dense", "method": "dense", "recipe": "dense", "after_blocks": [], "keep": 1.0,
                 "tokens": [base.layout.num_tokens], "ideal_speedup": 1.0, "status": "ok", "accuracy": accuracy(dense_logits)}
    say(f"dense: {'top-1' if labelled else 'agreement'} {dense_row['accuracy']['value']:.4f} (eager)")
    rows: list[dict] = []
    seconds: dict[str, float] = {"load": time.perf_counter() - t_start}

    with tempfile.TemporaryDirectory(prefix="tokensieve-pareto-") as tmp:
        tmpdir, done = Path(tmp), 0
        (tmpdir / "dense").mkdir()
        save_onnx(dense_proto, tmpdir / "dense" / "dense.onnx")
        t0 = time.perf_counter()
        for i, (m, bl, k) in enumerate(grid):
            short = _shorthand(m, bl, k)
            row = {"name": f"c{i}", "method": m, "recipe": short, "after_blocks": list(bl), "keep": k}
            rows.append(row)
            if done and time_budget is not None and time.perf_counter() - t_start > time_budget:
                row |= {"status": "not swept", "reason": f"time budget {time_budget:g} s spent"}
                continue
            try:
                res = api.export(model, example, parse_recipe(short))
                logits = _eager_logits(res, pixels)
            except TokenSieveError as e:  # e.g. ToMe merges at most half the patches per stage, [CLS]-free models
                row |= {"status": "n/a", "reason": first_line(e, 160)}
                say(f"[{i + 1}/{len(grid)}] {short}: n/a: {row['reason']}")
                continue
            folder = tmpdir / row["name"]
            folder.mkdir()
            save_onnx(res.onnx_model, folder / "model.onnx")
            done += 1
            row |= {"status": "ok", "tokens": res.tokens, "ideal_speedup": res.ideal_speedup, "accuracy": accuracy(logits)}
            say(f"[{i + 1}/{len(grid)}] {short}: {'top-1' if labelled else 'agreement'} {row['accuracy']['value']:.4f} "
                f"(eager), tokens {'→'.join(map(str, res.tokens))} ({time.perf_counter() - t_start:.0f} s)")
            del res
        seconds["sweep"] = time.perf_counter() - t0
        swept = [r for r in rows if r["status"] == "ok"]
        skipped = sum(r["status"] == "not swept" for r in rows)
        if skipped:
            say(f"time budget {time_budget:g} s spent: {skipped} of {len(grid)} candidates not swept")

        backend = getattr(factory, "backend", type(factory).__name__)
        if swept:
            t0 = time.perf_counter()
            paths = {"dense": tmpdir / "dense" / "dense.onnx", **{r["name"]: tmpdir / r["name"] / "model.onnx"
                                                                   for r in swept}}
            say(f"timing dense and {len(swept)} candidates in one alternating run ({blocks} blocks x {iters} runs) "
                f"on {backend}")
            stats = time_models(lambda path, name: factory(path, name), paths, batch=batch, blocks=blocks, iters=iters,
                                warmup=warmup, progress=lambda msg: say(f"  {msg}") if msg.endswith(": dense") else None)
            seconds["timing"] = time.perf_counter() - t0
            for r in [dense_row, *swept]:
                s = stats[r["name"]]
                r["latency"] = {k: s[k] for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "count")}
                r["speedup"] = stats["dense"]["median_ms"] / s["median_ms"]
        points = [SweepPoint(r["name"], r["latency"]["median_ms"], r["accuracy"]["value"])
                  for r in [dense_row, *swept]] if swept else []
        front = pareto_front(points)
        for r in [dense_row, *rows]:
            r["on_front"] = r["name"] in front or (not swept and r is dense_row)
            if r["status"] == "ok" and r is not dense_row:
                r["drop_pp"] = 100 * (dense_row["accuracy"]["value"] - r["accuracy"]["value"])

        t0 = time.perf_counter()
        checked: dict[str, dict] = {}
        choices = []
        for max_drop in max_drops:
            choices.append(_choose(max_drop, points, dense_row, rows, checked, tmpdir, dense_proto, images, proc_dir,
                                   model_name, labelled, eval_batch, threads, say))
        seconds["onnx_eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return {"schema": SCHEMA, "model": str(model_name), "images": str(images), "num_images": len(imgs.paths),
            "metric": "top1" if labelled else "agreement_top1", "classes": imgs.class_names,
            "processor": str(proc_dir), "backend": backend, "batch": batch,
            "timing": {"blocks": blocks, "iters": iters, "warmup": warmup}, "time_budget_s": time_budget,
            "screening": "eager reference (ExportResult.reference, the stages the ONNX records)", "grid": {
                "methods": list(methods), "keeps": list(keeps), "after_blocks": [list(b) for b in after_blocks],
                "candidates": len(grid), "swept": len(swept), "not_swept": skipped},
            "dense": dense_row, "candidates": rows, "front": [r["name"] for r in [dense_row, *rows] if r.get("on_front")],
            "choices": choices, "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _choose(max_drop, points, dense_row, rows, checked, tmpdir, dense_proto, images, proc_dir, model_name, labelled,
            eval_batch, threads, say) -> dict:
    """The fastest candidate within `max_drop` whose exported ONNX, run on ONNX Runtime, also stays within it."""
    from tokensieve.api import REPORT_SCHEMA
    from tokensieve.evaluate import evaluate
    from tokensieve.exporter.onnx_files import save_onnx
    from tokensieve.fileio import write_json_atomic

    by_name = {r["name"]: r for r in rows}
    dense = next((p for p in points if p.name == "dense"), None)
    rejected = []
    for p in (within_budget(points, dense, max_drop) if dense else []):
        row = by_name[p.name]
        if p.name not in checked:
            folder = tmpdir / p.name
            save_onnx(dense_proto, folder / "dense.onnx")
            write_json_atomic(folder / "report.json", {"schema": REPORT_SCHEMA, "model": str(model_name),
                                                       "recipe_shorthand": row["recipe"]})
            say(f"budget {max_drop:g} pp: checking {row['recipe']} on ONNX Runtime (model.onnx vs dense.onnx)")
            checked[p.name] = evaluate(folder, images, processor=proc_dir, batch=eval_batch, threads=threads)
        r = checked[p.name]
        onnx = {"agreement_top1": r["agreement_top1"], "backend": r["backend"]}
        if labelled:
            onnx |= {"top1": r["pruned"]["top1"], "dense_top1": r["dense"]["top1"], "top1_drop": r["top1_drop"]}
            drop = 100 * r["top1_drop"]["value"]
        else:
            drop = 100 * (1 - r["agreement_top1"]["value"])
        onnx["drop_pp"] = drop
        if drop <= max_drop + 1e-9:
            return {"max_drop": max_drop, "chosen": p.name, "recipe": row["recipe"], "latency_ms": p.latency_ms,
                    "speedup": row["speedup"], "screened_drop_pp": row["drop_pp"], "onnx": onnx, "rejected": rejected,
                    "message": f"{row['recipe']}: {row['speedup']:.2f}x dense, drop {drop:.2f} pp on ONNX Runtime "
                               f"(budget {max_drop:g} pp)"}
        rejected.append({"name": p.name, "recipe": row["recipe"], "onnx_drop_pp": drop})
    why = ("no candidate was timed" if dense is None else
           "no swept recipe is faster than dense within the budget" if not rejected else
           f"the {len(rejected)} recipe(s) within the budget on the eager screen exceed it on ONNX Runtime")
    return {"max_drop": max_drop, "chosen": "dense", "recipe": "dense", "latency_ms": dense.latency_ms if dense else None,
            "speedup": 1.0, "onnx": None, "rejected": rejected, "message": f"dense: {why} ({max_drop:g} pp)"}


# --------------------------------------------------------------------------- output


def _pct(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{100 * m['value']:.1f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"


def _row_line(r: dict, chosen: dict[str, list[float]]) -> str:
    lat = r.get("latency")
    mark = ", ".join(f"≤{d:g} pp" for d in chosen.get(r["name"], []))
    tokens = "→".join(map(str, r["tokens"])) if r.get("tokens") else "-"
    drop = f"{r['drop_pp']:.2f}" if "drop_pp" in r else ("0" if r["name"] == "dense" else "-")
    return (f"| {r['method']} | {','.join(map(str, r['after_blocks'])) or '-'} | {r['keep']:g} | {tokens} | "
            f"{_pct(r.get('accuracy'))} | {drop} | {lat['median_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{'yes' if r.get('on_front') else ''} | {mark} |" if lat else
            f"| {r['method']} | {','.join(map(str, r['after_blocks'])) or '-'} | {r['keep']:g} | {tokens} | "
            f"{_pct(r.get('accuracy'))} | {drop} | - | - | | {r['status']}: {r.get('reason', '')} |")


def format_markdown(report: dict, title: str | None = None) -> str:
    """The front, the choices and every candidate as markdown tables."""
    r = report
    metric = "top-1 accuracy" if r["metric"] == "top1" else "top-1 agreement with dense"
    chosen: dict[str, list[float]] = {}
    for c in r["choices"]:
        chosen.setdefault(c["chosen"], []).append(c["max_drop"])
    d = r["dense"]
    lines = [f"# {title or 'Pareto front: accuracy vs latency'}", "",
             f"- Model: `{r['model']}`; images: {r['num_images']} from `{r['images']}`; metric: {metric} "
             f"(% [Wilson 95 % interval]); drop = dense - recipe, in percentage points.",
             f"- Accuracy of every candidate: {r['screening']}; the chosen recipes re-measured from their exported "
             "ONNX on ONNX Runtime (`tokensieve eval`).",
             f"- Latency: {r['backend']}, batch {r['batch']}, median of {r['timing']['blocks']} alternating blocks x "
             f"{r['timing']['iters']} runs, every candidate and dense in one run (ratios are from that run).",
             f"- Grid: methods {', '.join(r['grid']['methods'])}; keeps {', '.join(f'{k:g}' for k in r['grid']['keeps'])}; "
             f"stage blocks {' / '.join(','.join(map(str, b)) for b in r['grid']['after_blocks'])}: "
             f"{r['grid']['candidates']} candidates, {r['grid']['swept']} swept"
             + (f", {r['grid']['not_swept']} not swept (time budget {r['time_budget_s']:g} s)" if r['grid']['not_swept']
                else "") + f"; {r['seconds']['total']:.0f} s in all.", "",
             f"Dense baseline: {metric} {_pct(d['accuracy'])}"
             + (f", {d['latency']['median_ms']:.3f} ms" if d.get("latency") else "") + ".", "",
             "## Chosen recipe per accuracy budget", "",
             "| budget (pp) | chosen | speedup vs dense | median ms | drop on ONNX Runtime (pp) | accuracy on ONNX Runtime |",
             "|---|---|---|---|---|---|"]
    for c in r["choices"]:
        o = c.get("onnx") or {}
        acc = _pct(o.get("top1") or o.get("agreement_top1")) if o else "-"
        drop = (f"{o['drop_pp']:.2f}" + (f" [{100 * o['top1_drop']['ci95'][0]:.2f}, {100 * o['top1_drop']['ci95'][1]:.2f}]"
                                         if "top1_drop" in o else "")) if o else "-"
        lat = f"{c['latency_ms']:.3f}" if c.get("latency_ms") is not None else "-"
        lines.append(f"| {c['max_drop']:g} | `{c['recipe']}` | {c['speedup']:.2f}x | {lat} | {drop} | {acc} |")
    lines.append("")
    for c in r["choices"]:
        lines.append(f"- {c['max_drop']:g} pp: {c['message']}" + "".join(
            f"; rejected `{x['recipe']}` ({x['onnx_drop_pp']:.2f} pp on ONNX Runtime)" for x in c["rejected"]))
    header = ["| method | after blocks | keep | tokens | accuracy % | drop pp | median ms | speedup | front | chosen |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    everything = [r["dense"], *r["candidates"]]
    on_front = sorted((x for x in everything if x.get("on_front") and x.get("latency")),
                      key=lambda x: x["latency"]["median_ms"])
    lines += ["", "## Pareto front (fastest first)", "", *header, *(_row_line(x, chosen) for x in on_front)]
    timed = sorted((x for x in everything if x.get("latency")), key=lambda x: x["latency"]["median_ms"])
    rest = [x for x in everything if not x.get("latency")]
    lines += ["", "## All candidates", "", *header, *(_row_line(x, chosen) for x in timed + rest)]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    """The few lines `tokensieve tune --images` prints after the tables it writes."""
    r, d = report, report["dense"]
    metric = "top-1" if r["metric"] == "top1" else "agreement"
    lines = [f"tokensieve tune --images: {r['model']} on {r['num_images']} images, {r['backend']}, batch {r['batch']}; "
             f"{r['grid']['swept']}/{r['grid']['candidates']} candidates swept, {len(r['front'])} on the front",
             f"  dense: {metric} {_pct(d['accuracy'])}" + (f", {d['latency']['median_ms']:.3f} ms" if d.get("latency") else "")]
    for x in sorted((x for x in r["candidates"] if x["name"] in r["front"]), key=lambda x: x["latency"]["median_ms"]):
        lines.append(f"  front: {x['recipe']:<28} {metric} {_pct(x['accuracy']):<22} {x['latency']['median_ms']:.3f} ms "
                     f"{x['speedup']:.2f}x")
    for c in r["choices"]:
        lines.append(f"  chosen (max drop {c['max_drop']:g} pp): {c['message']}")
    return lines


def plot_front(report: dict, path: str | Path) -> Path:
    """PNG: latency (x) vs accuracy (y), one colour per method, dense a black star, the front a dashed line, the
    chosen recipes ringed."""
    from tokensieve.benchmark import require_matplotlib, save_figure

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    timed = [x for x in report["candidates"] if x.get("latency")]
    colours = plt.get_cmap("tab10")
    for i, m in enumerate(report["grid"]["methods"]):
        pts = [x for x in timed if x["method"] == m]
        if pts:
            ax.scatter([x["latency"]["median_ms"] for x in pts], [100 * x["accuracy"]["value"] for x in pts],
                       color=colours(i % 10), label=m, s=28, zorder=3)
    d = report["dense"]
    if d.get("latency"):
        ax.scatter([d["latency"]["median_ms"]], [100 * d["accuracy"]["value"]], marker="*", s=220, color="black",
                   label="dense", zorder=4)
    front = sorted((x for x in [d, *timed] if x.get("on_front") and x.get("latency")),
                   key=lambda x: x["latency"]["median_ms"])
    if front:
        ax.step([x["latency"]["median_ms"] for x in front], [100 * x["accuracy"]["value"] for x in front], where="post",
                color="gray", linestyle="--", alpha=0.7, label="Pareto front", zorder=2)
    by, budgets = {x["name"]: x for x in timed}, {}
    for c in report["choices"]:
        budgets.setdefault(c["chosen"], []).append(f"{c['max_drop']:g}")
    for name, drops in budgets.items():  # one ring per chosen recipe, labelled with every budget that chose it
        x = by.get(name)
        if x:
            ax.scatter([x["latency"]["median_ms"]], [100 * x["accuracy"]["value"]], s=260, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=5)
            ax.annotate(f"chosen ≤{', '.join(drops)} pp", (x["latency"]["median_ms"], 100 * x["accuracy"]["value"]),
                        textcoords="offset points", xytext=(9, -13), fontsize=8, color="red")
    metric = "top-1 accuracy %" if report["metric"] == "top1" else "top-1 agreement with dense %"
    ax.set(xlabel=f"median latency ms ({report['backend']}, batch {report['batch']})", ylabel=metric,
           title=f"{report['model']}: {report['num_images']} images, {report['grid']['swept']} recipes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- the command


def run_images(args, factory, say: Callable[[str], None]) -> int:
    """`tokensieve tune --images DIR`: parse the sweep's flags, sweep, write the recipe and the front files."""
    import torch

    from tokensieve.evaluate import scan_images
    from tokensieve.fileio import write_bytes_atomic, write_json_atomic
    from tokensieve.manifest import check_creatable_dir
    from tokensieve.models import load_model, model_dir
    from tokensieve.recipe import parse_recipe
    from tokensieve.tune import write_recipe

    methods = parse_methods(args.methods) if args.methods is not None else DEFAULT_METHODS
    keeps = parse_keeps(args.keeps) if args.keeps is not None else DEFAULT_KEEPS
    after_blocks = parse_after_blocks(args.after_blocks) if args.after_blocks else None
    max_drop = 0.5 if args.max_drop is None else check_max_drop(args.max_drop)
    stem = Path(args.output).with_suffix("")
    paths = {"--json": args.json or f"{stem}.pareto.json", "--md": args.md or f"{stem}.pareto.md",
             "--plot": args.plot or f"{stem}.pareto.png"}
    for flag, path in paths.items():
        check_creatable_dir(Path(path).parent, flag)
    from tokensieve.benchmark import require_matplotlib

    if args.plot:
        require_matplotlib()  # asked for: a missing matplotlib fails now, not after the sweep
    else:
        try:
            require_matplotlib()
        except ConfigError:
            paths["--plot"] = None
            say("skipping the Pareto plot: matplotlib is not installed (pip install tokensieve[plot])")
    processor = args.processor or model_dir(args.model)
    if processor is None:
        raise ConfigError(f"--model {args.model} has no image processor of its own; pass --processor DIR (a folder "
                          "with the preprocessor_config.json your images are prepared with)")
    scan_images(args.images)  # a missing or empty folder fails before the model loads
    model, shape = load_model(args.model)
    report = sweep_front(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), args.images,
                         processor=processor, model_name=str(args.model), methods=methods, keeps=keeps,
                         after_blocks=after_blocks, max_drops=(max_drop,),
                         time_budget=args.time_budget or DEFAULT_TIME_BUDGET, runner_factory=factory,
                         batch=args.batch, blocks=args.blocks, iters=args.iters, warmup=args.warmup,
                         threads=args.threads, progress=say)
    choice = report["choices"][0]
    report["recipe_file"] = None
    if choice["chosen"] != "dense":
        report["recipe_file"] = str(write_recipe(parse_recipe(choice["recipe"]), args.output))
    write_json_atomic(paths["--json"], report)
    write_bytes_atomic(paths["--md"], format_markdown(report).encode())
    if paths["--plot"]:
        plot_front(report, paths["--plot"])
    lines = summary_lines(report)
    written = [p for p in (paths["--json"], paths["--md"], paths["--plot"]) if p]
    lines.append(f"  wrote {', '.join(map(str, written))}")
    if report["recipe_file"]:
        lines.append(f"  wrote {report['recipe_file']}: tokensieve export --model {args.model} --prune "
                     f"{report['recipe_file']}  (or --prune '{choice['recipe']}')")
    else:
        lines.append(f"  dense chosen: no recipe written to {args.output}")
    print("\n".join(lines))
    return 0
