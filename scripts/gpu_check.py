"""The GPU check of issue 17 in one run: plugin kernels without TensorRT, and dense vs pruned latency on PyTorch CUDA.

    scripts/gpu_check.sh OUTDIR [--dry-run] [--tiny]          (installs tokensieve --no-deps, then runs this)
    python -m tokensieve.scripts.gpu_check OUTDIR [--dry-run] [--tiny] [--budget-s 420] [--recipes "a;b"]

Sections, in order (each is recorded even when it fails; OUTDIR/gpu_check.json and gpu_check.md are rewritten
after every section, so a run cut short still leaves what it measured):
  1. environment: torch / CUDA / GPU / nvcc / compute-sanitizer versions
  2. harness build: plugin_src/token_compact.cu + diversity_select.cu with nvcc for sm_90 and sm_86
  3. kernel correctness: both kernels vs tokensieve's methods on random inputs with ties (counts)
  4. compute-sanitizer memcheck and racecheck on the harness driver
  5. DivPrune K=64 of N=576 (+[CLS]), C=1024, batch 1 and 8: plugin kernel vs the same greedy selection in PyTorch
  6. latency: ViT-S/16-224, ViT-B/16-224, ViT-S/16-384 (random init from configs), dense and pruned with
     cls-topk@3,6,9:0.7, tome@3,6,9:0.7 and divprune@4:0.5; fp32 and fp16; batch 1, 8, 32; TorchRunner on CUDA
     with CUDA graphs, CUDA events in alternating blocks; speedup and its ratio to the MAC-ideal speedup.
A time budget (--budget-s, default 420 s) is checked before each step; what does not fit is skipped with a note.
--dry-run does everything but the CUDA calls: the harness is compiled but not run, and the latency table is timed on
the CPU (wall clock). --tiny uses a 2-block 64x64 ViT and batches 1, 2 (for CI).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

SCHEMA = "tokensieve.gpu_check/1"
RECIPES = ("cls-topk@3,6,9:0.7", "tome@3,6,9:0.7", "divprune@4:0.5")
TINY_RECIPES = ("cls-topk@0:0.7", "tome@0:0.7", "divprune@0:0.5")
# name: (ViTConfig overrides of the built-in ViT-S/16-224, input size)
MODELS = {
    "vit-s16-224": ({}, 224),
    "vit-b16-224": ({"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}, 224),
    "vit-s16-384": ({"image_size": 384}, 384),
}
TINY_MODELS = {"tiny-2-blocks": ({"num_hidden_layers": 2}, 64)}


class Budget:
    """Seconds left of the run's budget; `fits(s)` says whether a step of about s seconds still fits."""

    def __init__(self, seconds: float) -> None:
        self.total, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


def _cmd_output(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def environment(dry_run: bool) -> dict:
    import torch
    import transformers

    from tokensieve.targets.tensorrt import kernel_harness as kh

    root = Path(__file__).resolve().parent.parent
    env = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "dry_run": dry_run,
        "nvcc": _cmd_output([str(_nvcc_or_none() or "nvcc"), "--version"]),
        "compute_sanitizer": _sanitizer_or_none(kh),
        "nvidia_smi": _cmd_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "git_commit": _cmd_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count}
    return env


def _nvcc_or_none():
    from tokensieve.errors import TargetError
    from tokensieve.targets.tensorrt.plugins import find_nvcc

    try:
        return find_nvcc()
    except TargetError:
        return None


def _sanitizer_or_none(kh) -> str | None:
    try:
        return kh._compute_sanitizer()
    except Exception:  # noqa: BLE001 - a missing tool is recorded, not raised
        return None


# ----------------------------------------------------------------------------------------------- kernel sections


