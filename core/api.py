"""The Python API; the only module that chains stages (export -> passes -> ONNX -> verify -> build -> bench)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from tokensieve.errors import ConfigError, VerificationError
from tokensieve.exporter.onnx_files import save_onnx, save_shared
from tokensieve.exporter.to_onnx import to_onnx
from tokensieve.exporter.trace import FirstOutput, _is_hf, output_fields, quiet, trace, trace_batch
from tokensieve.fileio import ensure_writable_dir, folder_lock
from tokensieve.flops import count_macs
from tokensieve.graph_passes.blocks import TokenLayout, discover_blocks, token_layout
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.graph_passes.pipeline import CANONICALIZE_PASSES, FX_PASSES, run_fx_passes, run_onnx_passes
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.recipe import Recipe, ResolvedStage, parse_recipe, resolve_recipe
from tokensieve.targets.base import DEFAULT_MAX_BATCH, DEFAULT_PRECISION, DEFAULT_TARGET, BuildSpec, Precision
from tokensieve.trust import check_folder_files

__all__ = ["plan", "Plan", "export", "ExportResult", "verify", "VerifyReport", "check_verified", "save",
           "remove_stale_engines", "build", "bench", "BenchReport", "export_folder", "read_export_report"]


@dataclass
class Plan:
    """A recipe bound to a traced model (static K per stage), and the eager reference of it; no ONNX yet."""

    module: nn.Module = field(repr=False)            # the eager model, wrapped to return one tensor
    input_shape: tuple[int, ...]
    recipe: Recipe
    stages: list[ResolvedStage]
    hook_stages: list[HookStage]
    layout: TokenLayout
    block_paths: list[str]

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eager output and kept positions per stage for input `x`."""
        return run_reference(self.module, x, self.hook_stages)


@dataclass
class ExportResult(Plan):
    """A pruned model in ONNX, the dense baseline, and what is needed to check it against eager (Plan)."""

    output_name: str
    onnx_model: onnx.ModelProto = field(repr=False)   # deployable: the model's output only
    debug_onnx: onnx.ModelProto = field(repr=False)   # + kept_idx.<block> outputs, for verification
    dense_program: torch.export.ExportedProgram = field(repr=False)   # the canonicalized dense model, traced
    macs_dense: int
    macs_pruned: int
    seconds: dict[str, float]
    _dense_onnx: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    # the rewritten graph the pruned ONNX comes from (outputs: model output + kept_idx.<block>); the torch backend
    pruned_program: torch.export.ExportedProgram | None = field(default=None, repr=False, compare=False)
    # False when the model fixes its batch (trace_batch fell back): the ONNX takes exactly input_shape[0] images
    dynamic_batch: bool = field(default=True, compare=False)
    # every model output the ONNX returns, in order (output_name is the first); empty: [output_name]
    output_names: list[str] = field(default_factory=list, compare=False)

    @property
    def outputs(self) -> list[str]:
        """The model outputs of the ONNX files, in order (`--outputs`; default the model's first)."""
        return list(self.output_names) or [self.output_name]

    @property
    def dense_onnx(self) -> onnx.ModelProto:
        """The dense baseline as ONNX (same canonicalization, no stages), converted on first use: a third of an
        export's time, which verification and sweeps of pruned models never need."""
        if self._dense_onnx is None:
            t0 = time.perf_counter()
            dense = run_onnx_passes(to_onnx(self.dense_program, self.outputs), PassContext())
            self._dense_onnx = dense
            self.seconds["onnx_dense"] = time.perf_counter() - t0
        return self._dense_onnx

    @property
    def tokens(self) -> list[int]:
        """Token counts: entering block 0, then after each stage."""
        return [self.layout.num_tokens] + [s.tokens_out for s in self.stages]

    @property
    def ideal_speedup(self) -> float:
        return self.macs_dense / self.macs_pruned

    def summary(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "recipe_shorthand": self.recipe.shorthand(),
            "input_shape": list(self.input_shape),
            "outputs": self.outputs,
            "dynamic_batch": self.dynamic_batch,
            "num_blocks": len(self.block_paths),
            "block_paths": self.block_paths,
            "layout": asdict(self.layout),
            "stages": [
                {"after_block": s.stage.after_block, "method": s.stage.method, "keep": s.keep, "options": s.options,
                 "tokens_in": s.tokens_in, "tokens_out": s.tokens_out, "placement": s.stage.placement}
                for s in self.stages
            ],
            "tokens_per_block": self.tokens_per_block(),
            "macs_dense": self.macs_dense,
            "macs_pruned": self.macs_pruned,
            "ideal_speedup": self.ideal_speedup,
            "seconds": self.seconds,
        }

    def tokens_per_block(self) -> list[int]:
        """Tokens each block processes."""
        n, out, by_block = self.layout.num_tokens, [], {s.stage.after_block: s for s in self.stages}
        for i in range(len(self.block_paths)):
            out.append(n)
            if i in by_block:
                n = by_block[i].tokens_out
        return out


def plan(model: nn.Module, example_inputs, recipe: Recipe | str, *, num_prefix_tokens: int | None = None,
         dynamic_batch: bool = True, batch: int | None = None, outputs=None) -> Plan:
    """Trace `model`, find its blocks and token layout, and bind the recipe to it (what `export` starts with)."""
    return _bind(model, example_inputs, recipe, num_prefix_tokens, dynamic_batch, batch, outputs)[0]


