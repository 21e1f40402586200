"""`tokensieve` command line: thin subcommands over tokensieve.api (each docstring is its --help)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

from tokensieve.errors import ConfigError, TokenSieveError
from tokensieve.targets.base import DEFAULT_MAX_BATCH, DEFAULT_PRECISION, DEFAULT_TARGET, PRECISIONS

DEFAULT_RECIPE = "cls-topk@3,6,9:0.7"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- option values

# Upper bounds that no real run reaches; checked when the flags are parsed, before anything is loaded or written.
MAX_BATCH = 65536          # a batch, or an engine profile's largest batch
MAX_COUNT = 1_000_000      # inputs, timing blocks, iterations, warmup runs, candidates
MAX_THREADS = 4096


def int_in(low: int, high: int):
    """argparse type: an integer in [low, high]; argparse turns the ArgumentTypeError into one line, exit 2."""
    def parse(text: str) -> int:
        from tokensieve.manifest import excerpt

        try:
            value = int(text.strip()) if len(text) < 40 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{excerpt(text, 30)} is not an integer; use {low}..{high}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; use {low}..{high}")
        return value
    return parse


def image_size(text: str) -> tuple[int, int]:
    """argparse type: `H` or `H,W` (pixels, 1..65536) -> (H, W)."""
    parts = text.replace("x", ",").split(",") if len(text) < 40 else []
    try:
        size = tuple(int(v.strip()) for v in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or not all(1 <= v <= 65536 for v in size):
        from tokensieve.manifest import excerpt

        raise argparse.ArgumentTypeError(f"{excerpt(text, 30)} is not H or H,W in pixels (1..65536), e.g. 224 or 224,160")
    return (size[0], size[-1])


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """argparse type: a finite number in [low, high] (or (low, high] with low_open); NaN and ±inf are refused."""
    def parse(text: str) -> float:
        from tokensieve.manifest import excerpt

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{excerpt(text, 30)} is not a number") from None
        above = value > low if low_open else value >= low
        if not math.isfinite(value) or not above or value > high:
            bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise argparse.ArgumentTypeError(f"{text.strip()} must be a finite number {bounds}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `tokensieve CMD: error: ...` (exit 2), like every other user error;
    the usage itself is one `--help` away."""

    def error(self, message: str):
        message = " ".join(message.split())
        if len(message) > 140 and " (choose from " in message:  # the list of commands: --help shows it
            message = message.split(" (choose from ")[0]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        if file is sys.stdout and message:  # argparse drops a failed write: --help past `ulimit -f`, into a full
            file.write(message)             # disk or a closed pipe must fail like any other output (main)
            file.flush()
        else:
            super()._print_message(message, file)


class Tool:
    """Base: `name`, a docstring (first paragraph = summary, rest = example), add_args(), run()."""

    name = ""

    def add_args(self, p: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# ----------------------------------------------------------------------------------------- export


class Export(Tool):
    """Export a token-pruned model: ONNX (pruned + dense), verification, engine, benchmark.

    Writes OUT/model.onnx, OUT/model.debug.onnx (+ kept_idx.<block> outputs), OUT/dense.onnx, the engine
    OUT/model.<target>.<precision>.engine(+.json) and OUT/report.json, then prints a summary table. Without the
    TensorRT the target needs, the engine is skipped and the summary says how to get it. Re-exporting into a folder
    removes the engines built there from the earlier export's ONNX (model.*.engine, dense.*.engine and their .json).

        tokensieve export --model default --prune cls-topk@3,6,9:0.7 -o out/
        tokensieve export --model ./my-hf-vit --prune recipe.toml -o out/ --target rtx-sm89 --no-bench
        tokensieve export --model default -o out/ --precision fp16      # fp16 engine (scores stay fp32)
        tokensieve export --model ./dinov2-s --image-size 224 --outputs pooler_output -o out/   # 224x224, pooled
        tokensieve export --model default -o out/ --optimize --precision int8 --calib images/  # ORT-optimized + int8
    """

    name = "export"

    def add_args(self, p):
        p.add_argument("--model", default="default", help="`default` (ViT-S/16-224), `tiny`, or a local HF checkpoint folder")
        p.add_argument("--prune", default=DEFAULT_RECIPE, help=f"recipe shorthand or .toml/.yaml/.json file (default {DEFAULT_RECIPE})")
        p.add_argument("-o", "--output", default="out", help="output folder (default out/)")
        p.add_argument("--target", default=DEFAULT_TARGET,
                       help=f"engine target: rtx-sm75|80|86|89|120|121 or local (default {DEFAULT_TARGET})")
        p.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=DEFAULT_MAX_BATCH,
                       help=f"largest batch of the engine's profile (default {DEFAULT_MAX_BATCH})")
        p.add_argument("--precision", default=DEFAULT_PRECISION.value, choices=PRECISIONS,
                       help=f"engine precision; fp16 keeps scores, TopK inputs, norms, softmax fp32 (default {DEFAULT_PRECISION})")
        p.add_argument("--verify-inputs", type=int_in(1, MAX_COUNT), default=8,
                       help="random inputs compared with eager (default 8)")
        p.add_argument("--atol", type=float_in(0), default=1e-4, help="max abs output difference vs eager (default 1e-4)")
        p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help="ONNX Runtime threads for verify/bench")
        p.add_argument("--no-build", action="store_true", help="skip the TensorRT engine (a re-export still "
                       "removes the engines built in the folder from the earlier export's ONNX)")
        p.add_argument("--plugins", default=None, help="libtokensieve_plugins.so: the engine uses tokensieve's plugins "
                       "(DiversitySelect for divprune/mmr) in place of their standard-op forms")
        add_engine_options(p)
        p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
        p.add_argument("--bench-blocks", type=int_in(1, MAX_COUNT), default=4,
                       help="alternating timing blocks per model (default 4)")
        p.add_argument("--bench-iters", type=int_in(1, MAX_COUNT), default=20, help="timed runs per block (default 20)")
        p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=None, help="batch of a model whose forward fixes "
                       "it (len(x), ints from x.shape[0]): it is exported for this batch only (default 1; other "
                       "models get a dynamic batch)")
        p.add_argument("--outputs", default=None, metavar="NAME[,NAME]", help="the model outputs the ONNX returns, by "
                       "name (logits, pooler_output, image_embeds, last_hidden_state, ...: the model's output fields; "
                       "default the first one the model returns)")
        p.add_argument("--image-size", type=image_size, default=None, metavar="H[,W]", help="export for this input "
                       "size instead of the config's (position embeddings interpolated; a multiple of the patch size)")
        p.add_argument("--optimize", action="store_true", help="also run ONNX Runtime's transformer optimizer on dense "
                       "and pruned (model.opt.onnx, dense.opt.onnx), verified and timed like the export")
        p.add_argument("--calib", default=None, metavar="DIR", help="--precision int8: calibration images (as for "
                       "`tokensieve eval`; default random inputs, with a warning)")
        p.add_argument("--calib-images", type=int_in(1, 4096), default=64, help="at most this many --calib images")

    def run(self, args):
        from tokensieve import api

        if args.calib is not None and args.precision != "int8":
            raise ConfigError(f"--calib calibrates int8; add --precision int8 (got --precision {args.precision})")
        calibration = None
        if args.precision == "int8" and args.calib is None:
            print("warning: no --calib DIR: calibrating int8 on random inputs; ranges from real images give better "
                  "int8", file=sys.stderr)
        elif args.precision == "int8":
            from tokensieve.evaluate import calibration_batches, find_processor_dir, scan_images

            scan_images(args.calib)  # a bad folder fails now, not after the export

            def calibration(shape, folder):  # the export's own preprocessor_config.json
                proc_dir = find_processor_dir(folder, {"model": args.model}, None)
                return calibration_batches(args.calib, proc_dir, tuple(shape[1:]), limit=args.calib_images)

        report = api.export_folder(
            args.model, args.prune, args.output, target=args.target, precision=args.precision,
            max_batch=args.max_batch, plugins=args.plugins, build=not args.no_build, verify_inputs=args.verify_inputs,
            atol=args.atol, threads=args.threads, bench=not args.no_bench, bench_blocks=args.bench_blocks,
            bench_iters=args.bench_iters, progress=_log, batch=args.batch, outputs=args.outputs,
            build_options=engine_options(args),
            image_size=args.image_size, optimize=args.optimize, calibration=calibration)
        print(format_report(report, Path(args.output)))
        return 0


