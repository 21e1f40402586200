"""Latency-aware budgets: snap each stage's K to the latency staircase of the target.

Latency on a real target is a staircase in the token count, not a line: kernels work on tiles, so a few
tokens more can cost nothing, and a few tokens less can even be slower (Eliopoulos et al., WACV 2025: at
batch 1 on edge GPUs pruning can make a ViT slower than dense). `tune` measures, for each stage, the
latency against the kept-token count K in a window around the requested K, finds the steps and moves K
to the largest K that costs the same time (more tokens for free), never to a K slower than dense.

How it measures, and why this way: the sweep times ONE transformer block (the first block after the stage,
exported once with a dynamic token axis, then fixed to each candidate count, so each candidate is a
static-shape model as in a real export) at `prefix + K + extra` tokens, plus the same block at the stage's
unpruned token count as the per-stage dense point. A stage's K sets the token count of every block up to
the next stage and nothing else, and those blocks are identical in shape, so their latency is the block's
latency times a constant: the staircase of one block is the staircase of the stage. One block is ~1/12
of a ViT-S, and its ONNX is exported once per stage (~2 s), while a whole-model export per candidate
costs ~13 s each. The pruning stage itself (score + TopK + gather, < 1 % of the model, see README) is
not swept; it is in the final check. On ONNX Runtime the sweep's sessions run without spinning threads
(see `OrtRunnerFactory`); a stage whose sweep is too noisy to resolve tol keeps its requested K.

The final check times dense, the requested recipe and the snapped recipe in ONE alternating-block run
(`runtime.timing.measure_alternating`); the snapped recipe is chosen only if its median beats dense's
(else dense is chosen and the report says so) and it costs at most tol more than the requested one (else
the requested recipe is kept): see `choose`.

The backend is a runner factory `factory(onnx_path, name) -> runner` (a context manager with
`infer(feeds)`): ONNX Runtime (`OrtRunnerFactory`), or TensorRT (`TrtRunnerFactory`, one engine built per
ONNX file; `tokensieve tune --backend tensorrt`).
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokensieve.errors import ConfigError, ExportError, first_line
from tokensieve.exporter.onnx_files import save_onnx
from tokensieve.fileio import write_bytes_atomic
from tokensieve.recipe import Budget, Recipe, ResolvedStage, Stage, resolve_recipe
from tokensieve.targets.base import DEFAULT_PRECISION

__all__ = ["Step", "Snap", "find_steps", "snap_keep", "candidate_keeps", "OrtRunnerFactory", "TrtRunnerFactory", "TuneReport", "tune",
           "median_noise", "choose", "recipe_file_text", "check_recipe_path", "save_recipe", "write_recipe",
           "format_tune"]

DEFAULT_TOL = 0.02


# --------------------------------------------------------------------------- staircase (pure)


@dataclass(frozen=True)
class Step:
    """A flat run of the staircase: candidates first..last (K) whose latency stays within tol of `floor_ms`."""

    first: int
    last: int
    floor_ms: float


@dataclass(frozen=True)
class Snap:
    """What to do with one stage: keep K tokens (None: drop the stage, nothing in the window beats dense)."""

    keep: int | None
    reason: str
    steps: tuple[Step, ...]


def find_steps(points: Mapping[int, float], tol: float = DEFAULT_TOL) -> list[Step]:
    """Split latency-vs-K points into steps, scanning K upward.

    A step's floor is the lowest latency seen in it; the next K starts a new step when its latency jumps
    above floor·(1+tol), or drops below floor·(1-tol) (a non-monotone staircase). The floor is compared with
    the step's lowest point, not the previous one, so a steady slope cannot chain into one long step.
    """
    steps: list[Step] = []
    for k in sorted(points):
        t = float(points[k])
        if steps and steps[-1].floor_ms * (1 - tol) <= t <= steps[-1].floor_ms * (1 + tol):
            s = steps[-1]
            steps[-1] = Step(s.first, k, min(s.floor_ms, t))
        else:
            steps.append(Step(k, k, t))
    return steps


def snap_keep(points: Mapping[int, float], requested: int | None, dense_ms: float, tol: float = DEFAULT_TOL,
              noise: float = 0.0) -> Snap:
    """Choose a stage's K from measured latencies `points` {K: ms} and the unpruned latency `dense_ms`.

    - Only a K faster than dense by more than tol is ever chosen (pruning that does not measurably pay is not
      worth its accuracy); if no K qualifies, keep=None: drop the stage.
    - If the requested K qualifies: walk up from it while the latency stays at most the requested K's ·(1+tol)
      and take the last K: the right edge of the requested K's step (more tokens for the same time). It never
      keeps fewer tokens than requested, and never jumps over a dearer K to a cheaper one further up, so one
      lucky measurement at the far end of the window cannot pull K there.
    - If the requested K is not faster than dense (or not measured): the largest K within tol of the fastest
      measured latency (the right edge of the bottom step), which may keep fewer tokens than requested.
    - `noise` is the relative standard error of one point's median; above tol/2 two points cannot be told
      apart at tol, so the requested K is kept as it is.
    Ties resolve to the larger K.
    """
    if not points:
        raise ConfigError("snap_keep needs at least one measured K")
    if tol < 0 or not math.isfinite(tol):
        raise ConfigError(f"tol={tol!r} must be a finite number >= 0 (a relative latency tolerance, e.g. 0.02)")
    steps = tuple(find_steps(points, tol))
    if requested in points and 2 * noise > tol:
        return Snap(requested, f"latency noise ±{noise:.1%} exceeds tol/2: steps not resolved, kept the requested K "
                               "(raise --sweep-iters or run on a quiet machine)", steps)
    faster = {k: float(t) for k, t in points.items() if float(t) < dense_ms * (1 - tol)}
    if not faster:
        best = min(points.values())
        return Snap(None, f"no K in the window beats dense ({best:.3g} vs {dense_ms:.3g} ms): stage dropped", steps)
    if requested in faster:
        limit, keep = faster[requested] * (1 + tol), requested
        for k in sorted(k for k in points if k > requested):
            if k not in faster or faster[k] > limit:
                break
            keep = k
        why = "requested K is the right edge of its step" if keep == requested else "more tokens for the same time"
        return Snap(keep, why, steps)
    limit = min(faster.values()) * (1 + tol)
    keep = max(k for k, t in faster.items() if t <= limit)
    return Snap(keep, "requested K is not faster than dense here: snapped to the fastest step", steps)


def median_noise(samples_ms) -> float:
    """Relative standard error of a median, distribution-free: half the width of the order-statistic 95 %
    interval (ranks n/2 ± 0.98·√n) over 1.96. Unlike an IQR-based estimate it is not inflated by a heavy tail
    (on a busy CPU a quarter of the calls can be slow) that leaves the median itself well determined."""
    x = np.asarray(samples_ms, dtype=float)
    r = 100 * 0.98 / math.sqrt(len(x))
    lo, med, hi = np.percentile(x, [max(0.0, 50 - r), 50, min(100.0, 50 + r)])
    return float((hi - lo) / (2 * 1.96) / med) if med > 0 else math.inf


def candidate_keeps(requested: int, num_patches: int, window: float, max_candidates: int) -> list[int]:
    """K values around `requested`: ±ceil(window·num_patches), at most `max_candidates`, always with `requested`.

    The step is the smallest integer that keeps the count within `max_candidates`; the grid is aligned on
    `requested` and clipped to 1 <= K < num_patches (a requested K outside that range is returned alone).
    """
    if not (0 < window <= 1):
        raise ConfigError(f"--window {window!r} must be a fraction of the patch tokens, 0 < window <= 1 (e.g. 0.1)")
    if max_candidates < 2:
        raise ConfigError(f"--candidates {max_candidates!r} must be at least 2")
    half = max(1, math.ceil(window * num_patches))
    lo, hi = max(1, requested - half), min(num_patches - 1, requested + half)
    left, right = max(0, requested - lo), max(0, hi - requested)
    step = next(s for s in range(1, max(left, right) + 2) if left // s + right // s + 1 <= max_candidates)
    return list(range(requested - left // step * step, requested + right // step * step + 1, step))


# --------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class OrtRunnerFactory:
    """`factory(onnx_path, name)` -> an OrtRunner; the backend of `tune` on this machine.

    The sweep keeps ~20 sessions open and switches between them; with spinning worker threads the session
    timed last keeps spinning into the next one's block, so a quarter of the calls are 1.5-3x slow (measured on
    ViT-S blocks here: median noise 1-14 % with spinning, < 1 % without). So the sweep uses spinning=False: its
    latencies run ~15 % higher but keep the shape of the curve; the final run uses ONNX Runtime's default.
    """

    threads: int | None = None
    spinning: bool = True

    @property
    def backend(self) -> str:
        from tokensieve.runtime.onnxruntime_runner import default_providers

        return "onnxruntime:" + ",".join(default_providers()) + ("" if self.spinning else " (no spinning)")

    def __call__(self, onnx_path: Path, name: str):
        from tokensieve.runtime.onnxruntime_runner import OrtRunner

        return OrtRunner(onnx_path, threads=self.threads, spinning=self.spinning, name=name)


@dataclass(frozen=True)
class TrtRunnerFactory:
    """`factory(onnx_path, name)` -> a TrtRunner on an engine built next to the ONNX (`<stem>.engine` + metadata,
    reused when it exists): `tune` on a GPU, the sweep's single blocks and the final models alike.

    `target` local builds with standard TensorRT for this GPU; rtx-smXX with TensorRT-RTX (the build needs no
    GPU, running it does). The profile covers batch 1..max_batch, so set it to tune's --batch.
    """

    target: str = "local"
    precision: str = DEFAULT_PRECISION.value
    max_batch: int = 1
    plugins: str | None = None
    cuda_graph: bool = False

    @property
    def backend(self) -> str:
        return f"tensorrt:{self.target} {self.precision}" + (" +plugins" if self.plugins else "") + (
            " (CUDA graph)" if self.cuda_graph else "")

    def __call__(self, onnx_path: Path, name: str):
        from tokensieve.targets import BuildSpec, get_target

        target = get_target("tensorrt")
        engine = Path(onnx_path).with_suffix(".engine")
        if not engine.is_file():
            spec = BuildSpec(target=self.target, precision=self.precision, max_batch=self.max_batch,
                             plugin_library=self.plugins)
            target.build(onnx_path, spec, engine)
        return target.runner(engine, plugins=self.plugins, cuda_graph=self.cuda_graph, name=name)


def _measure(factory, models: dict[str, tuple[Path, dict]], *, blocks: int, iters: int, warmup: int, progress=None):
    """Open one runner per model and time them all in one alternating-block run -> {name: LatencyStats}."""
    from tokensieve.runtime.timing import measure_alternating

    with contextlib.ExitStack() as stack:
        runners = {name: stack.enter_context(factory(path, name)) for name, (path, _) in models.items()}
        cases = {name: (lambda r=runners[name], f=models[name][1]: r.infer(f)) for name in models}
        return measure_alternating(cases, blocks=blocks, iters=iters, warmup=warmup, progress=progress)


def _summary(stats) -> dict:
    return {k: v for k, v in stats.to_dict().items() if k != "samples_ms"}


# --------------------------------------------------------------------------- one block alone


def _block_module(module, block_path: str, example):
    """The block at `block_path` as a module of its hidden states alone, with the other call arguments it
    received in one eager run fixed (no-op attention masks dropped) -> (module, example hidden states)."""
    import torch
    from torch import Tensor, nn

    from tokensieve.exporter.trace import first_tensor
    from tokensieve.graph_passes.methods.reference import is_trivial_mask

    block = module.get_submodule(block_path)
    seen = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.suppress(_Captured):
            module(example)
    finally:
        handle.remove()
    args, kwargs = list(seen["args"]), dict(seen["kwargs"])
    hidden = args.pop(0) if args else kwargs.pop(next(iter(kwargs)))
    n = hidden.shape[1]

    def fixed(name, v):
        if isinstance(v, Tensor):
            if is_trivial_mask(v):
                return None
            if n in v.shape:
                raise ConfigError(f"tune times block {block_path!r} alone, but its argument {name!r} {tuple(v.shape)} "
                                  f"depends on the token count; this model is not supported by tune yet")
        return v

    args = [fixed(f"#{i + 1}", v) for i, v in enumerate(args)]
    kwargs = {k: fixed(k, v) for k, v in kwargs.items()}

    class BlockAlone(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, hidden_states):
            return first_tensor(self.block(hidden_states, *args, **kwargs))

    return BlockAlone().eval(), hidden


class _Captured(Exception):
    """Stops the eager run once the block's inputs are captured."""