def _bind(model, example_inputs, recipe, num_prefix_tokens, dynamic_batch, batch=None, outputs=None):
    """-> (Plan, example tensor, exported program, its GraphModule, blocks, trace seconds, dynamic batch, output
    names)."""
    if isinstance(recipe, str):
        recipe = parse_recipe(recipe)
    example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ConfigError("example_inputs must be one (B, C, H, W) image tensor")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"--batch {batch!r} must be an integer >= 1")
        example = example[:1].expand(batch, *example.shape[1:]).contiguous()
    from tokensieve.models import prepare_for_export, resize_kwargs

    prepare_for_export(model)
    forward_kwargs = resize_kwargs(model, tuple(example.shape[-2:]))
    names = choose_outputs(model.eval(), example, outputs, forward_kwargs)
    module = FirstOutput(model, outputs=tuple(names) if outputs else None, forward_kwargs=forward_kwargs)
    t0 = time.perf_counter()
    ep, dynamic_batch = trace_batch(module, example, dynamic_batch)
    seconds = time.perf_counter() - t0
    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks, num_prefix_tokens)
    stages = resolve_recipe(recipe, len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    for s in stages:
        if METHODS[s.stage.method].needs_cls(s.options) and layout.num_prefix_tokens == 0:
            raise ConfigError(
                f"Method {s.stage.method!r} scores tokens by [CLS] attention, but this model has no [CLS] token "
                "(0 prefix tokens); choose a CLS-free method (see `tokensieve methods`)"
            )
    if len(names) > 1 and pads_output([s.stage.method for s in stages]):
        raise ConfigError(f"--outputs {','.join(names)}: a compacting stage (compact=true) exports one output only; "
                          "pass one name")
    hook_stages = [HookStage.for_block([b.path for b in blocks], s.stage.after_block, s.stage.method, s.keep,
                                       s.num_prefix_tokens, tuple(s.options.items()), layout.grid,
                                       s.stage.placement) for s in stages]
    bound = Plan(module, tuple(example.shape), recipe, stages, hook_stages, layout, [b.path for b in blocks])
    return bound, example, ep, gm, blocks, seconds, dynamic_batch, names


def available_outputs(model: nn.Module, example: torch.Tensor, forward_kwargs: dict | None = None) -> list[str]:
    """The names of the tensors `model` returns for `example` (its ModelOutput fields, in order; ["output"] for a
    model that returns a plain tensor)."""
    if not _is_hf(model):
        return ["output"]
    with torch.no_grad(), quiet():
        out = model(pixel_values=example[:1], **(forward_kwargs or {}))
    return output_fields(out) or ["output"]


def choose_outputs(model: nn.Module, example: torch.Tensor, outputs, forward_kwargs: dict | None = None) -> list[str]:
    """`outputs` (names, or one comma-separated string; None: the model's first output) checked against the
    model's outputs -> the list of names; a one-line ConfigError lists the available ones."""
    available = available_outputs(model, example, forward_kwargs)
    if outputs is None:
        return available[:1]
    names = [n.strip() for n in outputs.split(",")] if isinstance(outputs, str) else [str(n) for n in outputs]
    listed = ", ".join(available)
    if not names or any(not n for n in names):
        raise ConfigError(f"--outputs {','.join(names)!r} names no output; choose from {listed}")
    for n in names:
        if n not in available:
            raise ConfigError(f"--outputs {n!r} is not an output of {type(model).__name__}; choose from {listed}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--outputs {','.join(names)} names an output twice; list each once")
    return names


def export(model: nn.Module, example_inputs, recipe: Recipe | str, *, num_prefix_tokens: int | None = None,
           dynamic_batch: bool = True, batch: int | None = None, outputs=None) -> ExportResult:
    """Trace `model`, insert the recipe's pruning stages into the graph, convert both pruned and dense to ONNX.

    The batch axis is dynamic unless the model fixes it (`len(x)`, ints from x.shape[0]): then the export is for
    the example's batch, or `batch` (one warning line says so; ExportResult.dynamic_batch is False).

    `outputs`: the model outputs the ONNX returns, by name (ModelOutput fields, e.g. "logits" or
    ["image_embeds", "last_hidden_state"]); default the model's first. An example whose H, W differ from the
    config's image size is exported with the model's position-embedding interpolation (models.resize_kwargs)."""
    bound, example, ep, gm, blocks, trace_seconds, dynamic_batch, output_names = _bind(
        model, example_inputs, recipe, num_prefix_tokens, dynamic_batch, batch, outputs)
    recipe, stages, module = bound.recipe, bound.stages, bound.module
    output_name = output_names[0]
    seconds = {"trace": trace_seconds}

    # Canonicalize once for both sides, so dense and pruned differ only by the pruning stages.
    # The passes run the graph once; a dynamic-batch trace needs batch >= 2, a static one its own batch.
    grow = dynamic_batch and example.shape[0] < 2
    sample = (example.expand(2, *example.shape[1:]) if grow else example).contiguous()
    ctx = PassContext(blocks=tuple(blocks), stages=tuple(stages), example_inputs=(sample,))
    t0 = time.perf_counter()
    canonical = run_fx_passes(gm, ctx, CANONICALIZE_PASSES).modified
    ep_dense = trace(gm, example, dynamic_batch) if canonical else ep
    seconds["trace_dense"] = time.perf_counter() - t0
    macs_dense = count_macs(ep_dense.graph_module)
    dense_onnx = None if stages else to_onnx(ep_dense, output_names)  # with stages: on first use (dense_onnx)

    if stages:
        t0 = time.perf_counter()
        run_fx_passes(gm, ctx, _fx_passes(len(output_names)))
        seconds["passes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ep_pruned = trace(gm, example, dynamic_batch)
        seconds["trace_pruned"] = time.perf_counter() - t0
        names = [*output_names] + [f"kept_idx.{s.stage.after_block}" for s in stages]
        t0 = time.perf_counter()
        debug_onnx = to_onnx(ep_pruned, names)
        seconds["onnx_pruned"] = time.perf_counter() - t0
        # A compacted token axis counts at its cap (the worst case): MACs stay an upper bound.
        macs_pruned = count_macs(ep_pruned.graph_module, unbacked_size=max(s.tokens_out for s in stages))
        onnx_model = run_onnx_passes(debug_onnx, ctx)  # without kept_idx.*, checked (check_static)
    else:
        dense_onnx = debug_onnx = onnx_model = run_onnx_passes(dense_onnx, ctx)  # checked (check_static)
        macs_pruned = macs_dense
    return ExportResult(
        **{f.name: getattr(bound, f.name) for f in fields(Plan)}, output_name=output_name, onnx_model=onnx_model,
        debug_onnx=debug_onnx, dense_program=ep_dense, macs_dense=macs_dense, macs_pruned=macs_pruned, seconds=seconds,
        _dense_onnx=dense_onnx, pruned_program=ep_pruned if stages else ep_dense, dynamic_batch=dynamic_batch,
        output_names=list(output_names),
    )


def _fx_passes(num_outputs: int) -> tuple:
    """FX_PASSES for a model with `num_outputs` outputs: add_kept_index_outputs keeps the graph's first output only,
    so with several it is wrapped to return (every model output, *kept positions)."""
    from tokensieve.graph_passes.fx.add_kept_index_outputs import add_kept_index_outputs

    if num_outputs == 1:
        return FX_PASSES
    return tuple(_keeping_outputs(p, num_outputs) if p is add_kept_index_outputs else p for p in FX_PASSES)


def _keeping_outputs(add_kept, num_outputs: int):
    from onnx_ir.passes import PassResult
    from torch import fx

    from tokensieve.graph_passes.fx.insert_prune_stages import kept_index_nodes

    def add_kept_index_outputs_all(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """(out_0, ..., out_n) -> (out_0, ..., out_n, *kept positions); idempotent like add_kept_index_outputs."""
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        before, plain = out_node.args, type(gm.graph._codegen) is fx.graph.CodeGen
        (orig,) = before
        model_outputs = tuple(orig)[:num_outputs] if isinstance(orig, (tuple, list)) else (orig,)
        result = add_kept(gm, ctx)
        kept = kept_index_nodes(gm)
        if not kept:
            return result
        wanted = (tuple([*model_outputs, *kept]),)
        if out_node.args != wanted:
            out_node.args = wanted
            gm.recompile()
        return PassResult(gm, not (plain and before == wanted))

    return add_kept_index_outputs_all


# --------------------------------------------------------------------------- save


ARTIFACTS = {"model": "model.onnx", "debug": "model.debug.onnx", "dense": "dense.onnx", "report": "report.json"}
WEIGHTS = "weights.onnx.data"   # the weights save() writes once for the ONNX files of an export (save_shared)
# The engines tokensieve writes into an export folder (each with its .json metadata) are named per ONNX, target and
# precision (targets.base.engine_file_name: model.rtx-sm89.fp16.engine): the export's own, `tokensieve build`'s of the
# folder's ONNX files, `tokensieve bench --backend tensorrt`'s dense baseline. report.json lists them ("engines").
ENGINE_STEMS = ("model", "model.debug", "dense")   # the ONNX files (stems) an export folder's engines are built from


def folder_engines(folder: str | Path) -> list[str]:
    """The engine files of an export folder: names engine_file_name gives for its ONNX files, sorted."""
    from tokensieve.targets.base import is_engine_file_name

    return sorted(p.name for p in Path(folder).glob("*.engine") if is_engine_file_name(p.name, ENGINE_STEMS))


SAVED_PARTS = ("model", "debug", "dense")
OPTIONAL_PARTS = ("torch",)  # model.pt2 + dense.pt2 (torch.export programs, the torch backend): only when asked for


def save(result: ExportResult, out_dir: str | Path, parts=SAVED_PARTS) -> dict[str, Path]:
    """Write model.onnx, model.debug.onnx and dense.onnx (or only `parts` of them) into `out_dir`, each atomically;
    the dense model is converted to ONNX only if "dense" is asked for. Engines an earlier export left there are not
    touched: remove_stale_engines(out_dir, folder_engines(out_dir)) deletes them (`tokensieve export` does). The part "torch" writes
    model.pt2 / dense.pt2 (keys "torch" / "torch_dense"), the programs the ONNX files come from."""
    unknown = set(parts) - set(SAVED_PARTS) - set(OPTIONAL_PARTS)
    if unknown or not parts:
        raise ConfigError(f"save parts {sorted(unknown) or 'none'}: choose from {', '.join(SAVED_PARTS + OPTIONAL_PARTS)}")
    out = ensure_writable_dir(out_dir)
    paths = {}
    if "torch" in parts:
        from tokensieve.runtime.torch_runner import write_program

        names = result.outputs + [f"kept_idx.{s.stage.after_block}" for s in result.stages]
        pruned = result.pruned_program if result.stages else result.dense_program
        paths["torch"] = write_program(pruned, out / "model.pt2", names[: len(pruned.graph_signature.user_outputs)])
        paths["torch_dense"] = write_program(result.dense_program, out / "dense.pt2", result.outputs)
    protos = {}
    for key in (k for k in SAVED_PARTS if k in parts):
        proto = result.onnx_model if key == "model" else result.debug_onnx if key == "debug" else result.dense_onnx
        set_onnx_metadata(proto, onnx_metadata(result, dense=key == "dense"))
        paths[key] = out / ARTIFACTS[key]
        protos[paths[key]] = proto
    if len(protos) > 1:  # the graphs hold the same weights: one shared file
        save_shared(protos, out / WEIGHTS)
        paths["weights"] = out / WEIGHTS
    else:
        for path, proto in protos.items():
            save_onnx(proto, path)
    return paths


METADATA_PREFIX = "tokensieve."   # the ONNX metadata_props keys tokensieve writes (set_onnx_metadata)


def onnx_metadata(result: ExportResult, dense: bool = False) -> dict[str, str]:
    """What an exported ONNX says about itself (metadata_props): tokensieve version, recipe, token counts (the dense
    baseline's: no stage), input shape and outputs. No file paths."""
    import json

    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("tokensieve")
    except PackageNotFoundError:  # a source tree that is not installed
        __version__ = "unknown"
    tokens = [result.layout.num_tokens] * len(result.block_paths) if dense else result.tokens_per_block()
    meta = {"version": __version__, "part": "dense" if dense else "pruned", "recipe": result.recipe.shorthand(),
            "recipe_json": json.dumps(result.recipe.to_dict(), sort_keys=True), "tokens_per_block": json.dumps(tokens),
            "tokens": json.dumps([result.layout.num_tokens] if dense else result.tokens),
            "input_shape": json.dumps(list(result.input_shape[1:])), "outputs": json.dumps(result.outputs),
            "ideal_speedup": "1.0" if dense else f"{result.ideal_speedup:.6g}"}
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def set_onnx_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the tokensieve.* entries of `proto`'s metadata_props by `meta` (others stay; edits in place)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    for key, value in [*keep, *meta.items()]:
        proto.metadata_props.add(key=key, value=value)


def remove_stale_engines(folder: str | Path, names, keep=()) -> list[str]:
    """Delete the engines `names` in `folder` (each with its `<name>.json` metadata) but those in `keep`: they were
    built from ONNX files a re-export just replaced. Only these tokensieve-named files are touched (a folder or any
    other file stays); returns the names of the files removed, in order. One-line ConfigError if one cannot be."""
    removed = []
    for name in names:
        if name in keep:
            continue
        for file in (Path(folder) / name, Path(folder) / f"{name}.json"):
            if not (file.is_file() or file.is_symlink()):
                continue
            try:
                file.unlink()
            except OSError as e:
                raise ConfigError(f"Cannot remove the stale engine file {str(file)!r} of an earlier export: "
                                  f"{e.strerror}; delete it by hand") from e
            removed.append(file.name)
    return removed


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    num_inputs: int
    batch: int
    atol: float
    max_abs_diff: float
    indices_match: list[bool]       # per stage, over all inputs
    stage_blocks: list[int]
    seconds: float
    nonfinite: list[str] = field(default_factory=list)   # "eager" / "onnx" when that side gave NaN/Inf (a failure)
    shape_match: bool = True                              # the outputs' shapes agree on every input

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.atol and all(self.indices_match) and not self.nonfinite
                and self.shape_match)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify(result: ExportResult, onnx_path: str | Path | None = None, *, num_inputs: int = 8, batch: int = 1,
           seed: int = 0, atol: float = 1e-4, threads: int | None = None) -> VerifyReport:
    """Eager reference vs ONNX Runtime on `num_inputs` random inputs: kept indices and outputs.

    `onnx_path` is the debug ONNX (with kept_idx outputs); without it the in-memory one is used.
    """
    if onnx_path is not None:
        return verify_onnx(result.reference, result.input_shape, [s.stage.after_block for s in result.stages],
                           onnx_path, num_inputs=num_inputs, batch=batch, seed=seed, atol=atol, threads=threads,
                           padded=pads_output([s.stage.method for s in result.stages]))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tokensieve-verify-") as tmp:
        path = Path(tmp) / "model.debug.onnx"
        save_onnx(result.debug_onnx, path)
        return verify(result, path, num_inputs=num_inputs, batch=batch, seed=seed, atol=atol, threads=threads)


def pads_output(methods) -> bool:
    """Whether the eager reference of stages with these methods pads its output with NaN rows: a compacting stage
    (adaptive) really drops tokens, and the reference pads to the export's capped slots (methods/reference.py)."""
    return any(METHODS[m].compacts for m in methods)


def verify_onnx(reference, input_shape, stage_blocks: list[int], onnx_path: str | Path, *, num_inputs: int = 8,
                batch: int = 1, seed: int = 0, atol: float = 1e-4, threads: int | None = None,
                padded: bool = False, progress=None) -> VerifyReport:
    """Compare `reference(x) -> (output or tuple of outputs, kept per stage)` with the debug ONNX (the model's
    outputs, then one kept_idx.<block> per stage) on seeded random inputs; every output is compared.

    NaN or Inf on either side fails, with one exception: when `padded`, whole NaN rows of the eager output are the
    slots a compacting stage left invalid (see pads_output) and are not compared. `progress(message)` hears each
    input."""
    from tokensieve.runtime.onnxruntime_runner import OrtRunner

    if isinstance(num_inputs, bool) or isinstance(batch, bool) or num_inputs < 1 or batch < 1:
        raise ConfigError("verify needs --inputs >= 1 and --batch >= 1")
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ConfigError(f"atol {atol!r} must be a finite number >= 0, e.g. 1e-4")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    max_diff, matches, nonfinite, shapes_ok = 0.0, [True] * len(stage_blocks), set(), True
    with OrtRunner(onnx_path, threads=threads) as runner:
        num_model = len(runner.output_names) - len(stage_blocks)
        if num_model < 1 or any(n.startswith("kept_idx.") for n in runner.output_names[:num_model]):
            raise ConfigError(f"{str(onnx_path)!r} has {len(runner.output_names)} outputs, expected the model output(s) "
                              f"+ {len(stage_blocks)} kept_idx outputs; verify the model.debug.onnx written by export")
        fixed = runner.input_specs[0][1][0]
        if isinstance(fixed, int) and fixed != batch:   # a model that fixes its batch was exported for that batch
            raise ConfigError(f"{str(onnx_path)!r} takes a fixed batch of {fixed} (the model fixes its batch); "
                              f"pass --batch {fixed}")
        for i in range(num_inputs):
            if progress:
                progress(f"input {i + 1}/{num_inputs}")
            x = torch.randn(batch, *input_shape[1:], generator=gen)
            ref, kept = reference(x)
            refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
            outs = list(runner.infer({"pixel_values": x.numpy()}).values())
            if len(refs) != num_model:
                raise ConfigError(f"{str(onnx_path)!r} returns {num_model} model output(s), the eager model "
                                  f"{len(refs)}; re-run `tokensieve export`")
            for got, want in zip(outs[:num_model], (r.numpy() for r in refs)):
                if got.shape != want.shape:
                    shapes_ok = False
                    continue
                pad = np.isnan(want).all(axis=-1, keepdims=True) if padded and want.ndim >= 3 else np.zeros((), bool)
                real = ~np.broadcast_to(pad, want.shape)
                if not np.isfinite(want[real]).all():
                    nonfinite.add("eager")
                if not np.isfinite(got[real]).all():
                    nonfinite.add("onnx")
                if not nonfinite:
                    max_diff = max(max_diff, float(np.abs(got - want)[real].max(initial=0.0)))
            for i, (got, want) in enumerate(zip(outs[num_model:], kept)):
                matches[i] &= got.shape == tuple(want.shape) and bool((got == want.numpy()).all())
    return VerifyReport(num_inputs, batch, atol, max_diff, matches, list(stage_blocks), time.perf_counter() - t0,
                        sorted(nonfinite), shapes_ok)


def reference_from_report(report: dict):
    """Rebuild the eager reference of an export folder's report.json (loads the model again)."""
    from tokensieve.models import load_model, prepare_for_export, resize_kwargs

    model, _ = load_model(report["model"])
    prepare_for_export(model)
    outputs = report.get("outputs")  # absent in reports of an older tokensieve: the model's first output
    module = FirstOutput(model.eval(), outputs=tuple(outputs) if outputs else None,
                         forward_kwargs=resize_kwargs(model, tuple(report["input_shape"][-2:])))
    paths = report["block_paths"]
    prefix = report["layout"]["num_prefix_tokens"]
    grid = report["layout"].get("grid")
    # no placement recorded: a report from before in-block stages, whose stages all ran on the block output
    hooks = [HookStage.for_block(paths, s["after_block"], s["method"], s["keep"], prefix,
                                 tuple(s.get("options", {}).items()), tuple(grid) if grid else None,
                                 s.get("placement", "block_out"))
             for s in report["stages"]]
    return (lambda x: run_reference(module, x, hooks)), tuple(report["input_shape"]), [s["after_block"] for s in report["stages"]]


# --------------------------------------------------------------------------- ONNX Runtime optimizer

# What `optimize_folder` writes next to the export's files: the same graphs after ORT's transformer optimizer.
OPTIMIZED = {"model": "model.opt.onnx", "debug": "model.debug.opt.onnx", "dense": "dense.opt.onnx"}


def optimize_folder(folder: str | Path, *, num_inputs: int = 8, batch: int = 1, seed: int = 1,
                    atol: float = 1e-4) -> dict:
    """ORT's transformer optimizer on an export's pruned, debug and dense ONNX (dense and pruned alike), then the
    optimized debug graph verified against the eager model like the export -> {"fused": {part: {op: count}},
    "verify": VerifyReport}. On a failed verification the optimized files are removed (VerificationError)."""
    folder = Path(folder)
    report = read_export_report(folder, required=("model", "block_paths", "layout", "stages", "input_shape"))
    fused = optimize_files(folder)
    reference, shape, blocks = reference_from_report(report)
    ver = verify_onnx(reference, shape, blocks, folder / OPTIMIZED["debug"], num_inputs=num_inputs, batch=batch,
                      seed=seed, atol=atol, padded=pads_output([s["method"] for s in report["stages"]]))
    if not ver.passed:
        remove_files(folder, OPTIMIZED.values())
    check_verified(ver)
    return {"fused": fused, "verify": ver}


def optimize_files(folder: Path) -> dict[str, dict[str, int]]:
    """OPTIMIZED's files from ARTIFACTS' in `folder` -> {part: {fused op: count}} (not verified)."""
    from tokensieve.targets.onnxruntime.optimize import optimize_onnx

    return {part: optimize_onnx(folder / ARTIFACTS[part], folder / name) for part, name in OPTIMIZED.items()}


def remove_files(folder: Path, names) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- int8 (ONNX Runtime QDQ)

QUANTIZED = {"model": "model.int8.onnx", "debug": "model.debug.int8.onnx", "dense": "dense.int8.onnx"}


def quantize_folder(folder: str | Path, calibration: list[np.ndarray] | None = None, *, num_inputs: int = 8,
                    batch: int = 2, seed: int = 1, symmetric: bool = False) -> dict:
    """int8 QDQ copies of an export's pruned, debug and dense ONNX (targets/onnxruntime/quantize.py: score math kept
    float), calibrated on `calibration` (pixel_values batches; None: seeded random normal batches), then compared with
    the fp32 debug graph on the first `num_inputs` calibration batches (or seeded random ones) -> {"kept_overlap": mean fraction of each stage's kept
    positions that int8 keeps too, per stage, "cosine": {"min", "mean"} of the outputs, "calibration": "images" |
    "random", "float_score_nodes": count, "symmetric"}. int8 is not verified for equality: the kept tokens may move.
    `symmetric`: zero points 0 (what a TensorRT int8 engine needs; `tokensieve build --precision int8`)."""
    folder = Path(folder)
    report = read_export_report(folder, required=("input_shape", "stages"))
    return quantize_files(folder, tuple(report["input_shape"]), len(report["stages"]), calibration,
                          num_inputs=num_inputs, batch=batch, seed=seed, symmetric=symmetric)


def quantize_files(folder: Path, shape: tuple, stages: int, calibration: list[np.ndarray] | None, *,
                   num_inputs: int = 8, batch: int = 2, seed: int = 1, symmetric: bool = False) -> dict:
    """quantize_folder's work on `folder`'s ARTIFACTS (input `shape`, `stages` pruning stages)."""
    from tokensieve.runtime.onnxruntime_runner import OrtRunner
    from tokensieve.targets.onnxruntime.quantize import quantize_int8

    gen = np.random.default_rng(seed)
    source = "images" if calibration is not None else "random"
    if calibration is None:
        calibration = [gen.standard_normal((4, *shape[1:])).astype(np.float32) for _ in range(8)]
    feeds = [{"pixel_values": np.asarray(c, np.float32)} for c in calibration]
    summary = {part: quantize_int8(folder / ARTIFACTS[part], folder / name, feeds, symmetric=symmetric)
               for part, name in QUANTIZED.items()}
    overlap, cosines = [[] for _ in range(stages)], []
    with OrtRunner(folder / ARTIFACTS["debug"]) as fp32, OrtRunner(folder / QUANTIZED["debug"]) as int8:
        n = len(fp32.output_names) - stages   # the model's outputs (--outputs), then kept_idx.<block> per stage
        # compared on the calibration images when there are some (random inputs are out of their ranges), else on
        # seeded random batches
        inputs = [f["pixel_values"] for f in feeds[:num_inputs]] if source == "images" else \
            [gen.standard_normal((batch, *shape[1:])).astype(np.float32) for _ in range(num_inputs)]
        for pixels in inputs:
            x = {"pixel_values": pixels}
            rows = len(pixels)
            refs, outs = list(fp32.infer(x).values()), list(int8.infer(x).values())
            ref_kept, kept = refs[n:], outs[n:]
            for ref, out in zip(refs[:n], outs[:n]):
                r, o = ref.reshape(rows, -1).astype(np.float64), out.reshape(rows, -1).astype(np.float64)
                cos = (r * o).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1), 1e-30)
                if not np.isfinite(out).all():
                    raise VerificationError(f"{QUANTIZED['debug']} gives NaN/Inf outputs; calibrate with images "
                                            "(--calib DIR)")
                cosines.extend(cos.tolist())
            for i, (k, rk) in enumerate(zip(kept, ref_kept)):
                overlap[i].extend(len(set(a.tolist()) & set(b.tolist())) / max(len(b), 1) for a, b in zip(k, rk))
    return {"kept_overlap": [float(np.mean(o)) for o in overlap], "cosine": {"min": float(min(cosines)),
            "mean": float(np.mean(cosines))}, "calibration": source,
            "float_score_nodes": len(summary["debug"]["score_nodes_float"]), "symmetric": symmetric}