def format_report(r: dict, out: Path) -> str:
    lines = [f"tokensieve: {r['model']}  recipe {r['recipe_shorthand']}", ""]
    compact = any(s.get("options", {}).get("compact") for s in r["stages"])
    counts = [str(r['layout']['num_tokens'])] + [("≤" if s.get("options", {}).get("compact") else "") + str(s['tokens_out'])
                                                 for s in r["stages"]]
    lines.append(f"  tokens          {'→'.join(counts)}  (blocks {', '.join(str(s['after_block']) for s in r['stages']) or '-'}"
                 f" prune{'; ≤: the input-dependent count of compact=true, at most the cap' if compact else ''})")
    lines.append(f"  MACs/sample     dense {r['macs_dense'] / 1e9:.3f} G, pruned {r['macs_pruned'] / 1e9:.3f} G,"
                 f" ideal speedup {r['ideal_speedup']:.2f}x{' (at the cap)' if compact else ''}")
    v = r["verify"]
    status = "PASS" if v["passed"] else "FAIL"
    lines.append(f"  verify          {status}: {v['num_inputs']} inputs, kept indices identical at "
                 f"{sum(v['indices_match'])}/{len(v['indices_match'])} stages, max |diff| {v['max_abs_diff']:.1e}"
                 f" (atol {v['atol']:g}) vs eager, ONNX Runtime CPU")
    lines.append(f"  export          {r['export_seconds']:.1f} s")
    if "build" in r:
        b = r["build"]
        lines.append(f"  engine          {b['flavor']} {b['tensorrt_version']} {b['target']} {b.get('precision', 'fp32')}:"
                     f" {b['size_bytes'] / 2**20:.1f} MiB,"
                     f" built in {b['seconds']:.1f} s")
    elif "engine_skipped" in r:
        from tokensieve.api import engine_hint

        lines.append(f"  engine          none: {engine_hint(r['engine_skipped'], out)}")
    if "bench" in r:
        b = r["bench"]
        lines.append(f"  latency (b={b['batch']})   dense {b['dense']['median_ms']:.2f} ms (p90 {b['dense']['p90_ms']:.2f}),"
                     f" pruned {b['pruned']['median_ms']:.2f} ms (p90 {b['pruned']['p90_ms']:.2f}) on {b['backend']}")
        lines.append(f"  speedup         {b['speedup']:.2f}x measured vs {b['ideal_speedup']:.2f}x MAC-ideal"
                     f" -> ratio {b['ratio_to_ideal']:.2f}")
    if "optimize" in r:
        o, fused = r["optimize"], r["optimize"]["fused"]
        ops = ", ".join(f"{op} {fused['dense'].get(op, 0)}/{fused['model'].get(op, 0)}"
                        for op in sorted(set(fused["dense"]) | set(fused["model"])))
        lines.append(f"  --optimize      fused (dense/pruned): {ops or 'none'}; verify "
                     f"{'PASS' if o['verify']['passed'] else 'FAIL'}, max |diff| {o['verify']['max_abs_diff']:.1e}")
    if "int8" in r:
        q = r["int8"]
        lines.append(f"  int8 vs fp32    kept-token overlap {', '.join(f'{x:.1%}' for x in q['kept_overlap'])}; output "
                     f"cosine min {q['cosine']['min']:.4f} (calibration: {q['calibration']})")
    for key, what in (("bench_optimized", "optimized"), ("bench_int8", "int8")):
        if key in r:
            b = r[key]
            lines.append(f"  {what + ' pair':<16}dense {b['dense']['median_ms']:.2f} ms, pruned {b['pruned']['median_ms']:.2f}"
                         f" ms: {b['speedup']:.2f}x -> ratio {b['ratio_to_ideal']:.2f} of MAC-ideal")
    lines.append("")
    lines.append(f"  wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- verify


class Verify(Tool):
    """Check an export folder against the eager model: kept indices and outputs on random inputs.

        tokensieve verify out/ --inputs 8 --batch 3
    """

    name = "verify"

    def add_args(self, p):
        p.add_argument("folder", help="folder written by `tokensieve export`")
        p.add_argument("--inputs", type=int_in(1, MAX_COUNT), default=8, help="random inputs compared (default 8)")
        p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1, help="batch of each input (default 1)")
        p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=1, help="seed of the random inputs (default 1)")
        p.add_argument("--atol", type=float_in(0), default=1e-4, help="max abs output difference (default 1e-4)")

    def run(self, args):
        from tokensieve import api

        folder = Path(args.folder)
        report = _checked_report(api.read_export_report(folder), folder,
                                 required=("model", "block_paths", "layout", "stages", "input_shape"))
        from tokensieve.benchmark import check_batch_memory

        check_batch_memory(report, args.batch, "--batch")  # before the model loads
        reference, shape, blocks = api.reference_from_report(report)
        ver = api.verify_onnx(reference, shape, blocks, folder / api.ARTIFACTS["debug"], num_inputs=args.inputs,
                              batch=args.batch, seed=args.seed, atol=args.atol,
                              padded=api.pads_output([s["method"] for s in report["stages"]]),
                              progress=lambda m: _log(f"verify: {m}"))
        print(f"{'stage after block':>18}  kept indices")
        for b, ok in zip(ver.stage_blocks, ver.indices_match):
            print(f"{b:>18}  {'identical' if ok else 'DIFFERENT'}")
        print(f"max |output diff| {ver.max_abs_diff:.2e} (atol {ver.atol:g}) over {ver.num_inputs} inputs of batch {ver.batch}: "
              f"{'PASS' if ver.passed else 'FAIL'}")
        api.check_verified(ver)
        return 0