def kernel_sections(record, budget: Budget, dry_run: bool, harness_dir: str | None, exports=None) -> None:
    from tokensieve.targets.tensorrt import kernel_harness as kh

    built = record("harness_build", lambda: _build(kh, harness_dir), need_s=0)
    if built is None:
        return
    if dry_run:
        note = "dry run: compiled, not run (no CUDA calls)"
        for name in ("kernel_correctness", "sanitizer", "divprune_timing"):
            record(name, None, skip=note)
        return
    record("kernel_correctness", lambda: _correctness(kh, kh.KernelHarness(built["lib"])), need_s=20)
    record("sanitizer", lambda: [kh.run_driver(built["driver"], tool, timeout=150) for tool in ("memcheck", "racecheck")],
           need_s=60)
    # PyTorch's greedy selection is bound by kernel launches: time it with the CPU free of export workers.
    running = exports.wait_all(min(120.0, budget.left() - 240)) if exports is not None else 0
    record("divprune_timing", lambda: {"exports_running": running,
                                       "rows": kh.time_divprune(kh.KernelHarness(built["lib"]), batches=(1, 8))},
           need_s=20)


def _build(kh, harness_dir: str | None) -> dict:
    b = kh.build_harness(harness_dir)
    return {"lib": str(b.lib), "driver": str(b.driver), "seconds": b.seconds, "cached": b.cached,
            "archs": list(kh.DEFAULT_ARCHS)}


def _correctness(kh, harness) -> dict:
    results = kh.check_kernels(harness)
    counts = {}
    for r in results:
        c = counts.setdefault(r.kernel, {"passed": 0, "total": 0})
        c["total"] += 1
        c["passed"] += int(r.passed)
    return {"counts": counts, "cases": [vars(r) for r in results]}


# ----------------------------------------------------------------------------------------------- latency


def build_model(name: str, tiny: bool):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from tokensieve.models import BUILTIN

    overrides, size = (TINY_MODELS if tiny else MODELS)[name]
    base = BUILTIN["tiny" if tiny else "default"][0]
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**(base | overrides), attn_implementation="sdpa")).eval()
    return model, (1, 3, size, size)


def export_one(model_name: str, tiny: bool, recipe: str, folder: str, threads: int | None = None) -> dict:
    """Export one model with one recipe and write its model.pt2 / dense.pt2 (a worker process's job)."""
    import torch

    from tokensieve import api

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, shape = build_model(model_name, tiny)
    result = api.export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), recipe)
    sub = Path(folder) / model_name / recipe.replace("@", "_").replace(",", "-").replace(":", "_")
    paths = api.save(result, sub, parts=("torch",))
    return {"model": model_name, "recipe": recipe, "model_pt2": str(paths["torch"]),
            "dense_pt2": str(paths["torch_dense"]), "ideal_speedup": result.ideal_speedup, "tokens": result.tokens,
            "macs_dense": result.macs_dense, "macs_pruned": result.macs_pruned, "export_s": time.perf_counter() - t0}