# --------------------------------------------------------------------------- build


def build(onnx_path: str | Path, engine_path: str | Path | None = None, *, target: str = DEFAULT_TARGET,
          precision: Precision | str = DEFAULT_PRECISION, max_batch: int = DEFAULT_MAX_BATCH,
          extra_metadata: dict | None = None,
          plugin_library: str | Path | None = None, embed_plugins: bool = False,
          dims: dict[str, tuple[int, int, int]] | None = None, opt_batch: int = 1, timing_cache: str | Path | None = None,
          workspace_mib: int | None = None, builder_optimization_level: int | None = None,
          layer_info: str | Path | None = None):
    """Build a TensorRT / TensorRT-RTX engine (+ .json metadata) from an ONNX file; `dims` gives each dynamic dim
    other than batch its (min, opt, max) by ONNX dim name, e.g. {"sequence": (1, 64, 512)} for lm_prefill.onnx.

    The engine goes to `engine_path`, by default next to the ONNX, named per target and precision
    (model.rtx-sm89.fp16.engine: default_engine_name). Built from an export folder's ONNX into that folder, it is
    listed in the folder's report.json ("engines", which `tokensieve inspect` shows), the folder locked meanwhile.
    Engine options as trtexec / Polygraphy name them: `opt_batch` (the profile's opt), `timing_cache` (a file reused
    and updated across builds; standard TensorRT), `workspace_mib`, `builder_optimization_level` (0..5),
    `layer_info` (write the engine inspector's per-layer JSON there)."""
    from tokensieve.targets import get_target

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {str(onnx_path)!r} does not exist; run `tokensieve export` first")
    spec = BuildSpec(target=target, precision=Precision.parse(precision), max_batch=max_batch,  # checked first
                     plugin_library=str(plugin_library) if plugin_library else None, embed_plugins=embed_plugins,
                     dims=dict(dims or {}), opt_batch=opt_batch,
                     timing_cache=str(timing_cache) if timing_cache is not None else None, workspace_mib=workspace_mib,
                     builder_optimization_level=builder_optimization_level,
                     layer_info=str(layer_info) if layer_info is not None else None)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_name(default_engine_name(onnx_path, target, precision))
    ensure_writable_dir(engine_path.parent)
    from contextlib import nullcontext

    from tokensieve.fileio import interruptible

    folder = _export_folder_of(onnx_path, engine_path)
    lock = folder_lock(folder, "tokensieve export, export-vlm or build") if folder else nullcontext()
    with interruptible(), lock:
        info = get_target("tensorrt").build(onnx_path, spec, engine_path, extra_metadata)
        if folder:
            _record_engine(folder, info)
    return info