class Optimize(Tool):
    """Run ONNX Runtime's transformer optimizer on an export (pruned and dense alike), verify the result, optionally
    time the optimized pair.

        tokensieve optimize out/ --bench
    """

    name = "optimize"

    def add_args(self, p):
        p.add_argument("folder", help="folder written by `tokensieve export`")
        p.add_argument("--inputs", type=int_in(1, MAX_COUNT), default=8, help="verification inputs")
        p.add_argument("--atol", type=float_in(0), default=1e-4, help="verification tolerance on the outputs")
        p.add_argument("--bench", action="store_true", help="time dense.opt.onnx vs model.opt.onnx (batch 1, ORT CPU)")

    def run(self, args):
        from tokensieve import api

        folder = Path(args.folder)
        out = api.optimize_folder(folder, num_inputs=args.inputs, atol=args.atol)
        fused, ver = out["fused"], out["verify"]
        ops = sorted(set(fused["model"]) | set(fused["dense"]))
        print(f"{'fused op':>26}  dense  pruned")
        for op in ops:
            print(f"{op:>26}  {fused['dense'].get(op, 0):>5}  {fused['model'].get(op, 0):>6}")
        print(f"verify            PASS: kept indices identical at {len(ver.stage_blocks)} stage(s), max |diff| "
              f"{ver.max_abs_diff:.1e} (atol {ver.atol:g}) over {ver.num_inputs} inputs")
        return _copies_written(folder, api.OPTIMIZED, args.bench)


class Quantize(Tool):
    """int8 copies of an export for ONNX Runtime (QDQ; each stage's score math stays float), compared with fp32:
    kept-token overlap and output cosine. Calibrate on your images; without --calib, random inputs (a warning).

        tokensieve quantize out/ --calib images/ --bench
    """

    name = "quantize"

    def add_args(self, p):
        p.add_argument("folder", help="folder written by `tokensieve export`")
        p.add_argument("--calib", default=None, metavar="DIR", help="calibration images (as for `tokensieve eval`)")
        p.add_argument("--calib-images", type=int_in(1, 4096), default=64, help="at most this many images")
        p.add_argument("--processor", default=None, help="folder with the model's preprocessor_config.json")
        p.add_argument("--bench", action="store_true", help="time dense.int8.onnx vs model.int8.onnx (batch 1)")
        p.add_argument("--symmetric", action="store_true", help="zero points 0 (what `tokensieve build --precision "
                       "int8` needs for TensorRT)")

    def run(self, args):
        from tokensieve import api

        folder = Path(args.folder)
        calibration = None
        if args.calib is None:
            print("warning: no --calib DIR: calibrating on random inputs; ranges from real images give better int8",
                  file=sys.stderr)
        else:
            from tokensieve.evaluate import calibration_batches, find_processor_dir

            report = api.read_export_report(folder, required=("input_shape",))
            calibration = calibration_batches(args.calib, find_processor_dir(folder, report, args.processor),
                                              tuple(report["input_shape"][1:]), limit=args.calib_images)
        out = api.quantize_folder(folder, calibration, symmetric=args.symmetric)
        overlap = ", ".join(f"{o:.1%}" for o in out["kept_overlap"])
        print(f"int8 (ORT QDQ)    calibration: {out['calibration']}; {out['float_score_nodes']} score nodes kept float")
        print(f"vs fp32           kept-token overlap per stage {overlap}; output cosine min {out['cosine']['min']:.4f}"
              f", mean {out['cosine']['mean']:.4f}")
        return _copies_written(folder, api.QUANTIZED, args.bench)


def _copies_written(folder: Path, names: dict[str, str], bench: bool) -> int:
    """After `optimize` / `quantize`: with `bench`, time the export's dense vs pruned copies `names` (api.OPTIMIZED /
    api.QUANTIZED) at batch 1; print what was written."""
    from tokensieve import api

    if bench:
        b = api.bench(folder / names["dense"], folder / names["model"],
                      ideal_speedup=api.read_export_report(folder).get("ideal_speedup"))
        ratio = f" -> ratio {b.ratio_to_ideal:.2f}" if b.ratio_to_ideal else ""
        print(f"latency (b=1)     {names['dense']} {b.dense['median_ms']:.2f} ms (p90 {b.dense['p90_ms']:.2f}), "
              f"{names['model']} {b.pruned['median_ms']:.2f} ms (p90 {b.pruned['p90_ms']:.2f}); speedup "
              f"{b.speedup:.2f}x{ratio}")
    print(f"wrote {folder}/: {', '.join(names.values())}")
    return 0