def _block_onnx(module, block_path: str, example, batch: int):
    """ONNX of one block for `batch` inputs with a dynamic token axis -> (model, hidden size, token axis symbol)."""
    import torch

    from tokensieve.exporter.onnx_translations import TRANSLATIONS
    from tokensieve.exporter.trace import quiet

    block, hidden = _block_module(module, block_path, example)
    hidden = hidden[:1].expand(batch, *hidden.shape[1:]).contiguous()
    try:
        with quiet(), torch.no_grad():
            tokens = {"hidden_states": {1: torch.export.Dim("tokens", min=2, max=65536)}}
            ep = torch.export.export(block, (hidden,), dynamic_shapes=tokens, strict=False)
            prog = torch.onnx.export(ep, dynamo=True, opset_version=18, input_names=["hidden_states"], output_names=["out"],
                                     optimize=True, verbose=False, custom_translation_table=TRANSLATIONS)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export / torch.onnx raise many types
        raise ExportError(f"Exporting block {block_path!r} alone for tune failed: {type(e).__name__}: "
                          f"{first_line(e)}") from e
    model = prog.model_proto
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return model, hidden.shape[-1], dims[1].dim_param


def _fix_tokens(model, symbol: str, tokens: int):
    """A copy of the block ONNX with its token axis fixed to `tokens`: a static-shape model, as in a real export."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_value = tokens
    return m


# --------------------------------------------------------------------------- tune


@dataclass
class StageTune:
    """The sweep of one stage."""

    after_block: int
    method: str
    timed_block: int | None          # the block timed alone (None: no block after this stage)
    blocks_affected: int              # blocks that run at this stage's output count
    requested_keep: int
    snapped_keep: int | None          # None: stage dropped
    reason: str
    tokens_in: int                    # under the snapped earlier stages
    window: tuple[int, int]
    noise: float = 0.0                # median relative standard error of the sweep's medians
    dense_block: dict | None = None   # the timed block at tokens_in
    candidates: list[dict] = field(default_factory=list)   # {keep, tokens, median_ms, p90_ms}
    steps: list[dict] = field(default_factory=list)


@dataclass
class TuneReport:
    model: str
    backend: str                     # runs the final models
    sweep_backend: str               # runs the single blocks
    batch: int
    window: float
    tol: float
    requested: dict                  # {recipe, shorthand, keep, tokens, median_ms, p90_ms, ...}
    snapped: dict
    dense: dict
    stages: list[StageTune]
    chosen: str                      # "snapped", "requested" or "dense" (see `choose`)
    message: str
    seconds: dict[str, float]
    recipe_file: str | None = None
    snapped_recipe: Recipe | None = field(default=None, repr=False)
    requested_recipe: Recipe | None = field(default=None, repr=False)

    @property
    def chosen_recipe(self) -> Recipe | None:
        """The recipe to export (None: dense, nothing to prune)."""
        return {"snapped": self.snapped_recipe, "requested": self.requested_recipe}.get(self.chosen)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = {k: v for k, v in asdict(self).items() if k not in ("snapped_recipe", "requested_recipe")}
        d["chosen_shorthand"] = self.chosen_recipe.shorthand() if self.chosen_recipe else "dense"
        return d


def tune(model, example, recipe: Recipe, *, model_name: str = "model", runner_factory: Callable | None = None,
         sweep_runner_factory: Callable | None = None, batch: int = 1, window: float = 0.1, max_candidates: int = 21,
         tol: float = DEFAULT_TOL, sweep_blocks: int = 4, sweep_iters: int = 20, sweep_warmup: int = 5,
         blocks: int = 4, iters: int = 20, warmup: int = 5, progress: Callable[[str], None] | None = None) -> TuneReport:
    """Sweep K per stage around `recipe`'s budgets, snap each to its staircase, then time dense / requested /
    snapped in one alternating run. `example` is one (1, C, H, W) input for tracing.

    `runner_factory(onnx_path, name)` runs the final models, `sweep_runner_factory` the single blocks (default:
    the same factory; without either, ONNX Runtime, the sweep without spinning threads: see OrtRunnerFactory).
    """
    from tokensieve import api

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--batch {batch!r} must be a positive integer")
    if not recipe.stages:
        raise ConfigError("tune needs a recipe with at least one stage, e.g. --prune cls-topk@3,6,9:0.7")
    if tol < 0 or not math.isfinite(tol):
        raise ConfigError(f"--tol {tol!r} must be a finite number >= 0 (a relative latency tolerance, e.g. 0.02)")
    candidate_keeps(1, 2, window, max_candidates)  # validate window / candidates before any work
    factory = runner_factory or OrtRunnerFactory()
    sweep_factory = sweep_runner_factory or runner_factory or OrtRunnerFactory(spinning=False)
    say = progress or (lambda m: None)
    seconds: dict[str, float] = {}
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    say(f"exporting the requested recipe {recipe}")
    requested = api.export(model, example, recipe)
    seconds["export_requested"] = time.perf_counter() - t0
    num_blocks, layout = len(requested.block_paths), requested.layout
    stages: list[StageTune] = []
    kept: list[Stage] = []

    with tempfile.TemporaryDirectory(prefix="tokensieve-tune-") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        for i, rs in enumerate(requested.stages):
            st = _sweep_stage(requested, example, i, rs, kept, num_blocks, tmpdir, sweep_factory, batch=batch,
                              window=window, max_candidates=max_candidates, tol=tol, blocks=sweep_blocks,
                              iters=sweep_iters, warmup=sweep_warmup, rng=rng, say=say)
            stages.append(st)
            if st.snapped_keep is not None:
                kept.append(Stage(rs.stage.method, rs.stage.after_block, Budget(count=st.snapped_keep), rs.stage.params))
        seconds["sweep"] = time.perf_counter() - t0

        snapped_recipe = Recipe(tuple(kept))
        t0 = time.perf_counter()
        resolved = resolve_recipe(snapped_recipe, num_blocks, layout.num_tokens, layout.num_prefix_tokens)
        if [x.keep for x in resolved] == [rs.keep for rs in requested.stages]:
            snapped = requested  # the same budgets: the same ONNX, no second export
        elif snapped_recipe.stages:
            say(f"exporting the snapped recipe {snapped_recipe}")
            snapped = api.export(model, example, snapped_recipe)
        else:
            snapped = None
        seconds["export_snapped"] = time.perf_counter() - t0
        pixel = {"pixel_values": rng.standard_normal((batch, *requested.input_shape[1:])).astype(np.float32)}
        protos = {"dense": requested.dense_onnx, "requested": requested.onnx_model}
        if snapped is not requested:  # the same model is timed once; all stages dropped: snapped = dense
            protos["snapped"] = snapped.onnx_model if snapped else requested.dense_onnx
        models = {}
        for name, proto in protos.items():
            save_onnx(proto, tmpdir / f"{name}.onnx")  # > 2 GB models: a .data file next to it
            models[name] = (tmpdir / f"{name}.onnx", pixel)
        t0 = time.perf_counter()
        say("timing dense, requested and snapped in one alternating run" + ("" if "snapped" in protos else
            " (snapped = requested: timed once)"))
        stats = _measure(factory, models, blocks=blocks, iters=iters, warmup=warmup, progress=lambda m: say(f"  {m}"))
        stats.setdefault("snapped", stats["requested"])
        seconds["final"] = time.perf_counter() - t0

    dense_row = {"shorthand": "dense", "tokens": [layout.num_tokens], **_summary(stats["dense"])}
    req_row = _recipe_row(stats["requested"], requested, recipe, dense_row)
    snap_row = _recipe_row(stats["snapped"], snapped, snapped_recipe, dense_row)
    chosen, message = choose(dense_row["median_ms"], req_row["median_ms"], snap_row["median_ms"] if snapped else None,
                             tol)
    backend, sweep_backend = (getattr(f, "backend", type(f).__name__) for f in (factory, sweep_factory))
    return TuneReport(model_name, backend, sweep_backend, batch, window, tol, req_row, snap_row, dense_row, stages,
                      chosen, message, seconds, snapped_recipe=snapped_recipe, requested_recipe=recipe)


def _recipe_row(stats, result, recipe: Recipe, dense_row: dict) -> dict:
    """One line of the final table: budgets, tokens, latency and speedup vs dense (result None: dense)."""
    s = _summary(stats)
    return {"shorthand": recipe.shorthand(), "recipe": recipe.to_dict(),
            "keep": [x.keep for x in result.stages] if result else [],
            "tokens": result.tokens if result else dense_row["tokens"],
            "ideal_speedup": result.ideal_speedup if result else 1.0, **s,
            "speedup": dense_row["median_ms"] / s["median_ms"]}


def choose(dense_ms: float, requested_ms: float, snapped_ms: float | None, tol: float = DEFAULT_TOL) -> tuple[str, str]:
    """The final pick from one alternating run of dense / requested / snapped medians.

    "snapped" only if it beats dense and costs at most tol more than requested (its promise: more tokens for
    the same time); a snapped recipe that does not beat dense falls back to "dense"; one that beats dense but
    is dearer than requested falls back to "requested". `snapped_ms` None: every stage was dropped.
    """
    if snapped_ms is None:
        return "dense", "no stage's K beats dense in its window: dense is chosen (no recipe written)"
    if snapped_ms >= dense_ms:
        return "dense", (f"the snapped recipe did not beat dense ({snapped_ms:.2f} vs {dense_ms:.2f} ms; requested "
                         f"{requested_ms:.2f} ms): falling back to dense (no recipe written)")
    if snapped_ms > requested_ms * (1 + tol):
        return "requested", (f"the snapped recipe beat dense ({snapped_ms:.2f} vs {dense_ms:.2f} ms) but cost "
                             f"{snapped_ms / requested_ms - 1:.1%} more than requested ({requested_ms:.2f} ms): "
                             "keeping the requested budgets")
    return "snapped", (f"snapped recipe {snapped_ms:.2f} ms vs dense {dense_ms:.2f} ms ({dense_ms / snapped_ms:.2f}x), "
                       f"requested {requested_ms:.2f} ms")


def _sweep_stage(requested, example, i: int, rs: ResolvedStage, kept: list[Stage], num_blocks: int, tmpdir: Path,
                 factory, *, batch, window, max_candidates, tol, blocks, iters, warmup, rng, say) -> StageTune:
    """Time the block after stage `i` at each candidate K (given the already snapped earlier stages) and snap."""
    layout = requested.layout
    nexts = [s.stage.after_block for s in requested.stages[i + 1:]]
    after = rs.stage.after_block
    affected = (nexts[0] if nexts else num_blocks - 1) - after
    prior = resolve_recipe(Recipe(tuple(kept)), num_blocks, layout.num_tokens, layout.num_prefix_tokens)
    tokens_in = prior[-1].tokens_out if prior else layout.num_tokens  # after the snapped earlier stages
    patches = tokens_in - layout.num_prefix_tokens
    ks = candidate_keeps(rs.keep, patches, window, max_candidates)
    st = StageTune(after, rs.stage.method, after + 1 if affected else None, affected, rs.keep, rs.keep, "", tokens_in,
                   (ks[0], ks[-1]))
    if not affected:
        st.reason = f"no block after block {after}: latency does not depend on K here; kept the requested K"
        return st
    out_tokens = {}
    for k in ks:
        r = _resolve(kept, rs.stage, k, num_blocks, layout)
        if r is not None and r.tokens_out >= 2:
            out_tokens[k] = r.tokens_out
    if not out_tokens:
        raise ConfigError(f"Stage {rs.stage.method}@{after}: no K in {ks[0]}..{ks[-1]} is valid for this method; "
                          "widen --window")

    say(f"stage @{after}: exporting block {after + 1} alone, timing K in {ks[0]}..{ks[-1]} ({len(out_tokens)} candidates)")
    proto, hidden, symbol = _block_onnx(requested.module, requested.block_paths[after + 1], example, batch)
    counts = sorted(set(out_tokens.values()) | {tokens_in})
    models = {}
    for n in counts:
        path = tmpdir / f"block{after + 1}.n{n}.onnx"
        write_bytes_atomic(path, _fix_tokens(proto, symbol, n).SerializeToString())
        models[f"N={n}"] = (path, {"hidden_states": rng.standard_normal((batch, n, hidden)).astype(np.float32)})
    stats = _measure(factory, models, blocks=blocks, iters=iters, warmup=warmup)
    for p in models.values():
        p[0].unlink()
    by_n = {n: stats[f"N={n}"] for n in counts}
    points = {k: by_n[n].median_ms for k, n in out_tokens.items()}
    st.noise = float(np.median([median_noise(x.samples_ms) for x in by_n.values()]))
    snap = snap_keep(points, rs.keep if rs.keep in points else None, by_n[tokens_in].median_ms, tol, st.noise)
    st.snapped_keep, st.reason = snap.keep, snap.reason
    st.dense_block = {"tokens": tokens_in, **_summary(by_n[tokens_in])}
    st.candidates = [{"keep": k, "tokens": n, "median_ms": by_n[n].median_ms, "p90_ms": by_n[n].p90_ms}
                     for k, n in sorted(out_tokens.items())]
    st.steps = [{"first": s.first, "last": s.last, "floor_ms": s.floor_ms} for s in snap.steps]
    return st


def _resolve(kept: list[Stage], stage: Stage, k: int, num_blocks: int, layout) -> ResolvedStage | None:
    """`stage` with K = k after the snapped stages `kept`; None if it does not fit (e.g. ToMe's merge limit)."""
    s = Stage(stage.method, stage.after_block, Budget(count=k), stage.params)
    try:
        return resolve_recipe(Recipe((*kept, s)), num_blocks, layout.num_tokens, layout.num_prefix_tokens)[-1]
    except ConfigError:
        return None


# --------------------------------------------------------------------------- output


def recipe_file_text(recipe: Recipe, suffix: str) -> str:
    """The recipe as a .toml / .json / .yaml file that `tokensieve export --prune FILE` reads back."""
    import json

    suffix = suffix.lower()
    if suffix == ".json":
        return json.dumps(recipe.to_dict(), indent=2) + "\n"
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if suffix != ".toml":
        raise ConfigError(f"-o {suffix!r}: write the recipe as .toml, .json or .yaml")
    lines = [f"# tokensieve tune: {recipe.shorthand()}"]
    for s in recipe.stages:
        d = s.to_dict()
        lines += ["", "[[stage]]", f"method = {json.dumps(d['method'])}", f"after_block = {d['after_block']}",
                  f"keep = {d['keep']}"]
        if d.get("params"):
            lines.append("[stage.params]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in d["params"].items()]
    return "\n".join(lines) + "\n"


RECIPE_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


def check_recipe_path(path: str | Path) -> Path:
    """-o must name a .toml/.json/.yaml file in a writable (or creatable) folder; checked before the (minutes long)
    run without creating anything (save_recipe creates the folder)."""
    from tokensieve.manifest import check_creatable_dir

    path = Path(path)
    if path.suffix.lower() not in RECIPE_SUFFIXES or path.is_dir():
        raise ConfigError(f"-o {str(path)!r} must be a recipe file ending in .toml, .json or .yaml, e.g. -o tuned.toml")
    check_creatable_dir(path.parent, "-o")
    return path


def save_recipe(report: TuneReport, path: str | Path) -> Path | None:
    """Write the chosen recipe atomically to `path`; None (nothing written) when dense was chosen."""
    if report.chosen_recipe is None:
        check_recipe_path(path)
        return None
    path = write_recipe(report.chosen_recipe, path)
    report.recipe_file = str(path)
    return path


def write_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write `recipe` atomically to the .toml/.json/.yaml file `path` (its folder created); `tune` and
    `tune --images` (tokensieve.pareto) write their chosen recipe with it."""
    from tokensieve.fileio import ensure_writable_dir

    path = check_recipe_path(path)
    ensure_writable_dir(path.parent)
    write_bytes_atomic(path, recipe_file_text(recipe, path.suffix).encode())
    return path


def _toml_value(v) -> str:
    import json

    return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)


def plot_tune(report: dict, path: str | Path) -> Path:
    """PNG: per stage, the timed block's latency vs kept K (the staircase), requested and snapped K marked."""
    from tokensieve.benchmark import require_matplotlib, save_figure

    plt = require_matplotlib()
    stages = [s for s in report["stages"] if s["candidates"]]
    if not stages:
        raise ConfigError("--plot: no stage was swept (no block after any stage), nothing to draw")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stages):
        pts = sorted(s["candidates"], key=lambda c: c["keep"])
        ax.step([c["keep"] for c in pts], [c["median_ms"] for c in pts], where="mid", color="gray", alpha=0.5)
        ax.plot([c["keep"] for c in pts], [c["median_ms"] for c in pts], "o", ms=3, label="block median")
        ms = {c["keep"]: c["median_ms"] for c in pts}
        for k, style, name in ((s["requested_keep"], "v", "requested"), (s["snapped_keep"], "^", "snapped")):
            if k in ms:
                ax.plot([k], [ms[k]], style, ms=9, label=f"{name} K={k}")
        if s.get("dense_block"):
            ax.axhline(s["dense_block"]["median_ms"], color="gray", linestyle="--", label="dense block")
        ax.set(xlabel=f"K kept after block {s['after_block']}", ylabel="block latency ms",
               title=f"@{s['after_block']} ({s['method']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"tokensieve tune: {report['model']} on {report['sweep_backend']}, batch {report['batch']}")
    return save_figure(fig, path)


def format_tune(report: dict) -> str:
    """The printed table of a TuneReport.to_dict()."""
    r = report
    lines = [f"tokensieve tune: {r['model']} on {r['backend']}, batch {r['batch']}, window ±{r['window']:g} of the "
             f"patches, tol {r['tol']:g}; blocks swept on {r['sweep_backend']}", ""]
    lines.append(f"  {'stage':<6} {'window K':>9} {'req K':>6} {'snap K':>7} {'block ms req→snap':>18} {'dense blk':>10} "
                 f"{'blocks':>6} {'noise':>6}  reason")
    for s in r["stages"]:
        ms = {c["keep"]: c["median_ms"] for c in s["candidates"]}
        pair = (f"{ms[s['requested_keep']]:.3f}→{ms[s['snapped_keep']]:.3f}"
                if s["requested_keep"] in ms and s["snapped_keep"] in ms else "-")
        dense = f"{s['dense_block']['median_ms']:.3f}" if s["dense_block"] else "-"
        snap = "drop" if s["snapped_keep"] is None else str(s["snapped_keep"])
        lines.append(f"  @{s['after_block']:<5} {s['window'][0]:>4}..{s['window'][1]:<4} {s['requested_keep']:>5} {snap:>7} "
                     f"{pair:>18} {dense:>10} {s['blocks_affected']:>6} {s['noise']:>6.1%}  {s['reason']}")
        if s["steps"]:
            steps = ", ".join(f"{x['first']}-{x['last']}: {x['floor_ms']:.3f}" if x["first"] != x["last"]
                              else f"{x['first']}: {x['floor_ms']:.3f}" for x in s["steps"])
            lines.append(f"  {'':<6} steps (K: floor ms) {steps}")
    lines += ["", f"  {'recipe':<10} {'K per stage':<16} {'tokens':<18} {'median ms':>10} {'p90 ms':>8} {'speedup':>8}  shorthand"]
    for name in ("dense", "requested", "snapped"):
        x = r[name]
        keep = ",".join(map(str, x.get("keep", []))) or "-"
        speed = f"{x.get('speedup', 1.0):.2f}x"
        lines.append(f"  {name:<10} {keep:<16} {'→'.join(map(str, x['tokens'])):<18} {x['median_ms']:>10.2f} "
                     f"{x['p90_ms']:>8.2f} {speed:>8}  {x['shorthand']}")
    lines += ["", f"  chosen: {r['chosen']} — {r['message']}"]
    if r.get("recipe_file"):
        lines.append(f"  wrote {r['recipe_file']}: tokensieve export --prune {r['recipe_file']}  "
                     f"(or --prune '{r['chosen_shorthand']}')")
    return "\n".join(lines)