def default_engine_name(onnx_path: str | Path, target: str, precision: Precision | str) -> str:
    """model.onnx -> model.rtx-sm89.fp16.engine (targets.base.engine_file_name; `local`: this GPU's sm)."""
    from tokensieve.runtime.tensorrt_flavors import STANDARD, local_compute_capability
    from tokensieve.targets.base import engine_file_name, parse_target

    cc = local_compute_capability() if parse_target(target).flavor == STANDARD else None
    return engine_file_name(Path(onnx_path).name.removesuffix(".onnx"), target, precision, cc)


def engine_entry(info) -> dict:
    """report.json's "engines" entry of a built engine (EngineInfo): file names and what it was built for."""
    m = info.metadata
    return {"file": info.engine_path.name, "metadata": info.metadata_path.name, "onnx": m["onnx"]["file"],
            "target": m["target"], "precision": m["precision"]}


def _export_folder_of(onnx_path: Path, engine_path: Path) -> Path | None:
    """The export folder whose report.json should list an engine built from `onnx_path` into `engine_path`: both in
    one folder that holds report.json, the ONNX one of its files; else None."""
    folder = onnx_path.resolve().parent
    if engine_path.resolve().parent != folder or not (folder / ARTIFACTS["report"]).is_file():
        return None
    return folder if onnx_path.name in {ARTIFACTS[k] for k in SAVED_PARTS} else None