# ----------------------------------------------------------------------------------------- build


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The engine options trtexec / Polygraphy users expect (`build` and `export`); engine_options reads them back."""
    p.add_argument("--opt-batch", type=int_in(1, MAX_BATCH), default=1,
                   help="batch the engine is tuned for, within 1..--max-batch (default 1)")
    p.add_argument("--timing-cache", default=None, metavar="PATH", help="timing cache file reused and updated across "
                   "builds (created if missing; standard TensorRT, --target local)")
    p.add_argument("--workspace", type=int_in(1, 1 << 30), default=None, metavar="MiB",
                   help="builder workspace limit in MiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--builder-opt-level", type=int_in(0, 5), default=None, metavar="0..5",
                   help="builder optimization level: higher builds longer for faster kernels (TensorRT's default 3)")
    p.add_argument("--layer-info", default=None, metavar="PATH", help="write the engine inspector's per-layer JSON "
                   "(layers, precisions, tactics) here; needs the GPU the engine is for")


def engine_options(args: argparse.Namespace) -> dict:
    """api.build's keywords for the add_engine_options flags."""
    return {"opt_batch": args.opt_batch, "timing_cache": args.timing_cache, "workspace_mib": args.workspace,
            "builder_optimization_level": args.builder_opt_level, "layer_info": args.layer_info}


class Build(Tool):
    """Build a TensorRT-RTX (ahead of time, no GPU needed) or TensorRT engine from an ONNX file.

        tokensieve build out/model.onnx --target rtx-sm89       # -> out/model.rtx-sm89.fp32.engine
        tokensieve build out/model.onnx --target local          # standard TensorRT on this GPU (Jetson Orin: sm87)
        tokensieve build out/model.onnx --target local --timing-cache trt.cache --opt-batch 4 --layer-info layers.json
        tokensieve build out/model.onnx --precision fp16        # fp16 weights/activations, fp32 scores and norms
        tokensieve build compact.onnx --plugins libtokensieve_plugins.so --embed-plugins
        tokensieve build vlm/lm_prefill.onnx --dims sequence=1:64:512,past_sequence=0:64:1024
    """

    name = "build"

    def add_args(self, p):
        p.add_argument("onnx", help="the ONNX file to build (an export's model.onnx, model.int8.onnx, a VLM part)")
        p.add_argument("-o", "--output", default=None, help="engine path (default: next to the ONNX, named per target "
                       "and precision: model.rtx-sm86.fp32.engine; from an export folder's ONNX, listed in its report)")
        p.add_argument("--target", default=DEFAULT_TARGET, help="rtx-sm75|80|86|89|120|121 (TensorRT-RTX, no GPU "
                       f"needed) or local (TensorRT on this GPU, e.g. a Jetson's) (default {DEFAULT_TARGET})")
        p.add_argument("--precision", default=DEFAULT_PRECISION.value, choices=PRECISIONS,
                       help=f"engine precision (default {DEFAULT_PRECISION})")
        p.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=DEFAULT_MAX_BATCH,
                       help=f"largest batch of the engine's profile (default {DEFAULT_MAX_BATCH})")
        p.add_argument("--plugins", default=None, help="libtokensieve_plugins.so for graphs with tokensieve plugin nodes "
                       "(build it with `python -m tokensieve.targets.tensorrt.plugins`)")
        p.add_argument("--embed-plugins", action="store_true", help="serialize the plugin library into the engine")
        p.add_argument("--dims", default=None, help="ranges of dynamic dims other than batch, by ONNX dim name: "
                       "NAME=MIN:OPT:MAX,... e.g. sequence=1:64:512,past_sequence=0:64:1024 (names no input has "
                       "are ignored)")
        add_engine_options(p)

    def run(self, args):
        from tokensieve import api
        from tokensieve.targets.base import parse_dims

        dims = parse_dims(args.dims) if args.dims is not None else None
        info = api.build(args.onnx, args.output, target=args.target, precision=args.precision, max_batch=args.max_batch,
                         plugin_library=args.plugins, embed_plugins=args.embed_plugins, dims=dims,
                         **engine_options(args))
        m = info.metadata
        print(f"built {info.engine_path} ({info.size_bytes / 2**20:.1f} MiB) with {m['flavor']} {m['tensorrt_version']}"
              f" for {m['target']} ({m['precision']}) in {info.build_seconds:.1f} s; metadata {info.metadata_path}")
        return 0


# ----------------------------------------------------------------------------------------- bench


class Bench(Tool):
    """Time dense vs pruned per batch size (ONNX Runtime or TensorRT); print a markdown table, write JSON/MD/PNG.

    Alternating blocks with one session/engine resident at a time; median/p90/p99, images/s, peak memory, speedup
    vs the MAC-ideal one. --backend tensorrt times the model engine report.json lists last (model.<target>.<precision>
    .engine) vs dense.onnx's engine of the same target and precision (built once, like it, when missing). --sweep re-exports the model with one stage's keep varied (latency vs tokens).

        tokensieve bench out/                                   # out/dense.onnx vs out/model.onnx, batch 1
        tokensieve bench out/ --batch 1,8,32 --json b.json --md b.md --plot b.png
        tokensieve bench out/ --backend tensorrt --batch 1,8 --cuda-graph
        tokensieve bench out/ --backend torch --device cuda --dtype fp16 --cuda-graph   # out/dense.pt2 vs model.pt2
        tokensieve bench out/ --sweep 0.3,0.5,0.7,0.9 --sweep-stage 0 --plot b.png
    """

    name = "bench"

    def add_args(self, p):
        p.add_argument("folder", help="folder written by `tokensieve export`")
        p.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1), e.g. 1,8,32")
        p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or torch (the "
                       "programs api.save(..., parts=('torch',)) writes)")
        p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help="ONNX Runtime intra-op threads")
        p.add_argument("--plugins", default=None, help="libtokensieve_plugins.so for engines with tokensieve plugins")
        p.add_argument("--cuda-graph", action="store_true", help="TensorRT, torch: replay one CUDA graph per batch size")
        p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="torch backend: where to run "
                       "(default cuda when torch sees a GPU, else cpu)")
        p.add_argument("--dtype", default=None, choices=["fp32", "fp16"], help="torch backend: precision (default fp32)")
        p.add_argument("--blocks", type=int_in(1, MAX_COUNT), default=4,
                       help="alternating timing blocks per model (default 4)")
        p.add_argument("--iters", type=int_in(1, MAX_COUNT), default=20, help="timed runs per block (default 20)")
        p.add_argument("--warmup", type=int_in(0, MAX_COUNT), default=5, help="untimed runs before each block (default 5)")
        p.add_argument("--sweep", default=None, help="keep values for a token sweep of one stage, e.g. 0.3,0.5,0.7")
        p.add_argument("--sweep-stage", type=int_in(0, 100_000), default=0,
                       help="recipe stage the sweep varies (0-based, default 0)")
        p.add_argument("--sweep-batch", type=int_in(1, MAX_BATCH), default=None,
                       help="batch of the sweep (default: the first --batch)")
        p.add_argument("--json", default=None, help="write the full result (all stats) to this JSON file")
        p.add_argument("--md", default=None, help="write the markdown table to this file")
        p.add_argument("--plot", default=None, help="write PNG plots to this file (needs tokensieve[plot])")

    def run(self, args):
        from tokensieve import benchmark

        if args.plot:
            benchmark.require_matplotlib()  # before minutes of timing, not after
        settings = benchmark.BenchSettings(
            backend=args.backend, batches=benchmark.parse_batches(args.batch), blocks=args.blocks, iters=args.iters,
            warmup=args.warmup, threads=args.threads, plugins=args.plugins, cuda_graph=args.cuda_graph,
            device=args.device, dtype=args.dtype,
            sweep=benchmark.parse_sweep(args.sweep) if args.sweep else (), sweep_stage=args.sweep_stage,
            sweep_batch=args.sweep_batch)
        result = benchmark.bench_folder(args.folder, settings, progress=lambda m: _log(f"      {m}"))
        benchmark.write_outputs(result, json_path=args.json, md_path=args.md, png_path=args.plot)
        print(benchmark.format_markdown(result), end="")
        return 0


