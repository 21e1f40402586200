"""Dense vs pruned benchmark of an export folder: per batch size latency percentiles, throughput, peak memory and the
speedup against the MAC-ideal one; optionally a token sweep (one stage's keep varied, re-exported); JSON, a markdown
table and PNG plots.

    result = bench_folder("out", BenchSettings(backend="onnxruntime", batches=(1, 8)))
    write_outputs(result, json_path="b.json", md_path="b.md", png_path="b.png")

Models are timed with `measure_alternating` (A B B A ..., warm-up per block) and only one session or engine is
resident at a time: each block loads its model and frees the other, so neither steals the other's cores (ORT's
spinning threads) or memory. A TensorRT bench times the engine built from model.onnx that report.json lists last
against dense.onnx's engine of the same target and precision (dense.<target>.<precision>.engine); when that is missing
it is built once, with the model engine's target, precision and batch profile (`api.build`), and kept in OUT.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokensieve.errors import ConfigError
from tokensieve.fileio import atomic_path, write_json_atomic
from tokensieve.runtime import RUNNERS
from tokensieve.measure import runner_options, time_models
from tokensieve.api import read_export_report

SCHEMA = "tokensieve.bench/1"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchSettings:
    """What `tokensieve bench` measures. Runner options apply to the backends whose runner takes them."""

    backend: str = "onnxruntime"
    batches: tuple[int, ...] = (1,)
    blocks: int = 4
    iters: int = 20
    warmup: int = 5
    threads: int | None = None          # onnxruntime
    plugins: str | None = None          # tensorrt: libtokensieve_plugins.so
    cuda_graph: bool = False            # tensorrt, torch
    device: str | None = None           # torch: cuda (the default when torch sees a GPU) or cpu
    dtype: str | None = None            # torch: fp32 (default) or fp16
    sweep: tuple[str, ...] = ()         # keep values for the token sweep ("0.5", "98"); empty: no sweep
    sweep_stage: int = 0                # which recipe stage the sweep varies
    sweep_batch: int | None = None      # batch of the sweep (default: the first of `batches`)

    def __post_init__(self) -> None:
        if self.backend not in RUNNERS:
            raise ConfigError(f"Unknown backend {self.backend!r}; use one of {', '.join(RUNNERS)}")
        if not self.batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise ConfigError(f"batches {self.batches!r} must be positive integers, e.g. --batch 1,8,32")
        self.runner_options()  # an option the backend does not take fails now, before anything is loaded

    def runner_options(self) -> dict:
        """The runner keyword arguments that were set, checked against the backend runner's signature."""
        return runner_options(self.backend, threads=self.threads, plugins=self.plugins, cuda_graph=self.cuda_graph,
                              device=self.device, dtype=self.dtype)