def _record_engine(folder: Path, info) -> None:
    """List `info`'s engine in `folder`'s report.json (replacing an entry of the same file), atomically; the caller
    holds the folder lock."""
    from tokensieve.fileio import write_json_atomic

    report = read_export_report(folder)
    entry = engine_entry(info)
    report["engines"] = [e for e in report.get("engines", []) if e.get("file") != entry["file"]] + [entry]
    write_json_atomic(folder / ARTIFACTS["report"], report)


def _missing_tensorrt(target: str) -> str | None:
    """Why no engine can be built here for `target` (its TensorRT flavor is not installed); None when it can."""
    from tokensieve.runtime.tensorrt_flavors import FLAVOR_LABELS, available_flavors
    from tokensieve.targets.base import parse_target

    flavor = parse_target(target).flavor
    return None if available_flavors()[flavor] is not None else f"{FLAVOR_LABELS[flavor]} is not installed"


def engine_hint(skipped: dict, folder: str | Path) -> str:
    """How to get the engine an export skipped (report["engine_skipped"]: reason, target), as one line."""
    from tokensieve.runtime.tensorrt_flavors import RTX
    from tokensieve.targets.base import parse_target

    target, model = skipped["target"], Path(folder) / ARTIFACTS["model"]
    if parse_target(target).flavor == RTX:
        return f"{skipped['reason']}: pip install 'tokensieve[rtx]', then tokensieve build {model} --target {target}"
    return (f"{skipped['reason']}: on the GPU machine (JetPack, or NVIDIA's tensorrt wheel) run "
            f"tokensieve build {model} --target local")