# ----------------------------------------------------------------------------------------- inspect


def _engine_file_checked(meta: dict) -> str:
    """What check_engine_file compared, for a metadata file it accepted."""
    size, sha = meta["engine_size_bytes"] is not None, meta["engine_sha256"] is not None  # None: version 1
    if size and sha:
        return "OK (size, sha256 match)"
    if size or sha:
        return f"OK ({'size' if size else 'sha256'} matches; the metadata records no {'sha256' if size else 'size'})"
    return "not checked (the metadata records no size or sha256; rebuild with `tokensieve build` to add them)"


def _check_file(folder: Path, name: str) -> tuple[str, bool]:
    """(status text, present) of the file `name` in `folder`."""
    return (name, True) if (folder / name).is_file() else (f"{name}: MISSING", False)


def _check_engine(folder: Path, name: str) -> tuple[str, bool]:
    """(status text, ok) of the engine `name` in `folder`: its target/precision/size and whether the file matches its
    metadata, or what is wrong (missing, no metadata, mismatched)."""
    from tokensieve.errors import TokenSieveError
    from tokensieve.runtime.engine_metadata import check_engine_file, read_engine_metadata

    path = folder / name
    if not path.is_file():
        return _check_file(folder, name)
    try:
        meta = read_engine_metadata(path)
        check_engine_file(path, meta)
    except TokenSieveError as e:
        return f"{name}: PROBLEM: {e}", False
    size = path.stat().st_size  # check_engine_file compared it with the metadata's size
    return (f"{name}: {meta['flavor']} {meta['tensorrt_version']} {meta['target']} {meta['precision']}, "
            f"{size / 2**20:.1f} MiB, file {_engine_file_checked(meta)}"), True


def _checked_report(report: dict, folder: Path, required: tuple[str, ...] = ()) -> dict:
    """report.json with the `required` fields present and the types of the fields verify / inspect read checked (a
    hand-edited one: one line, not a KeyError)."""
    from tokensieve.manifest import EXPORT_REPORT_TYPES, check_field_types

    missing = [k for k in required if k not in report]
    if missing:
        raise ConfigError(f"{str(folder / 'report.json')!r} lacks {', '.join(missing)}; re-run `tokensieve export`")
    check_field_types(report, EXPORT_REPORT_TYPES, repr(str(folder / "report.json")), "re-run `tokensieve export`")
    return report


def _inspect_folder(folder: Path) -> int:
    """Summarize an export folder: a ViT export (report.json) or a VLM export (its parts manifest); 1 if a file it
    lists is missing or an engine does not match its metadata."""
    from tokensieve import api
    from tokensieve.manifest import VLM_MANIFEST_NAMES, find_vlm_manifest, read_vlm_manifest, verification_line

    problems = 0

    def line(label: str, text: str, ok: bool = True) -> None:
        nonlocal problems
        problems += not ok
        print(f"  {label:<14}{text}")

    if (folder / api.ARTIFACTS["report"]).is_file():
        r = _checked_report(api.read_export_report(folder, required=("model", "recipe_shorthand", "tokens_per_block",
                                                                     "ideal_speedup", "verify", "engines")), folder)
        print(f"{folder}: ViT export of {r['model']!r}, recipe {r['recipe_shorthand']}")
        tokens = r["tokens_per_block"]
        line("tokens", "→".join(str(t) for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1])
             + f" over {len(tokens)} blocks; ideal speedup {r['ideal_speedup']:.2f}x")
        v = r["verify"]
        line("verify", f"{'PASS' if v['passed'] else 'FAILED verification'}: {v['num_inputs']} inputs, max |diff| "
                       f"{v['max_abs_diff']:.1e} (atol {v['atol']})", ok=bool(v["passed"]))
        for key in ("model", "debug", "dense"):
            line(key, *_check_file(folder, api.ARTIFACTS[key]))
        for entry in r["engines"]:  # the export's engine and those `tokensieve build` / bench added since
            line("engine", *_check_engine(folder, entry["file"]))
        if not r["engines"]:
            line("engine", f"none: {api.engine_hint(r['engine_skipped'], folder)}" if r.get("engine_skipped") else
                 f"none (exported with --no-build; add one with `tokensieve build {folder / api.ARTIFACTS['model']}`)")
        return 1 if problems else 0
    path = find_vlm_manifest(folder)
    if path is None:
        raise ConfigError(f"{str(folder)!r} holds no report.json (tokensieve export) or VLM manifest "
                          f"({' / '.join(VLM_MANIFEST_NAMES)}: tokensieve export-vlm); pass an export folder, "
                          "an .onnx or an .engine file")
    m = read_vlm_manifest(folder, path.name)  # one schema for every family; an older one: re-export, one line
    grid = f", grid {tuple(m.grid_thw)}" if m.grid_thw else ""
    print(f"{folder}: {m.model_type} {m.modality} parts{grid} ({path.name})")
    prune = f"{m.prune} (keeps {m.keep} of {m.image_tokens} {m.modality} tokens)"
    if m.options:
        prune += " " + json.dumps(m.options, separators=(",", ":"))
    line("outer", prune)
    if m.inner:
        line("inner", json.dumps(m.inner, separators=(",", ":")))
    line("verify", *verification_line(m.verification))  # PASS / FAILED verification (exit 1) / UNVERIFIED
    engines = m.engines
    for part, file in m.files.items():
        if part == "manifest":
            continue
        text, ok = _check_file(folder, file)
        if part in engines:
            engine, engine_ok = _check_engine(folder, engines[part]["file"])
            text, ok = f"{text}; engine {engine}", ok and engine_ok
        line(part, text, ok)
    if not engines:
        line("engines", "none (exported with --no-build)")
    return 1 if problems else 0