# ----------------------------------------------------------------------------------------- parsing (CLI edge)


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); anything else is a one-line ConfigError."""
    from tokensieve.manifest import excerpt

    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) > 64:
        raise ConfigError(f"--batch lists {len(parts)} batch sizes; time at most 64 in one run")
    out = []
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 12 or int(p) < 1:
            raise ConfigError(f"--batch {excerpt(text, 40)}: {excerpt(p, 20)} is not a positive integer; use a "
                              "comma-separated list like 1,8,32")
        out.append(int(p))
    if len(set(out)) != len(out):
        raise ConfigError(f"--batch {text!r} lists a batch size twice; list each once, e.g. 1,8,32")
    return tuple(out)


def parse_sweep(text: str) -> tuple[str, ...]:
    """'0.3,0.5,0.7' (ratios) or '49,98' (counts) -> normalized keep strings; one-line ConfigError otherwise."""
    from tokensieve.recipe import _parse_keep

    values = [p.strip() for p in str(text).split(",")]
    if len(values) < 2 or not all(values):
        raise ConfigError(f"--sweep {text!r} needs at least two comma-separated keep values, e.g. 0.5,0.7")
    budgets = [str(_parse_keep(v, where=f"--sweep {text}")) for v in values]
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"--sweep {text!r} lists a keep value twice; list each once")
    return tuple(budgets)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_memory_estimate(report: dict, batch: int) -> int:
    """Bytes one run of batch `batch` of this export needs, roughly: the float32 input plus one block's live
    activations per sample (x, qkv, attention output: 5 (N, C); the MLP's 4C hidden twice: 8 (N, C); scores and
    softmax: 2 (N, N) per 64-channel head), twice (the eager reference and ONNX Runtime / two sessions hold theirs)."""
    shape = report.get("input_shape") or []
    layout = report.get("layout") or {}
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731 - a report.json is input
    per_input = math.prod(shape[1:]) if len(shape) > 1 and all(ok(v) for v in shape[1:]) else 0
    n, c = layout.get("num_tokens"), layout.get("hidden_size")
    per_block = (13 * n * c + 2 * max(1, c // 64) * n * n) if ok(n) and ok(c) else 0
    return 4 * batch * 2 * (per_input + per_block)


def check_batch_memory(report: dict, batch: int, flag: str = "--batch") -> None:
    """One-line ConfigError, before anything is loaded, if batch `batch` cannot fit in this machine's memory (an
    estimate that is a lower bound: a refused batch would certainly have failed with a MemoryError)."""
    need, have = batch_memory_estimate(report, batch), available_memory()
    if have is not None and need > have:
        raise ConfigError(f"{flag} {batch} needs at least {_gib(need)} of memory (input and one block's activations) "
                          f"but {_gib(have)} is available; lower {flag}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


# ----------------------------------------------------------------------------------------- timing


def _pair_result(batch: int, dense: dict, pruned: dict, ideal: float | None) -> dict:
    speedup = dense["median_ms"] / pruned["median_ms"]
    return {"batch": batch, "dense": dense, "pruned": pruned, "speedup": speedup, "ideal_speedup": ideal,
            "ratio_to_ideal": speedup / ideal if ideal else None}


# ----------------------------------------------------------------------------------------- folder


def _artifact(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    if suffix == ".onnx" and not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist; run `tokensieve export -o {folder}` first")
    return path


def _engine_build_args(engine: Path) -> dict:
    """target, precision and max_batch of an existing engine, to build a comparable one (same GPU target, same
    precision, same profile)."""
    from tokensieve.runtime.engine_metadata import read_engine_metadata

    meta = read_engine_metadata(engine)
    profile = next(iter(meta["optimization_profile"].values()), None)
    return {"target": meta["target"] or "local", "precision": meta["precision"] or "fp32",  # None: version 1
            "max_batch": profile["max"][0] if profile else 1}


def _engine_pair(folder: Path, report: dict, progress: Progress | None) -> tuple[Path, Path]:
    """(dense engine, model engine): the engine built from model.onnx that report.json lists last, and dense.onnx's
    engine of the same name but its stem (built like the model engine when it is missing, and listed too)."""
    built = [e for e in report.get("engines", []) if e["onnx"] == "model.onnx"] if "engines" in report else None
    if built is None:
        raise ConfigError(f"{str(folder / 'report.json')!r} lacks engines; re-run `tokensieve export` with this version")
    if not built:
        raise ConfigError(f"{str(folder)!r} holds no engine built from model.onnx; build one with `tokensieve build "
                          f"{folder / 'model.onnx'} --target rtx-smXX` (or --target local), or export without --no-build")
    model = folder / built[-1]["file"]
    from tokensieve.runtime.engine_metadata import check_engine_file, read_engine_metadata

    check_engine_file(model, read_engine_metadata(model))  # a truncated model engine fails before dense is built
    dense = folder / ("dense" + model.name.removeprefix("model"))  # model.rtx-sm86.fp16.engine -> dense.rtx-sm86...
    if not dense.is_file():
        from tokensieve import api

        args = _engine_build_args(model)
        if progress:
            progress(f"building {dense.name} for {args['target']} (max batch {args['max_batch']}) as the dense baseline")
        api.build(_artifact(folder, "dense", ".onnx"), dense, **args, extra_metadata={"tokensieve": {"dense": True}})
    return dense, model


def bench_folder(folder: str | Path, settings: BenchSettings = BenchSettings(), *,
                 progress: Progress | None = None) -> dict:
    """Benchmark OUT (written by `tokensieve export`): dense vs pruned per batch, plus the sweep if asked."""
    folder = Path(folder)
    report = read_export_report(folder, required=("macs_dense", "macs_pruned", "tokens_per_block", "recipe_shorthand"))
    from tokensieve.manifest import EXPORT_REPORT_TYPES, check_field_types

    check_field_types(report, EXPORT_REPORT_TYPES, repr(str(folder / "report.json")), "re-run `tokensieve export`")
    for batch in {*settings.batches, settings.sweep_batch or settings.batches[0]}:
        check_batch_memory(report, batch, "--sweep-batch" if batch not in settings.batches else "--batch")
    if settings.sweep:
        _swept_stage(report, settings.sweep_stage)  # a bad --sweep-stage fails before the timing, not after
    runner_cls = RUNNERS[settings.backend]
    suffix = runner_cls.artifact_suffix
    if suffix == ".engine":
        dense_path, model_path = _engine_pair(folder, report, progress)
    else:
        dense_path, model_path = _artifact(folder, "dense", suffix), _artifact(folder, "model", suffix)
    ideal = report["macs_dense"] / report["macs_pruned"]
    options = settings.runner_options()
    t0 = time.perf_counter()
    results = []
    for batch in settings.batches:
        stats = time_models(runner_cls, {"dense": dense_path, "pruned": model_path}, batch=batch,
                            blocks=settings.blocks, iters=settings.iters, warmup=settings.warmup, options=options,
                            progress=(lambda m, b=batch: progress(f"batch {b}, {m}")) if progress else None)
        results.append(_pair_result(batch, stats["dense"], stats["pruned"], ideal))
    out = {
        "schema": SCHEMA,
        "folder": str(folder),
        "model": report.get("model"),
        "recipe": report.get("recipe_shorthand"),
        "backend": settings.backend,
        "device": results[0]["pruned"]["device"],
        "tokens_per_block": report["tokens_per_block"],
        "macs_dense": report["macs_dense"],
        "macs_pruned": report["macs_pruned"],
        "ideal_speedup": ideal,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("sweep",)},
        "results": results,
    }
    if settings.sweep:
        out["sweep"] = token_sweep(folder, report, settings, dense_path, progress=progress)
    out["seconds"] = time.perf_counter() - t0
    return out


def _swept_stage(report: dict, index: int):
    """(recipe of the export, the stage the sweep varies); ConfigError if there is no such stage."""
    from tokensieve.recipe import parse_recipe

    recipe = parse_recipe(report["recipe_shorthand"])
    if not 0 <= index < len(recipe.stages):
        raise ConfigError(f"--sweep-stage {index} does not exist: the recipe {recipe} has {len(recipe.stages)} "
                          "stage(s), numbered from 0")
    return recipe, recipe.stages[index]


def token_sweep(folder: Path, report: dict, settings: BenchSettings, dense_path: Path, *,
                progress: Progress | None = None) -> dict:
    """Re-export the report's model with one stage's keep set to each sweep value; time them all against dense."""
    import torch

    from tokensieve import api
    from tokensieve.models import load_model
    from tokensieve.recipe import _parse_keep

    recipe, stage = _swept_stage(report, settings.sweep_stage)
    runner_cls = RUNNERS[settings.backend]
    batch = settings.sweep_batch or settings.batches[0]
    if progress:
        progress(f"sweep: loading model {report['model']!r}")
    model, shape = load_model(report["model"])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    points, paths = [], {"dense": dense_path}
    with tempfile.TemporaryDirectory(prefix=".sweep-", dir=folder) as tmp:
        for j, keep in enumerate(settings.sweep):
            stages = list(recipe.stages)
            stages[settings.sweep_stage] = dataclasses.replace(stage, keep=_parse_keep(keep, where="--sweep"))
            swept = dataclasses.replace(recipe, stages=tuple(stages))
            if progress:
                progress(f"sweep: exporting {swept} ({j + 1}/{len(settings.sweep)})")
            result = api.export(model, example, swept)
            saved = api.save(result, Path(tmp) / f"keep{j}", parts=("model",))  # the dense baseline is dense_path
            path = saved["model"]
            if runner_cls.artifact_suffix == ".engine":
                path = api.build(path, Path(tmp) / f"keep{j}" / "model.engine", **_engine_build_args(dense_path)).engine_path
            name = f"keep={keep}"
            paths[name] = path
            points.append({"name": name, "keep": keep, "recipe": swept.shorthand(),
                           "tokens": result.stages[settings.sweep_stage].tokens_out,
                           "tokens_per_block": result.tokens_per_block(), "macs_pruned": result.macs_pruned,
                           "ideal_speedup": report["macs_dense"] / result.macs_pruned})
        stats = time_models(runner_cls, paths, batch=batch, blocks=settings.blocks, iters=settings.iters,
                            warmup=settings.warmup, options=settings.runner_options(),
                            progress=(lambda m: progress(f"sweep, batch {batch}, {m}")) if progress else None)
    dense = stats["dense"]
    for p in points:
        s = stats[p.pop("name")]
        p.update(latency=s, speedup=dense["median_ms"] / s["median_ms"])
        p["ratio_to_ideal"] = p["speedup"] / p["ideal_speedup"]
    return {"stage": settings.sweep_stage, "after_block": stage.after_block, "batch": batch, "dense": dense,
            "points": points}


# ----------------------------------------------------------------------------------------- outputs


def _mib(mem: dict | None) -> str:
    peak = (mem or {}).get("peak_bytes")
    return "n/a" if peak is None else f"{peak / 2**20:.1f}"


def format_markdown(result: dict) -> str:
    """The result as markdown: a header line, the per-batch table, and the sweep table when there is one."""
    tokens = "→".join(str(t) for t in dict.fromkeys(result["tokens_per_block"]))
    memory_kind = next((r["dense"]["memory"] or {}).get("kind", "n/a") for r in result["results"])
    lines = [f"**tokensieve bench** `{result['model']}` recipe `{result['recipe']}` (tokens {tokens}) on "
             f"{result['device']}; MAC-ideal speedup {result['ideal_speedup']:.2f}x; memory = {memory_kind}", "",
             "| batch | model | median ms | p90 ms | p99 ms | images/s | peak MiB | speedup | MAC-ideal | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        for name in ("dense", "pruned"):
            s = r[name]
            extra = (f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['ratio_to_ideal']:.2f}" if name == "pruned"
                     else " | | ")
            lines.append(f"| {r['batch']} | {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | "
                         f"{s['throughput_ips']:.1f} | {_mib(s['memory'])} | {extra} |")
    sweep = result.get("sweep")
    if sweep:
        lines += ["", f"Token sweep: stage {sweep['stage']} (after block {sweep['after_block']}), batch {sweep['batch']}, "
                      f"dense {sweep['dense']['median_ms']:.2f} ms", "",
                  "| keep | tokens kept | median ms | p90 ms | speedup | MAC-ideal | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in sweep["points"]:
            lines.append(f"| {p['keep']} | {p['tokens']} | {p['latency']['median_ms']:.2f} | {p['latency']['p90_ms']:.2f} | "
                         f"{p['speedup']:.2f}x | {p['ideal_speedup']:.2f}x | {p['ratio_to_ideal']:.2f} |")
    return "\n".join(lines) + "\n"


def require_matplotlib():
    """pyplot with the file-only Agg backend, or a one-line ConfigError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install tokensieve[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict, path: str | Path) -> Path:
    """PNG: latency vs batch (dense vs pruned, median with p90 bars); latency vs kept tokens for the sweep."""
    plt = require_matplotlib()
    sweep = result.get("sweep")
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    batches = [r["batch"] for r in result["results"]]
    for name, marker in (("dense", "o"), ("pruned", "s")):
        med = [r[name]["median_ms"] for r in result["results"]]
        p90 = [r[name]["p90_ms"] - r[name]["median_ms"] for r in result["results"]]
        ax.errorbar(batches, med, yerr=[[0] * len(med), p90], marker=marker, capsize=3, label=name)
    ax.set(xlabel="batch", ylabel="latency ms (median, bar to p90)", title=f"{result['backend']}: latency vs batch")
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(alpha=0.3)
    ax.legend()
    if sweep:
        ax = axes[0][1]
        pts = sorted(sweep["points"], key=lambda p: p["tokens"])
        ax.plot([p["tokens"] for p in pts], [p["latency"]["median_ms"] for p in pts], marker="s", label="pruned")
        ax.axhline(sweep["dense"]["median_ms"], color="gray", linestyle="--", label="dense")
        ax.set_ylim(bottom=0)
        ax.set(xlabel=f"tokens kept after block {sweep['after_block']}", ylabel="latency ms (median)",
               title=f"token sweep, batch {sweep['batch']}")
        ax.grid(alpha=0.3)
        ax.legend()
    first = result["results"][0]
    what = " ".join(str(result[k]) for k in ("model", "recipe") if result.get(k))
    fig.suptitle(f"{what + ': ' if what else ''}pruned {first['speedup']:.2f}x dense at batch {first['batch']}"
                 if first.get("speedup") else what, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, *, json_path=None, md_path=None, png_path=None) -> dict[str, Path]:
    """Write the JSON / markdown / PNG files that were asked for, each atomically."""
    written = {}
    if json_path:
        written["json"] = write_json_atomic(json_path, result)
    if md_path:
        with atomic_path(md_path) as tmp:
            tmp.write_text(format_markdown(result))
        written["md"] = Path(md_path)
    if png_path:
        written["png"] = plot(result, png_path)
    return written