# --------------------------------------------------------------------------- bench


@dataclass
class BenchReport:
    backend: str
    batch: int
    threads: int | None
    dense: dict
    pruned: dict
    speedup: float
    ideal_speedup: float | None

    @property
    def ratio_to_ideal(self) -> float | None:
        return self.speedup / self.ideal_speedup if self.ideal_speedup else None

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio_to_ideal": self.ratio_to_ideal}


def bench(dense_onnx: str | Path, pruned_onnx: str | Path, *, ideal_speedup: float | None = None, batch: int = 1,
          threads: int | None = None, blocks: int = 4, iters: int = 20, warmup: int = 5, progress=None,
          backend: str = "onnxruntime", plugins: str | Path | None = None, cuda_graph: bool = False) -> BenchReport:
    """Dense vs pruned latency, one session/engine resident at a time, in alternating blocks (ABBA…).

    `backend` names a runner in tokensieve.runtime.RUNNERS: ONNX files for onnxruntime, engines for tensorrt.
    Per-batch sweeps, memory, the token sweep and the report files: tokensieve.benchmark.bench_folder.
    """
    from tokensieve.measure import runner_options, time_models
    from tokensieve.runtime import RUNNERS

    options = runner_options(backend, threads=threads, plugins=str(plugins) if plugins else None,
                             cuda_graph=cuda_graph)
    runner_cls = RUNNERS[backend]
    for p in (dense_onnx, pruned_onnx):
        if runner_cls.artifact_suffix == ".onnx" and not Path(p).is_file():
            raise ConfigError(f"ONNX file {str(p)!r} does not exist; run `tokensieve export` first")
    stats = time_models(runner_cls, {"dense": Path(dense_onnx), "pruned": Path(pruned_onnx)}, batch=batch,
                        blocks=blocks, iters=iters, warmup=warmup, options=options, progress=progress)
    d, p = stats["dense"], stats["pruned"]
    return BenchReport(d["device"], batch, threads, d, p, d["median_ms"] / p["median_ms"], ideal_speedup)


def bench_stage(result: ExportResult, stage_index: int = 0, *, threads: int | None = None, blocks: int = 4,
                iters: int = 50, warmup: int = 10) -> dict:
    """Latency of one pruning stage alone (score + select + reduce) on ONNX Runtime, same lowering as the export."""
    import tempfile

    from tokensieve.exporter.stage_onnx import stage_onnx
    from tokensieve.runtime.onnxruntime_runner import OrtRunner
    from tokensieve.runtime.timing import measure_alternating

    rs = result.stages[stage_index]
    heads = _num_heads(result.module)
    model, feeds = stage_onnx(rs.stage.method, rs.options, rs.keep, rs.num_prefix_tokens, batch=1,
                              tokens=rs.tokens_in, hidden=result.layout.hidden_size, heads=heads,
                              grid=result.layout.grid)
    with tempfile.TemporaryDirectory(prefix="tokensieve-stage-") as tmp:
        path = Path(tmp) / "stage.onnx"
        save_onnx(model, path)
        with OrtRunner(path, threads=threads, name="stage") as runner:
            np_feeds = {k: v.numpy() for k, v in feeds.items()}
            stats = measure_alternating({"stage": lambda: runner.infer(np_feeds)}, blocks=blocks, iters=iters, warmup=warmup)
    s = stats["stage"].to_dict()
    s.pop("samples_ms", None)
    return s