class Inspect(Tool):
    """Summarize an ONNX model (I/O, op census, pruning stages), an engine's metadata (checking the engine file), or
    an export folder (what `tokensieve export` / `export-vlm` wrote: recipe, tokens, verification, files, engines
    checked against their metadata; exit 1 if one is missing or does not match).

        tokensieve inspect out/model.onnx
        tokensieve inspect out/model.rtx-sm86.fp32.engine
        tokensieve inspect out/
    """

    name = "inspect"

    def add_args(self, p):
        p.add_argument("path", help="an export folder, an .onnx file or an .engine file")

    def run(self, args):
        path = Path(args.path)
        if path.is_dir():
            return _inspect_folder(path)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise ConfigError(f"{str(path)!r} {what}; pass an .onnx or .engine file or an export folder")
        if path.suffix == ".engine":
            from tokensieve.runtime.engine_metadata import check_engine_file, read_engine_metadata

            meta = read_engine_metadata(path)
            check_engine_file(path, meta)  # the same refusal as TrtRunner and `bench --backend tensorrt`
            print(json.dumps(meta, indent=2))
            _log(f"engine file: {_engine_file_checked(meta)}")  # stderr: stdout stays the metadata JSON
            return 0
        import onnx

        from tokensieve.graph_passes.onnx.check_static import op_census

        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}); re-export it") from e

        if not (m.graph.node or m.graph.input or m.graph.output):  # an empty file parses as an empty ModelProto
            raise ConfigError(f"{str(path)!r} holds no ONNX graph (empty or not an ONNX file); re-export it")

        def io(vs):
            return [f"{v.name} {[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}" for v in vs]

        print(f"{path}: opset {max((o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')), default='?')}, "
              f"{len(m.graph.node)} nodes")
        print("  inputs:  " + "; ".join(io(m.graph.input)))
        print("  outputs: " + "; ".join(io(m.graph.output)))
        census = op_census(m)
        print("  ops:     " + ", ".join(f"{k}×{v}" for k, v in census.most_common()))
        print(f"  pruning: {census.get('TopK', 0)} TopK, {census.get('GatherElements', 0)} GatherElements")
        return 0


# ----------------------------------------------------------------------------------------- methods


class Methods(Tool):
    """List the pruning methods a recipe can use, with their parameters and papers.

        tokensieve methods
    """

    name = "methods"

    def run(self, args):
        from tokensieve.graph_passes.methods.registry import METHODS

        for m in METHODS.values():
            w = max(len(n) for n in METHODS) + 2
            print(f"{m.name:<{w}}{m.summary}")
            where = "; video only (Qwen2-VL export-vlm --grid T,H,W)" if m.video else ""
            print(f"{'':<{w}}paper: {m.paper}; needs [CLS]: {'yes' if m.requires_cls else 'no'}; reduce: {m.reduce.value}"
                  f"{where}")
            for prm in m.params:
                print(f"{'':<{w}}{prm.name} = {prm.default!r}: {prm.help}")
        print(f"\nrecipe shorthand: METHOD@BLOCKS:KEEP, e.g. {DEFAULT_RECIPE} (0-based blocks; KEEP ratio 0<r<=1 or a count)")
        return 0


# ----------------------------------------------------------------------------------------- tune


