"""`tokensieve` command line: thin subcommands over tokensieve.api (each docstring is its --help)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from tokensieve.errors import ConfigError, TokenSieveError

DEFAULT_RECIPE = "cls-topk@3,6,9:0.7"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Tool:
    """Base: `name`, a docstring (first paragraph = summary, rest = example), add_args(), run()."""

    name = ""

    def add_args(self, p: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _tokens_line(tokens: list[int]) -> str:
    return "→".join(str(t) for t in tokens)


# ----------------------------------------------------------------------------------------- export


class Export(Tool):
    """Export a token-pruned model: ONNX (pruned + dense), verification, engine, benchmark.

    Writes OUT/model.onnx, OUT/model.debug.onnx (+ kept_idx.<block> outputs), OUT/dense.onnx,
    OUT/model.engine(+.json) and OUT/report.json, then prints a summary table.

        tokensieve export --model default --prune cls-topk@3,6,9:0.7 -o out/
        tokensieve export --model ./my-hf-vit --prune recipe.toml -o out/ --target rtx-sm89 --no-bench
    """

    name = "export"

    def add_args(self, p):
        p.add_argument("--model", default="default", help="`default` (ViT-S/16-224), `tiny`, or a local HF checkpoint folder")
        p.add_argument("--prune", default=DEFAULT_RECIPE, help=f"recipe shorthand or .toml/.yaml/.json file (default {DEFAULT_RECIPE})")
        p.add_argument("-o", "--output", default="out", help="output folder (default out/)")
        p.add_argument("--target", default="rtx-sm86", help="engine target: rtx-sm75|80|86|89|120|121 or local (default rtx-sm86)")
        p.add_argument("--max-batch", type=int, default=8, help="largest batch of the engine's profile (default 8)")
        p.add_argument("--verify-inputs", type=int, default=8, help="random inputs compared with eager (default 8)")
        p.add_argument("--atol", type=float, default=1e-4, help="max abs output difference vs eager (default 1e-4)")
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for verify/bench")
        p.add_argument("--no-build", action="store_true", help="skip the TensorRT engine")
        p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
        p.add_argument("--bench-blocks", type=int, default=4, help="alternating timing blocks per model (default 4)")
        p.add_argument("--bench-iters", type=int, default=20, help="timed runs per block (default 20)")

    def run(self, args):
        from tokensieve.fileio import ensure_writable_dir
        from tokensieve.recipe import parse_recipe

        recipe = parse_recipe(args.prune)
        if not args.no_build:  # a bad --target/--max-batch fails now, not after the export
            from tokensieve.targets.tensorrt import BuildSpec

            BuildSpec(target=args.target, max_batch=args.max_batch)
        created = not os.path.lexists(args.output)
        out = ensure_writable_dir(args.output)
        try:
            return self._run(args, recipe, out)
        except BaseException:
            if created:  # leave no empty output folder behind; files written so far (report.json) stay
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise

    def _run(self, args, recipe, out: Path) -> int:
        import torch

        from tokensieve import api
        from tokensieve.fileio import write_json_atomic
        from tokensieve.models import load_model

        t_all = time.perf_counter()
        _log(f"[1/5] loading model {args.model!r}")
        model, shape = load_model(args.model)
        _log(f"[2/5] exporting with recipe {recipe} (torch.export -> graph passes -> ONNX)")
        t0 = time.perf_counter()
        result = api.export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), recipe)
        paths = api.save(result, out)
        export_s = time.perf_counter() - t0
        report = {"model": str(args.model), **result.summary(), "export_seconds": export_s,
                  "files": {k: str(v) for k, v in paths.items()}}
        _log(f"[3/5] verifying against eager on {args.verify_inputs} random inputs")
        ver = api.verify(result, paths["debug"], num_inputs=args.verify_inputs, atol=args.atol, threads=args.threads)
        report["verify"] = ver.to_dict()
        report["verify"]["output"] = result.output_name
        write_json_atomic(out / api.ARTIFACTS["report"], report)
        if not ver.passed:
            raise_verification(ver)
        if not args.no_build:
            _log(f"[4/5] building engine for {args.target}")
            meta = {"recipe": result.recipe.to_dict(), "tokens_per_block": result.tokens_per_block(),
                    "model": str(args.model)}
            info = api.build(paths["model"], out / api.ARTIFACTS["engine"], target=args.target,
                             max_batch=args.max_batch, extra_metadata={"tokensieve": meta})
            report["build"] = {"target": args.target, "engine": str(info.engine_path), "metadata": str(info.metadata_path),
                               "seconds": info.build_seconds, "size_bytes": info.size_bytes,
                               "flavor": info.metadata.get("flavor"), "tensorrt_version": info.metadata.get("tensorrt_version")}
        else:
            _log("[4/5] engine build skipped (--no-build)")
        if not args.no_bench:
            _log("[5/5] benchmarking dense vs pruned on ONNX Runtime (alternating blocks)")
            b = api.bench(paths["dense"], paths["model"], ideal_speedup=result.ideal_speedup, threads=args.threads,
                          blocks=args.bench_blocks, iters=args.bench_iters, progress=lambda m: _log(f"      {m}"))
            report["bench"] = b.to_dict()
        else:
            _log("[5/5] benchmark skipped (--no-bench)")
        report["total_seconds"] = time.perf_counter() - t_all
        write_json_atomic(out / api.ARTIFACTS["report"], report)
        print(format_report(report, out))
        return 0


def raise_verification(ver) -> None:
    from tokensieve.errors import VerificationError

    bad = [b for b, ok in zip(ver.stage_blocks, ver.indices_match) if not ok]
    what = f"kept indices differ after block(s) {bad}" if bad else f"max abs diff {ver.max_abs_diff:.2e} > atol {ver.atol:g}"
    raise VerificationError(f"Verification failed: {what}; see report.json, and please report this model/recipe")


def format_report(r: dict, out: Path) -> str:
    lines = [f"tokensieve: {r['model']}  recipe {r['recipe_shorthand']}", ""]
    lines.append(f"  tokens          {_tokens_line([r['layout']['num_tokens']] + [s['tokens_out'] for s in r['stages']])}"
                 f"  (blocks {', '.join(str(s['after_block']) for s in r['stages']) or '-'} prune)")
    lines.append(f"  MACs/sample     dense {r['macs_dense'] / 1e9:.3f} G, pruned {r['macs_pruned'] / 1e9:.3f} G,"
                 f" ideal speedup {r['ideal_speedup']:.2f}x")
    v = r["verify"]
    status = "PASS" if v["passed"] else "FAIL"
    lines.append(f"  verify          {status}: {v['num_inputs']} inputs, kept indices identical at "
                 f"{sum(v['indices_match'])}/{len(v['indices_match'])} stages, max |diff| {v['max_abs_diff']:.1e}"
                 f" (atol {v['atol']:g}) vs eager, ONNX Runtime CPU")
    lines.append(f"  export          {r['export_seconds']:.1f} s")
    if "build" in r:
        b = r["build"]
        lines.append(f"  engine          {b['flavor']} {b['tensorrt_version']} {b['target']}: {b['size_bytes'] / 2**20:.1f} MiB,"
                     f" built in {b['seconds']:.1f} s")
    if "bench" in r:
        b = r["bench"]
        lines.append(f"  latency (b={b['batch']})   dense {b['dense']['median_ms']:.2f} ms (p90 {b['dense']['p90_ms']:.2f}),"
                     f" pruned {b['pruned']['median_ms']:.2f} ms (p90 {b['pruned']['p90_ms']:.2f}) on {b['backend']}")
        lines.append(f"  speedup         {b['speedup']:.2f}x measured vs {b['ideal_speedup']:.2f}x MAC-ideal"
                     f" -> ratio {b['ratio_to_ideal']:.2f}")
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
        p.add_argument("--inputs", type=int, default=8)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--atol", type=float, default=1e-4)

    def run(self, args):
        from tokensieve import api

        folder = Path(args.folder)
        report = _read_report(folder)
        reference, shape, blocks = api.reference_from_report(report)
        ver = api.verify_onnx(reference, shape, blocks, folder / api.ARTIFACTS["debug"], num_inputs=args.inputs,
                              batch=args.batch, seed=args.seed, atol=args.atol)
        print(f"{'stage after block':>18}  kept indices")
        for b, ok in zip(ver.stage_blocks, ver.indices_match):
            print(f"{b:>18}  {'identical' if ok else 'DIFFERENT'}")
        print(f"max |output diff| {ver.max_abs_diff:.2e} (atol {ver.atol:g}) over {ver.num_inputs} inputs of batch {ver.batch}: "
              f"{'PASS' if ver.passed else 'FAIL'}")
        if not ver.passed:
            raise_verification(ver)
        return 0


def _read_report(folder: Path) -> dict:
    path = folder / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{str(folder)!r} has no report.json; pass a folder written by `tokensieve export`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read {str(path)!r}: {e}; re-run `tokensieve export`") from e


# ----------------------------------------------------------------------------------------- build


class Build(Tool):
    """Build a TensorRT-RTX (ahead of time, no GPU needed) or TensorRT engine from an ONNX file.

        tokensieve build out/model.onnx --target rtx-sm86 -o out/model.engine
        tokensieve build out/model.onnx --target local          # standard TensorRT on this GPU
        tokensieve build compact.onnx --plugins libtokensieve_plugins.so --embed-plugins
    """

    name = "build"

    def add_args(self, p):
        p.add_argument("onnx")
        p.add_argument("-o", "--output", default=None, help="engine path (default: next to the ONNX, .engine)")
        p.add_argument("--target", default="rtx-sm86")
        p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
        p.add_argument("--max-batch", type=int, default=8)
        p.add_argument("--plugins", default=None, help="libtokensieve_plugins.so for graphs with tokensieve plugin nodes "
                       "(build it with `python -m tokensieve.targets.tensorrt.plugins`)")
        p.add_argument("--embed-plugins", action="store_true", help="serialize the plugin library into the engine")

    def run(self, args):
        from tokensieve import api

        info = api.build(args.onnx, args.output, target=args.target, precision=args.precision, max_batch=args.max_batch,
                         plugin_library=args.plugins, embed_plugins=args.embed_plugins)
        m = info.metadata
        print(f"built {info.engine_path} ({info.size_bytes / 2**20:.1f} MiB) with {m.get('flavor')} {m.get('tensorrt_version')}"
              f" for {m.get('target')} in {info.build_seconds:.1f} s; metadata {info.metadata_path}")
        return 0


# ----------------------------------------------------------------------------------------- bench


class Bench(Tool):
    """Time dense vs pruned ONNX on ONNX Runtime in alternating blocks; print median/p90, speedup vs MAC-ideal.

        tokensieve bench out/                      # out/dense.onnx vs out/model.onnx
        tokensieve bench out/ --batch 8 --blocks 6 --iters 30 --json bench.json
    """

    name = "bench"

    def add_args(self, p):
        p.add_argument("folder", help="folder written by `tokensieve export`")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--blocks", type=int, default=4)
        p.add_argument("--iters", type=int, default=20)
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--json", default=None, help="also write the result to this JSON file")

    def run(self, args):
        from tokensieve import api
        from tokensieve.fileio import write_json_atomic

        folder = Path(args.folder)
        report = _read_report(folder)
        b = api.bench(folder / api.ARTIFACTS["dense"], folder / api.ARTIFACTS["model"], ideal_speedup=report.get("ideal_speedup"),
                      batch=args.batch, threads=args.threads, blocks=args.blocks, iters=args.iters, warmup=args.warmup,
                      progress=_log)
        d = b.to_dict()
        print(f"{'model':<8} {'median ms':>10} {'p90 ms':>10} {'p99 ms':>10}")
        for k in ("dense", "pruned"):
            print(f"{k:<8} {d[k]['median_ms']:>10.2f} {d[k]['p90_ms']:>10.2f} {d[k]['p99_ms']:>10.2f}")
        ideal = f"{b.ideal_speedup:.2f}x" if b.ideal_speedup else "n/a"
        ratio = f"{b.ratio_to_ideal:.2f}" if b.ratio_to_ideal else "n/a"
        print(f"speedup {b.speedup:.2f}x, MAC-ideal {ideal}, ratio {ratio}  ({b.backend}, batch {b.batch})")
        if args.json:
            write_json_atomic(args.json, d)
        return 0


# ----------------------------------------------------------------------------------------- inspect


class Inspect(Tool):
    """Summarize an ONNX model (I/O, op census, pruning stages) or an engine's metadata.

        tokensieve inspect out/model.onnx
        tokensieve inspect out/model.engine
    """

    name = "inspect"

    def add_args(self, p):
        p.add_argument("path")

    def run(self, args):
        path = Path(args.path)
        if not path.is_file():
            raise ConfigError(f"{str(path)!r} does not exist")
        if path.suffix == ".engine":
            from tokensieve.targets.tensorrt import read_engine_metadata

            print(json.dumps(read_engine_metadata(path), indent=2))
            return 0
        import onnx

        from tokensieve.graph_passes.onnx.check_static import op_census

        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}); re-export it") from e

        def io(vs):
            return [f"{v.name} {[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}" for v in vs]

        print(f"{path}: opset {max((o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')), default='?')}, "
              f"{len(m.graph.node)} nodes")
        print("  inputs:  " + "; ".join(io(m.graph.input)))
        print("  outputs: " + "; ".join(io(m.graph.output)))
        census = op_census(m)
        print("  ops:     " + ", ".join(f"{k}×{v}" for k, v in census.most_common()))
        print(f"  pruning: {census.get('TopK', 0)} TopK, {census.get('GatherND', 0)} GatherND")
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
            print(f"{'':<{w}}paper: {m.paper}; needs [CLS]: {'yes' if m.requires_cls else 'no'}; reduce: {m.reduce.value}")
            for prm in m.params:
                print(f"{'':<{w}}{prm.name} = {prm.default!r}: {prm.help}")
        print(f"\nrecipe shorthand: METHOD@BLOCKS:KEEP, e.g. {DEFAULT_RECIPE} (0-based blocks; KEEP ratio 0<r<=1 or a count)")
        return 0


TOOLS = [Export(), Verify(), Build(), Bench(), Inspect(), Methods()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description="Compile token-pruned vision transformers to ONNX and TensorRT engines.")
    from tokensieve import __version__

    parser.add_argument("--version", action="version", version=f"tokensieve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for tool in TOOLS:
        doc = textwrap.dedent(tool.__doc__ or "").strip()
        summary, _, rest = doc.partition("\n\n")
        p = sub.add_parser(tool.name, help=summary, description=summary, epilog="examples:\n" + textwrap.indent(textwrap.dedent(rest), "  ") if rest else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        tool.add_args(p)
        p.set_defaults(tool=tool)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "tool", None):
        parser.print_help()
        return 2
    try:
        return args.tool.run(args) or 0
    except TokenSieveError as e:
        print(f"tokensieve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokensieve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