def _num_heads(module: nn.Module) -> int:
    cfg = getattr(getattr(module, "model", module), "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        raise ConfigError("bench_stage needs the model's number of attention heads (config.num_attention_heads)")
    return heads


# --------------------------------------------------------------------------- export folder (the main job)


REPORT_SCHEMA = "tokensieve.export/1"   # report.json; bump when a reader would misread an older one


def read_export_report(folder: str | Path, required: tuple[str, ...] = ()) -> dict:
    """OUT/report.json as a dict; a one-line ConfigError if it is missing, unreadable, of another schema version or
    lacks `required` keys."""
    from tokensieve.manifest import check_version, read_json_object

    folder = Path(folder)
    path = folder / ARTIFACTS["report"]
    if not path.exists():
        raise ConfigError(f"{str(folder)!r} has no report.json; pass a folder written by `tokensieve export`")
    report = read_json_object(path, "a tokensieve export report", "re-run `tokensieve export`")
    check_version(report, path, "schema", REPORT_SCHEMA, "schema version", required,
                  "re-run `tokensieve export` into that folder", REPORT_SCHEMA)
    engines = [e["file"] for e in report.get("engines", []) if isinstance(e, dict) and isinstance(e.get("file"), str)]
    check_folder_files(folder, [*ARTIFACTS.values(), WEIGHTS, *engines, "model.pt2", "dense.pt2"],
                       "re-export into a new folder")
    return report


def check_verified(ver: VerifyReport) -> None:
    """Raise a one-line VerificationError naming what differs unless `ver` passed."""
    from tokensieve.errors import VerificationError

    if ver.passed:
        return
    bad = [b for b, ok in zip(ver.stage_blocks, ver.indices_match) if not ok]
    if ver.nonfinite:
        what = f"NaN/Inf in the {' and '.join(ver.nonfinite)} output"
    elif not ver.shape_match:
        what = "the ONNX output's shape differs from eager's"
    elif bad:
        what = f"kept indices differ after block(s) {bad}"
    else:
        what = f"max abs diff {ver.max_abs_diff:.2e} > atol {ver.atol:g}"
    raise VerificationError(f"Verification failed: {what}; see report.json, and please report this model/recipe")


def export_folder(model: str, recipe: Recipe | str, out: str | Path, *, target: str = DEFAULT_TARGET,
                  precision: Precision | str = DEFAULT_PRECISION, max_batch: int = DEFAULT_MAX_BATCH, plugins: str | Path | None = None, build: bool = True,
                  verify_inputs: int = 8, atol: float = 1e-4, threads: int | None = None, bench: bool = True,
                  bench_blocks: int = 4, bench_iters: int = 20, progress=None, batch: int | None = None,
                  outputs=None, image_size: tuple[int, int] | None = None, build_options: dict | None = None,
                  optimize: bool = False, calibration=None) -> dict:
    """`tokensieve export`: load `model` (`default`, `tiny` or a HF folder), export it with `recipe` into `out`
    (model.onnx, model.debug.onnx, dense.onnx), verify against eager, build the engine (unless `build=False`), time
    dense vs pruned (unless `bench=False`) and write report.json; returns the report.

    Arguments are checked before anything is loaded; engines an earlier export left in `out` are removed (they were
    built from the ONNX files replaced here); a failed verification writes report.json, then raises
    VerificationError. `batch`: the batch of a model that fixes it (export's `batch`). `outputs`: the model outputs
    to export (export's `outputs`). `image_size` (H, W): export for that input size instead of the config's (the
    model's position-embedding interpolation). `build_options`: build()'s engine options (opt_batch, timing_cache,
    workspace_mib, builder_optimization_level, layer_info). Without the TensorRT flavor the target needs, the engine is
    skipped (report["engine_skipped"]; engine_hint says how to get it). `progress(message)` hears each step.
    `optimize`: also ORT's transformer optimizer on dense and pruned (OPTIMIZED's files, verified like the export,
    report["optimize"], and timed: report["bench_optimized"]). `precision="int8"`: int8 Q/DQ copies (QUANTIZED's
    files, symmetric so TensorRT takes them) compared with fp32 (report["int8"]: kept-token overlap, cosine; timed:
    report["bench_int8"]), the engine built from model.int8.onnx; `calibration(input_shape, folder)` gives the
    calibration batches (`folder` holds the export's preprocessor_config.json; None: seeded random inputs).

    Faults: one writer at a time (a second one fails with one line); the folder holds the previous complete export
    until the final swap, and a run that stops early (an error, Ctrl-C) leaves it so; a run that created `out`
    removes it again. A killed run (SIGKILL) leaves a staging folder and temp files the next run removes."""
    from tokensieve.fileio import check_interrupted, interruptible

    def say(msg):
        check_interrupted()   # each step: a Ctrl-C Python swallowed (in a finalizer) stops the job here
        if progress:
            progress(msg)

    recipe = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    if build:  # a bad target / max batch / precision fails now, not after the export
        BuildSpec(target=target, max_batch=max_batch, precision=Precision.parse(precision), plugin_library=plugins,
                  **(build_options or {}))
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"--batch {batch!r} must be an integer >= 1")
    created = not os.path.lexists(out)
    out = ensure_writable_dir(out)
    with interruptible(), folder_lock(out) as out:   # a second writer fails here, before touching the folder
        try:
            return _export_folder(model, recipe, out, target, precision, max_batch, plugins, build, verify_inputs,
                                  atol, threads, bench, bench_blocks, bench_iters, say, batch, outputs, image_size,
                                  build_options, optimize, calibration)
        except BaseException:
            if created:  # leave no empty output folder behind; files written so far (report.json) stay
                import contextlib

                with contextlib.suppress(OSError):
                    out.rmdir()
            raise


# the HF files an export folder holds (models.hf_files) -> their key in report.json's "files"
HF_FILES = ("config.json", "preprocessor_config.json")
HF_KEYS = {"config.json": "config", "preprocessor_config.json": "preprocessor"}
STAGING_PREFIX = ".tokensieve-staging-"   # a run's files before they replace the folder's (export_folder)
# every file name an export may own in its folder: removed before a new export's files move in (_move_into_place)
_OWNED = (*(ARTIFACTS[k] for k in SAVED_PARTS), *(f"{n}.data" for n in (ARTIFACTS[k] for k in SAVED_PARTS)),
          "model.pt2", "dense.pt2", WEIGHTS, *HF_FILES, *OPTIMIZED.values(),
          *QUANTIZED.values())   # + the folder's engines (folder_engines) and their .json


def remove_stale_staging(out: Path) -> None:
    """Remove what killed runs left in `out` (the caller holds its folder lock, so no live run owns any of it):
    staging folders and the temp files of the atomic writers (fileio.atomic_path) of the export's file names."""
    import shutil

    from tokensieve.fileio import remove_stale_temps

    for leftover in out.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    engines = folder_engines(out)
    remove_stale_temps(out, (*_OWNED, *engines, *(f"{e}.json" for e in engines), ARTIFACTS["report"]))