class Exports:
    """Every (model, recipe) export, started at once: in worker processes when the machine has cores to spare (the
    GPU machine has 16), so they run while the GPU checks the kernels; else one after another, on first use."""

    def __init__(self, models, recipes, tiny: bool, folder: Path, workers: int | None = None) -> None:
        self.jobs = [(m, r) for m in models for r in recipes]
        self.tiny, self.folder = tiny, folder
        cores = os.cpu_count() or 1
        self.workers = workers if workers is not None else min(len(self.jobs), max(0, cores - 4))
        self.futures: dict = {}
        self.pool = None
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent holds a CUDA context by now, which a forked child must not inherit
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            threads = max(1, cores // self.workers)
            for m, r in self.jobs:
                self.futures[(m, r)] = self.pool.submit(export_one, m, tiny, r, str(folder), threads)

    def get(self, model: str, recipe: str, timeout: float) -> dict:
        if self.pool is None:
            return export_one(model, self.tiny, recipe, str(self.folder))
        return self.futures[(model, recipe)].result(timeout=max(1.0, timeout))

    def wait_all(self, timeout: float) -> int:
        """Wait up to `timeout` s for the running exports (so timings do not share the CPU with them); how many
        are still running."""
        from concurrent.futures import wait

        if self.futures:
            wait(list(self.futures.values()), timeout=max(0.0, timeout))
        return sum(not f.done() for f in self.futures.values())

    def close(self) -> None:
        if self.pool is not None:
            for f in self.futures.values():
                f.cancel()
            processes = list((getattr(self.pool, "_processes", None) or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:  # an export still running past the budget is not waited for
                if proc.is_alive():
                    proc.terminate()


def latency_section(record, budget: Budget, exports: Exports, *, dry_run: bool, tiny: bool, recipes, batches, dtypes,
                    blocks: int, iters: int, warmup: int, cuda_graph: bool, compile_: bool) -> None:
    import torch

    device = "cpu" if dry_run else "cuda"
    models = TINY_MODELS if tiny else MODELS
    rows: list[dict] = []
    record("latency_settings", lambda: {"device": device, "recipes": list(recipes), "models": list(models),
                                        "batches": list(batches), "dtypes": list(dtypes), "blocks": blocks,
                                        "iters": iters, "warmup": warmup, "cuda_graph": cuda_graph and not dry_run,
                                        "torch_compile": compile_, "timing": "CPU wall clock" if dry_run else "CUDA events",
                                        "tf32": False, "export_workers": exports.workers}, need_s=0)
    if not dry_run:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for model_name in models:
        exported = {}
        for recipe in recipes:
            # the export itself may still be running in its worker: wait while the budget allows
            got = record(f"export:{model_name}:{recipe}", lambda m=model_name, r=recipe: exports.get(
                m, r, timeout=budget.left() - 20), need_s=30 if not tiny else 2)
            if got:
                exported[recipe] = got
        if not exported:
            continue
        loaded: dict = {}  # each .pt2 of this model is read once, for both dtypes
        for dtype in dtypes:
            holder: dict = {}

            def load(d=dtype, holder=holder):
                t0 = time.perf_counter()
                holder["set"] = ResidentSet(exported, device, d, cuda_graph and not dry_run, compile_, loaded)
                return {"programs": list(holder["set"].paths), "load_s": time.perf_counter() - t0}

            if record(f"load:{model_name}:{dtype}", load, need_s=20 if not tiny else 2) is None:
                continue
            resident = holder["set"]
            try:
                for batch in batches:
                    cell = record(f"latency:{model_name}:{dtype}:b{batch}", lambda b=batch, m=model_name: resident.time(
                        m, b, blocks=blocks, iters=iters, warmup=warmup), need_s=10 if not tiny else 2)
                    if cell:
                        rows.extend(cell)
            finally:
                resident.close()
    record("latency_table", lambda: rows, need_s=0)


class ResidentSet:
    """The dense and every pruned program of one model, loaded once in one dtype and reused for every batch size
    (CUDA graphs are captured per input shape). A program whose graph cannot be captured is timed eagerly."""

    def __init__(self, exported: dict, device: str, dtype: str, cuda_graph: bool, compile_: bool,
                 loaded: dict | None = None) -> None:
        """`loaded`: {path: read_program(path)} shared between the dtypes of one model (each file is read once)."""
        from tokensieve.runtime.torch_runner import TorchRunner, read_program

        first = next(iter(exported.values()))
        self.exported, self.device, self.dtype, self.compile = exported, device, dtype, compile_
        self.paths = {"dense": first["dense_pt2"]} | {r: e["model_pt2"] for r, e in exported.items()}
        self.modes = {name: "CUDA graph" if cuda_graph else "eager" for name in self.paths}
        self.runners: dict = {}
        try:
            self.loaded = loaded if loaded is not None else {}
            for name, p in self.paths.items():
                if p not in self.loaded:
                    self.loaded[p] = read_program(p)
                self.runners[name] = TorchRunner(p, device=device, dtype=dtype, cuda_graph=cuda_graph,
                                                 compile=compile_, name=name, program=self.loaded[p]).activate()
        except BaseException:
            self.close()
            raise

    def _eager(self, name: str) -> None:
        from tokensieve.runtime.torch_runner import TorchRunner

        self.runners[name].deactivate()
        self.runners[name] = TorchRunner(self.paths[name], device=self.device, dtype=self.dtype, compile=self.compile,
                                         name=name, program=self.loaded[self.paths[name]]).activate()
        self.modes[name] = "eager (capture failed)"

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()
        self.runners = {}

    def time(self, model_name: str, batch: int, *, blocks: int, iters: int, warmup: int) -> list[dict]:
        """All programs at one batch size, timed in alternating blocks; one row per pruned program."""
        import torch

        from tokensieve.errors import TargetError
        from tokensieve.runtime.timing import measure_alternating
        from tokensieve.runtime.torch_runner import measure_cuda_alternating

        dense_runner = self.runners["dense"]
        feeds = dense_runner.make_random_feeds(batch=batch, seed=0)
        inputs = [torch.from_numpy(feeds[n]).to(self.device) for n, _, _ in dense_runner.input_specs]
        for name in list(self.runners):
            try:
                self.runners[name].run(*inputs)  # with CUDA graphs: warm-up and capture for this shape
            except TargetError:
                self._eager(name)
        cases = {name: (lambda r=r: r.run(*inputs)) for name, r in self.runners.items()}
        if self.device == "cuda":
            stats = measure_cuda_alternating(cases, blocks=blocks, iters=iters, warmup=warmup)
        else:  # CPU ops are synchronous: wall clock per call
            stats = measure_alternating(cases, blocks=blocks, iters=iters, warmup=warmup)
        dense = stats["dense"]
        rows = []
        for recipe, e in self.exported.items():
            s = stats[recipe]
            speedup = dense.median_ms / s.median_ms
            rows.append({"model": model_name, "recipe": recipe, "dtype": self.dtype, "batch": batch,
                         "device": dense_runner.device_label, "dense_ms": dense.median_ms, "dense_p90_ms": dense.p90_ms,
                         "pruned_ms": s.median_ms, "pruned_p90_ms": s.p90_ms, "speedup": speedup,
                         "ideal_speedup": e["ideal_speedup"], "ratio_to_ideal": speedup / e["ideal_speedup"],
                         "tokens": e["tokens"], "samples": s.count,
                         "mode": {"dense": self.modes["dense"], "pruned": self.modes[recipe]}})
        return rows


# ----------------------------------------------------------------------------------------------- report


def format_markdown(report: dict) -> str:
    env = report["sections"].get("environment", {}).get("result") or {}
    lines = ["# tokensieve GPU check", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {(env.get('gpu') or {}).get('name') or 'no GPU (dry run)'}; torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}); transformers {env.get('transformers')}; Python {env.get('python')}  ",
             f"nvcc: {env.get('nvcc')}; driver: {env.get('nvidia_smi')}; commit {env.get('git_commit')}  ",
             f"Total {report.get('seconds', 0):.0f} s{' (DRY RUN: nothing ran on a GPU)' if report['dry_run'] else ''}", ""]
    secs = report["sections"]
    lines += ["## Sections", "", "| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, s in secs.items():
        if name.startswith("latency:") and s["status"] == "ok":
            continue
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {s.get('note') or s.get('error') or ''} |")
    corr = (secs.get("kernel_correctness") or {}).get("result")
    if corr:
        lines += ["", "## Kernel correctness (vs tokensieve's methods, random inputs with ties)", "",
                  "| kernel | case | result | max abs diff | detail |", "|---|---|---|---:|---|"]
        for c in corr["cases"]:
            lines.append(f"| {c['kernel']} | {c['case']} | {'identical' if c['passed'] else 'DIFFERS'} | "
                         f"{c['max_abs_diff']:.1e} | {c['detail']} |")
        lines += [""] + [f"{k}: {v['passed']}/{v['total']} cases identical" for k, v in corr["counts"].items()]
    san = (secs.get("sanitizer") or {}).get("result")
    if san:
        lines += ["", "## compute-sanitizer (harness driver)", "", "| tool | ok | summary |", "|---|---|---|"]
        lines += [f"| {s['tool']} | {s['ok']} | {s['summary']} |" for s in san]
    tim = ((secs.get("divprune_timing") or {}).get("result") or {}).get("rows")
    if tim:
        lines += ["", "## DivPrune selection: plugin kernel vs PyTorch greedy (CUDA events)", "",
                  "| batch | N | C | K | plugin ms | PyTorch greedy ms | speedup | same indices |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['batch']} | {r['N']} | {r['C']} | {r['K']} | {r['plugin_ms']:.3f} | {r['torch_greedy_ms']:.3f} "
                  f"| {r['speedup']:.1f}x | {r['same_indices']} |" for r in tim]
    rows = (secs.get("latency_table") or {}).get("result")
    if rows:
        settings = (secs.get("latency_settings") or {}).get("result") or {}
        lines += ["", f"## Dense vs pruned latency ({settings.get('timing')}, CUDA graph {settings.get('cuda_graph')}, "
                  f"{settings.get('blocks')} alternating blocks x {settings.get('iters')} calls; medians)", "",
                  "| model | recipe | dtype | batch | dense ms | pruned ms | speedup | MAC-ideal | ratio |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['recipe']} | {r['dtype']} | {r['batch']} | {r['dense_ms']:.3f} | "
                  f"{r['pruned_ms']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['ratio_to_ideal']:.2f} |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokensieve.scripts.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.md (small files only)")
    ap.add_argument("--dry-run", action="store_true", help="no CUDA calls: compile the harness, time on the CPU")
    ap.add_argument("--tiny", action="store_true", help="a 2-block 64x64 ViT, batches 1,2 (CI)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="time budget of the whole run (default 420 s)")
    ap.add_argument("--recipes", default=None, help="';'-separated recipes instead of the defaults")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32; --tiny 1,2)")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-cuda-graph", action="store_true", help="time eager calls instead of CUDA graph replays")
    ap.add_argument("--compile", action="store_true", help="torch.compile the programs (slow to start)")
    ap.add_argument("--harness-dir", default=None, help="build folder of the harness (default: the user cache)")
    ap.add_argument("--work", default=None, help="folder for the exported .pt2 programs (default: a temporary "
                    "folder, deleted at the end; they are large, so they never go into OUT)")
    ap.add_argument("--skip-kernels", action="store_true", help="only the latency table")
    ap.add_argument("--export-workers", type=int, default=None,
                    help="export processes (default: CPU cores - 4, at most one per export; <= 1: in this process)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report: dict = {"schema": SCHEMA, "command": " ".join(["gpu_check", *(argv if argv is not None else sys.argv[1:])]),
                    "dry_run": args.dry_run, "tiny": args.tiny, "budget_s": args.budget_s, "sections": {}}

    def write() -> None:
        from tokensieve.fileio import write_bytes_atomic, write_json_atomic

        report["seconds"] = budget.total - budget.left()
        write_json_atomic(out / "gpu_check.json", report)
        write_bytes_atomic(out / "gpu_check.md", format_markdown(report).encode())

    def record(name: str, fn, need_s: float = 0, skip: str | None = None):
        """Run one section; its result, status (ok/failed/skipped) and seconds go into the report."""
        if skip is None and need_s > 0 and not budget.fits(need_s):  # need_s=0: bookkeeping, always runs
            skip = f"skipped: {budget.left():.0f} s of the budget left, needs about {need_s:.0f} s"
        if skip is not None:
            report["sections"][name] = {"status": "skipped", "note": skip, "seconds": 0.0}
            write()
            print(f"[gpu_check] {name}: {skip}", flush=True)
            return None
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
            entry = {"status": "ok", "result": result}
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            result = None
            entry = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     "traceback": traceback.format_exc().splitlines()[-8:]}
            print(f"[gpu_check] {name} FAILED: {entry['error']}", flush=True)
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        write()
        return result

    env = record("environment", lambda: environment(args.dry_run))
    if not args.dry_run and not (env or {}).get("cuda_available"):
        print("[gpu_check] torch sees no CUDA GPU; run with --dry-run on a machine without one", flush=True)
        write()
        return 2
    recipes = tuple(r for r in args.recipes.split(";") if r) if args.recipes else (TINY_RECIPES if args.tiny else RECIPES)
    batches = tuple(int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,32")).split(","))
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tokensieve-gpu-check-"))
    exports = Exports(TINY_MODELS if args.tiny else MODELS, recipes, args.tiny, work / "programs",
                      workers=args.export_workers)
    try:
        if not args.skip_kernels:
            kernel_sections(record, budget, args.dry_run, args.harness_dir, exports)
        latency_section(record, budget, exports, dry_run=args.dry_run, tiny=args.tiny, recipes=recipes,
                        batches=batches, dtypes=tuple(args.dtypes.split(",")), blocks=args.blocks or (2 if args.tiny else 4),
                        iters=args.iters or (3 if args.tiny else 20), warmup=2 if args.tiny else 5,
                        cuda_graph=not args.no_cuda_graph, compile_=args.compile)
    finally:
        exports.close()
        if not args.work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    write()
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['seconds']:.0f} s; "
          f"{len(failed)} failed section(s){': ' + ', '.join(failed) if failed else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