class Tune(Tool):
    """Snap each stage's K to the target's latency staircase: more tokens for the same time, never slower than dense.

        tokensieve tune --model default --prune cls-topk@3,6,9:0.7 -o tuned.toml --json tune.json --plot tune.png
        tokensieve export --model default --prune tuned.toml -o out/     # export the chosen recipe
        # per stage: one block timed at each candidate K (±--window of the patches); then dense, requested and
        # snapped in one alternating run; -o is written only if the snapped recipe beats dense
        tokensieve tune --model ./my-vit --images val/ --max-drop 0.5 -o tuned.toml   # accuracy budget (pp)
        # --images: sweeps --methods x --keeps x --after-blocks (until --time-budget), accuracy on DIR (top-1 with
        # DIR/<class>/*, else agreement with dense), all timed against dense in one alternating run; writes the
        # Pareto front (tuned.pareto.json/.md/.png, or --json/--md/--plot) and the fastest recipe within the budget
        # that beats dense (checked on ONNX Runtime); none: dense, and no -o file
    """

    name = "tune"
    IMAGES_ONLY = ("max_drop", "methods", "keeps", "after_blocks", "time_budget", "processor", "md")

    def add_args(self, p):
        p.add_argument("--model", default="default", help="`default` (ViT-S/16-224), `tiny`, or a local HF checkpoint folder")
        p.add_argument("--prune", default=None, help=f"recipe shorthand or file to tune (default {DEFAULT_RECIPE})")
        p.add_argument("-o", "--output", default="tuned.toml", help="snapped recipe file, .toml/.json/.yaml (default tuned.toml)")
        p.add_argument("--images", default=None, help="image folder (DIR/<class>/*.png|jpg, or DIR/*.png): sweep "
                       "recipes for the fastest within --max-drop of dense's accuracy")
        p.add_argument("--max-drop", type=float_in(0, 100), default=None,
                       help="--images: accuracy budget, percentage points below dense (default 0.5)")
        p.add_argument("--methods", default=None, help="--images: methods to sweep, comma-separated (default "
                       "cls-topk,attn-mean,tome,divprune)")
        p.add_argument("--keeps", default=None, help="--images: keep ratios to sweep (default 0.5,0.7,0.9)")
        p.add_argument("--after-blocks", nargs="+", default=None, metavar="BLOCKS", help="--images: stage blocks to "
                       "sweep, one candidate set each, e.g. 3 3,6,9 (default: 1/4 of the depth, and 1/4,1/2,3/4)")
        p.add_argument("--time-budget", type=float_in(0, low_open=True), default=None,
                       help="--images: start no candidate after this many seconds (default 600)")
        p.add_argument("--processor", default=None, help="--images: folder with the model's preprocessor_config.json "
                       "(default: the model folder)")
        p.add_argument("--md", default=None, help="--images: the front as markdown (default <-o stem>.pareto.md)")
        p.add_argument("--window", type=float_in(0, 1, low_open=True), default=0.1,
                       help="candidate K within ± this fraction of the patches (default 0.1)")
        p.add_argument("--candidates", type=int_in(2, 10_000), default=21, help="at most this many K per stage (default 21)")
        p.add_argument("--tol", type=float_in(0), default=0.02, help="relative latency tolerance of one step (default 0.02)")
        p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1, help="batch the latency is measured at (default 1)")
        p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help="ONNX Runtime threads")
        p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                       help="time on ONNX Runtime (default) or on TensorRT engines built per candidate (needs a GPU)")
        p.add_argument("--target", default="local", help="tensorrt backend: local (TensorRT, this GPU; default) or "
                       "rtx-smXX (TensorRT-RTX for this GPU's SM)")
        p.add_argument("--precision", default=DEFAULT_PRECISION.value, choices=PRECISIONS, help="tensorrt backend engine precision")
        p.add_argument("--plugins", default=None, help="tensorrt backend: libtokensieve_plugins.so (plugin substitution)")
        p.add_argument("--cuda-graph", action="store_true", help="tensorrt backend: replay CUDA graphs")
        p.add_argument("--sweep-blocks", type=int_in(1, MAX_COUNT), default=4,
                       help="alternating blocks of the per-stage sweep (default 4)")
        p.add_argument("--sweep-iters", type=int_in(1, MAX_COUNT), default=20,
                       help="timed runs per block in the sweep (default 20)")
        p.add_argument("--blocks", type=int_in(1, MAX_COUNT), default=4, help="alternating blocks of the final run (default 4)")
        p.add_argument("--iters", type=int_in(1, MAX_COUNT), default=20, help="timed runs per block in the final run (default 20)")
        p.add_argument("--warmup", type=int_in(0, MAX_COUNT), default=5, help="untimed runs before each block (default 5)")
        p.add_argument("--json", default=None, help="also write the report to this JSON file (--images: the front, "
                       "default <-o stem>.pareto.json)")
        p.add_argument("--plot", default=None, help="write the per-stage latency staircase as PNG (needs tokensieve[plot]; "
                       "--images: latency vs accuracy, default <-o stem>.pareto.png when matplotlib is there)")

    def run(self, args):
        import torch

        from tokensieve.fileio import write_json_atomic
        from tokensieve.models import load_model
        from tokensieve.recipe import parse_recipe
        from tokensieve.tune import (OrtRunnerFactory, TrtRunnerFactory, check_recipe_path, format_tune, plot_tune,
                                     save_recipe, tune)

        if args.images is None:
            given = [k for k in self.IMAGES_ONLY if getattr(args, k) is not None]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} applies to the accuracy sweep only; add --images DIR")
            recipe = parse_recipe(args.prune or DEFAULT_RECIPE)
        elif args.prune is not None:
            raise ConfigError("--images sweeps recipes itself (--methods, --keeps, --after-blocks); drop --prune")
        check_recipe_path(args.output)
        if args.backend == "tensorrt":
            factory = sweep_factory = _tensorrt_factory(args, TrtRunnerFactory)
        else:
            factory, sweep_factory = OrtRunnerFactory(args.threads), OrtRunnerFactory(args.threads, spinning=False)
        if args.images is not None:
            from tokensieve.pareto import run_images

            return run_images(args, factory, _log)
        if args.plot:  # a missing matplotlib fails now, not after the sweep
            from tokensieve.benchmark import require_matplotlib

            require_matplotlib()
        model, shape = load_model(args.model)
        report = tune(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), recipe,
                          model_name=str(args.model), runner_factory=factory,
                          sweep_runner_factory=sweep_factory, batch=args.batch,
                          window=args.window, max_candidates=args.candidates, tol=args.tol,
                          sweep_blocks=args.sweep_blocks, sweep_iters=args.sweep_iters, sweep_warmup=args.warmup,
                          blocks=args.blocks, iters=args.iters, warmup=args.warmup, progress=_log)
        save_recipe(report, args.output)
        d = report.to_dict()
        if args.json:
            write_json_atomic(args.json, d)
        if args.plot:
            plot_tune(d, args.plot)
        print(format_tune(d))
        return 0


def _tensorrt_factory(args, factory_cls):
    """Check the TensorRT options before the sweep: target, plugin file, and a GPU to run the engines on."""
    from tokensieve.runtime.tensorrt_flavors import local_compute_capability
    from tokensieve.targets.base import BuildSpec

    BuildSpec(target=args.target, precision=args.precision, max_batch=max(args.batch, 1))  # one-line errors
    if args.plugins and not Path(args.plugins).is_file():
        raise ConfigError(f"--plugins {args.plugins!r} does not exist; build it with "
                          "`python -m tokensieve.targets.tensorrt.plugins`")
    if local_compute_capability() is None:
        raise ConfigError("tune --backend tensorrt times engines on this machine's GPU and none was found; "
                          "run it on the target GPU, or use --backend onnxruntime")
    return factory_cls(target=args.target, precision=args.precision, max_batch=max(args.batch, 1),
                       plugins=args.plugins, cuda_graph=args.cuda_graph)


# ----------------------------------------------------------------------------------------- visualize