def _export_folder(model_name, recipe, out: Path, target, precision, max_batch, plugins, do_build, verify_inputs, atol,
                   threads, do_bench, bench_blocks, bench_iters, say, batch=None, outputs=None, image_size=None,
                   build_options=None, optimize=False, calibration=None) -> dict:
    """Everything is written into a staging folder inside `out` and moved into place at the end (report.json last):
    until then `out` still holds the previous complete export; a run killed midway leaves only its staging folder,
    which the next run (holding the folder lock) removes."""
    import shutil
    import tempfile

    from tokensieve.fileio import write_error

    remove_stale_staging(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as e:
        raise write_error(e, out / STAGING_PREFIX, "create a staging folder in") from e
    try:
        report = _export_into(model_name, recipe, stage, target, precision, max_batch, plugins, do_build,
                              verify_inputs, atol, threads, do_bench, bench_blocks, bench_iters, say, batch, outputs,
                              image_size, build_options, optimize, calibration)
        removed = _move_into_place(stage, out, report)
        if removed:
            say(f"      removed stale engines of an earlier export: {', '.join(removed)}")
    except ConfigError as e:  # a write that failed in the staging folder: name the file where the user will look
        if str(stage) not in str(e):
            raise
        raise type(e)(str(e).replace(str(stage), str(out))) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    check_verified(_verify_report(report["verify"]))
    if "optimize" in report:
        check_verified(_verify_report(report["optimize"]["verify"]))
    return report


def _verify_report(d: dict) -> VerifyReport:
    return VerifyReport(**{f.name: d[f.name] for f in fields(VerifyReport)})


def _move_into_place(stage: Path, out: Path, report: dict) -> list[str]:
    """Replace the folder's export by the staged one; returns the stale engines removed.

    The final report.json is written into the staging folder first (a full disk fails here, the folder untouched);
    then, with Ctrl-C held, only unlinks and renames: the old report.json goes (from here the folder holds no
    complete export), then every file of the earlier export (model.onnx, ..., its engines), then the staged files
    move in, report.json last. A run killed in between leaves files of one run only, without report.json."""
    from tokensieve.fileio import check_interrupted, deferred_interrupts, write_error, write_json_atomic

    for files in (report["files"], *(report[k]["files"] for k in ("optimize", "int8") if k in report)):
        files.update({k: str(out / Path(v).name) for k, v in files.items()})   # staged paths -> the folder's
    if "build" in report:
        report["build"] |= {k: str(out / Path(report["build"][k]).name) for k in ("engine", "metadata")}
    write_json_atomic(stage / ARTIFACTS["report"], report)
    staged = sorted(p for p in stage.iterdir() if p.name != ARTIFACTS["report"]) + [stage / ARTIFACTS["report"]]
    old_report = out / ARTIFACTS["report"]
    check_interrupted()
    with deferred_interrupts():
        try:
            if old_report.is_file() or old_report.is_symlink():
                old_report.unlink()
            removed = remove_stale_engines(out, folder_engines(out), keep=())
            for name in _OWNED:
                file = out / name
                if file.is_file() or file.is_symlink():
                    file.unlink()
            for file in staged:
                os.replace(file, out / file.name)
        except OSError as e:
            raise write_error(e, out, "move the new export into") from e
    return removed


def _export_into(model_name, recipe, out: Path, target, precision, max_batch, plugins, do_build, verify_inputs, atol,
                 threads, do_bench, bench_blocks, bench_iters, say, batch=None, outputs=None, image_size=None,
                 build_options=None, optimize=False, calibration=None) -> dict:
    """The main job's steps, writing into the (staging) folder `out`; a failed verification stops before the build
    and returns the report that records it."""
    from tokensieve.fileio import write_bytes_atomic
    from tokensieve.models import hf_files, load_model, model_dir

    t_all = time.perf_counter()
    say(f"[1/5] loading model {model_name!r}")
    model, shape = load_model(model_name, image_size)
    say(f"[2/5] exporting with recipe {recipe} (torch.export -> graph passes -> ONNX)")
    t0 = time.perf_counter()
    result = export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), recipe, batch=batch,
                    outputs=outputs)
    paths = save(result, out)
    final = out.parent if out.name.startswith(STAGING_PREFIX) else out
    source = model_dir(model_name)
    if source is not None and Path(source).resolve() == final.resolve():  # into the model folder: its own, unchanged
        hf = {name: (final / name).read_bytes() for name in HF_FILES if (final / name).is_file()}
    else:
        hf = hf_files(model_name, model, result.input_shape)
    for name, data in hf.items():   # config.json, preprocessor_config.json
        paths[HF_KEYS[name]] = write_bytes_atomic(out / name, data)
    export_s = time.perf_counter() - t0
    # a model that fixes its batch was exported for input_shape[0] images: verify and time it at that batch
    run_batch = 1 if result.dynamic_batch else result.input_shape[0]
    report = {"schema": REPORT_SCHEMA, "model": str(model_name), **result.summary(), "export_seconds": export_s,
              "files": {k: str(v) for k, v in paths.items()}}
    say(f"[3/5] verifying against eager on {verify_inputs} random inputs")
    ver = verify(result, paths["debug"], num_inputs=verify_inputs, atol=atol, threads=threads, batch=run_batch)
    report["verify"] = {**ver.to_dict(), "output": result.output_name, "outputs": result.outputs}
    if not ver.passed:
        return report
    int8 = Precision.parse(precision) is Precision.INT8
    if optimize:
        say("      --optimize: ONNX Runtime's transformer optimizer on dense and pruned, verified again")
        fused = optimize_files(out)
        over = verify(result, out / OPTIMIZED["debug"], num_inputs=verify_inputs, atol=atol, threads=threads,
                      batch=run_batch)
        report["optimize"] = {"fused": fused, "verify": over.to_dict(),
                              "files": {k: str(out / v) for k, v in OPTIMIZED.items()}}
        if not over.passed:
            remove_files(out, OPTIMIZED.values())
            return report
    if int8:
        say("      int8: Q/DQ copies of dense and pruned (symmetric, score math float), compared with fp32")
        batches = calibration(result.input_shape, out) if calibration is not None else None
        report["int8"] = {**quantize_files(out, result.input_shape, len(result.stages), batches,
                                           num_inputs=verify_inputs, batch=max(2, run_batch), symmetric=True),
                          "files": {k: str(out / v) for k, v in QUANTIZED.items()}}
    report["engines"] = []
    missing = _missing_tensorrt(target) if do_build else None
    if missing:  # a plain install: the ONNX result is complete; the summary says how to get engines (engine_hint)
        say(f"[4/5] engine build skipped ({missing})")
        report["engine_skipped"] = {"reason": missing, "target": target}
    elif do_build:
        say(f"[4/5] building engine for {target}")
        meta = {"recipe": result.recipe.to_dict(), "tokens_per_block": result.tokens_per_block(),
                "model": str(model_name)}
        source = out / QUANTIZED["model"] if int8 else paths["model"]
        info = build(source, out / default_engine_name(paths["model"], target, precision), target=target,
                     max_batch=max_batch, precision=precision, extra_metadata={"tokensieve": meta},
                     plugin_library=plugins, **(build_options or {}))
        report["build"] = {"target": target, "precision": precision, "engine": str(info.engine_path),
                           "metadata": str(info.metadata_path), "seconds": info.build_seconds,
                           "size_bytes": info.size_bytes, "flavor": info.metadata["flavor"],
                           "tensorrt_version": info.metadata["tensorrt_version"]}
        report["engines"] = [engine_entry(info)]
    else:
        say("[4/5] engine build skipped (--no-build)")
    if do_bench:
        say("[5/5] benchmarking dense vs pruned on ONNX Runtime (alternating blocks)")
        b = bench(paths["dense"], paths["model"], ideal_speedup=result.ideal_speedup, threads=threads,
                  blocks=bench_blocks, iters=bench_iters, progress=lambda m: say(f"      {m}"), batch=run_batch)
        report["bench"] = b.to_dict()
        pairs = ([("bench_optimized", OPTIMIZED, "optimized")] if optimize else []) + \
            ([("bench_int8", QUANTIZED, "int8")] if int8 else [])
        for key, names, what in pairs:
            say(f"      {what} pair: {names['dense']} vs {names['model']}")
            b = bench(out / names["dense"], out / names["model"], ideal_speedup=result.ideal_speedup, threads=threads,
                      blocks=bench_blocks, iters=bench_iters, progress=lambda m: say(f"      {m}"), batch=run_batch)
            report[key] = b.to_dict()
    else:
        say("[5/5] benchmark skipped (--no-bench)")
    report["total_seconds"] = time.perf_counter() - t_all
    return report