class Visualize(Tool):
    """Draw which patches each pruning stage keeps on an image (eager model, no ONNX run), one panel per stage.

        tokensieve visualize cat.png --model default --prune cls-topk@3,6,9:0.7 -o kept.png
        # resized to the model's input, normalized with its mean/std (else 0.5/0.5); dropped patches dimmed;
        # needs matplotlib (pip install tokensieve[plot]); JPEG needs Pillow
    """

    name = "visualize"

    def add_args(self, p):
        p.add_argument("image", help="PNG (or JPEG with Pillow) image")
        p.add_argument("--model", default="default", help="`default` (ViT-S/16-224), `tiny`, or a local HF checkpoint folder")
        p.add_argument("--prune", default=DEFAULT_RECIPE, help=f"recipe shorthand or file (default {DEFAULT_RECIPE})")
        p.add_argument("-o", "--output", default="kept.png", help="output PNG (default kept.png)")
        p.add_argument("--json", default=None, help="also write kept positions and patches per stage to this JSON file")

    def run(self, args):
        from tokensieve.models import load_model, model_dir
        from tokensieve.recipe import parse_recipe
        from tokensieve.visualize import visualize

        recipe = parse_recipe(args.prune)
        model, _ = load_model(args.model)
        s = visualize(model, recipe, args.image, args.output, model_name=str(args.model),
                          model_dir=model_dir(args.model))
        if args.json:
            from tokensieve.fileio import write_json_atomic

            write_json_atomic(args.json, s)
        print(f"wrote {s['output']}: patches kept per stage {' → '.join(map(str, s['kept_patches']))} "
              f"of a {s['grid'][0]}x{s['grid'][1]} grid ({s['recipe']})")
        return 0


# ----------------------------------------------------------------------------------------- eval


class Eval(Tool):
    """Accuracy of an export on your images: model.onnx vs dense.onnx on ONNX Runtime, with 95 percent confidence intervals.

        tokensieve eval out/ --images val/            # val/<class>/*.png|jpg: top-1/top-5 + agreement with dense
        tokensieve eval out/ --images unlabelled/     # unlabelled/*.png: top-1 agreement with dense only
        # preprocessed by the model's own image processor (preprocessor_config.json in OUT, the exported model's
        # folder, or --processor DIR); class folders named after the model's id2label labels take those ids,
        # other names take their sorted position
    """

    name = "eval"

    def add_args(self, p):
        p.add_argument("folder", help="export folder (tokensieve export -o)")
        p.add_argument("--images", required=True, help="image folder: DIR/<class>/*.png|jpg (labels) or DIR/*.png")
        p.add_argument("--processor", default=None, help="folder with the model's preprocessor_config.json")
        p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=32, help="images per ONNX Runtime call (default 32)")
        p.add_argument("--limit", type=int_in(1, 10**9), default=None, help="evaluate only the first N images")
        p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help="ONNX Runtime threads")
        p.add_argument("--json", default=None, help="also write the result to this JSON file")

    def run(self, args):
        from tokensieve.evaluate import evaluate, format_result

        r = evaluate(args.folder, args.images, processor=args.processor, batch=args.batch, threads=args.threads,
                     limit=args.limit, progress=_log)
        if args.json:
            from tokensieve.fileio import write_json_atomic

            write_json_atomic(args.json, r)
        print(format_result(r))
        return 0


from tokensieve.cli_vlm import ExportVlm  # noqa: E402 - kept beside its wiring

TOOLS = [Export(), Verify(), Optimize(), Quantize(), Build(), Bench(), Inspect(), Methods(), Tune(), Visualize(), Eval(), ExportVlm()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokensieve", description="Compile token-pruned vision transformers to ONNX and TensorRT engines.")
    from tokensieve import __version__

    parser.add_argument("--version", action="version", version=f"tokensieve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for tool in TOOLS:
        doc = textwrap.dedent(tool.__doc__ or "").strip()
        summary, _, rest = doc.partition("\n\n")
        p = sub.add_parser(tool.name, help=summary, description=summary, epilog="examples:\n" + textwrap.indent(textwrap.dedent(rest), "  ") if rest else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        tool.add_args(p)
        p.set_defaults(tool=tool, subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    _buffer_stdout()
    for stream in (sys.stdout, sys.stderr):  # an ASCII terminal (LANG=C, PYTHONIOENCODING=ascii) gets '?' for '→'
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    prog = "tokensieve"  # the error line's prefix: `tokensieve CMD` once the command is known
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # named after the subcommand, like its other usage errors (parse_args would say `tokensieve:`)
                (getattr(args, "subparser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # --help / --version (0) or a usage error, already printed in one line (2): returned
            return e.code if isinstance(e.code, int) else 2
        if not getattr(args, "tool", None):
            parser.print_help()
            return 2
        prog = f"tokensieve {args.command}"
        code = args.tool.run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return code
    except TokenSieveError as e:  # one line, whatever the message quoted
        print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokensieve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tokensieve … | head`: the reader left; stop quietly, as a SIGPIPE-killed tool would
        _drop_stdout()
        return 141
    except OSError as e:  # `tokensieve inspect OUT > /dev/full`: the output cannot be written (files: fileio's lines)
        if e.errno not in _OUTPUT_FAULTS:
            raise
        from tokensieve.fileio import write_error

        _drop_stdout()  # what is still buffered would fail again at exit, as "Exception ignored" + a traceback
        where = e.filename if e.filename is not None else "<standard output>"
        print(f"{prog}: error: {write_error(e, where)}", file=sys.stderr)
        return 2


_OUTPUT_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}  # a full disk, quota, ulimit -f, an I/O error


def _buffer_stdout() -> None:
    """Under PYTHONUNBUFFERED (python -u) stdout's text layer writes straight to the file and drops, without an error,
    what a short write left (the part of a long --help past `ulimit -f`). Put a line-buffered BufferedWriter under it
    (on fd 1, which it never closes): its flush writes the rest, and so meets EFBIG / ENOSPC (main's one line)."""
    import io

    raw = getattr(sys.stdout, "buffer", None)
    if sys.stdout is sys.__stdout__ and isinstance(raw, io.FileIO) and not raw.closed and raw.writable():
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(raw.fileno(), "w", closefd=False)),
                                      encoding=sys.stdout.encoding, errors=sys.stdout.errors, line_buffering=True)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered succeeds quietly."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
