"""The plugins' CUDA kernels without TensorRT: build, call from Python, check against tokensieve's own methods, time.

`build_harness()` compiles plugin_src/token_compact.cu and plugin_src/diversity_select.cu (the very files the plugin
library builds, through their kernels.h launchers) together with harness/harness.cu into

    libtokensieve_kernel_harness.so   extern "C" ts_* entry points for ctypes (host arrays or device pointers)
    kernel_harness_driver             a small executable that runs every kernel path once (compute-sanitizer)

with nvcc alone (no TensorRT headers, cudart static). `KernelHarness(lib)` wraps the .so: numpy in, numpy out.
`check_kernels(harness)` runs both kernels on seeded random inputs with ties (duplicated tokens, equal importance)
against the standard-op form tokensieve already has: `divprune_select` / `mmr_select`
(graph_passes/methods/diversity.py, the math the ONNX export lowers, run by torch on the CPU) and the TokenCompact
semantics of compact_to_plugin.py (the first `capacity` kept rows in order, zero rows after them; data-dependent
form S = max(max_b count_b, min_count)). `time_divprune(harness, ...)` times the plugin kernel (CUDA events inside
the .so) against the same greedy selection in PyTorch on the GPU.

    python -m tokensieve.targets.tensorrt.kernel_harness build [--arch 90 --arch 86] [--out DIR]
    python -m tokensieve.targets.tensorrt.kernel_harness check --lib DIR/libtokensieve_kernel_harness.so
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensieve.errors import ConfigError, TargetError
from tokensieve.fileio import ensure_writable_dir

from .plugins import SOURCE_DIR, cache_dir, find_nvcc

HARNESS_DIR = Path(__file__).resolve().parent / "harness"
LIB_NAME = "libtokensieve_kernel_harness.so"
DRIVER_NAME = "kernel_harness_driver"
DEFAULT_ARCHS = ("90", "86")   # CMake spelling: "90" = sm_90 SASS + compute_90 PTX; "86-real" = SASS only
KERNEL_SOURCES = ("token_compact.cu", "diversity_select.cu")   # in plugin_src/, compiled as they are
_DEPENDS = ("kernels.h", "compact_scan.cuh")


@dataclass(frozen=True)
class HarnessBuild:
    lib: Path
    driver: Path
    seconds: float
    cached: bool


def _sources() -> list[Path]:
    return [SOURCE_DIR / n for n in KERNEL_SOURCES + _DEPENDS] + [HARNESS_DIR / "harness.cu", HARNESS_DIR / "driver.cu"]


def _gencode(archs: tuple[str, ...]) -> list[str]:
    out = []
    for arch in archs:
        sm, _, kind = arch.partition("-")
        if not sm.isdigit() or kind not in ("", "real", "virtual"):
            raise ConfigError(f"CUDA arch {arch!r}: use CMake's spelling, e.g. 90, 86-real or 90-virtual")
        code = {"": f"[sm_{sm},compute_{sm}]", "real": f"sm_{sm}", "virtual": f"compute_{sm}"}[kind]
        out.append(f"-gencode=arch=compute_{sm},code={code}")
    return out


def build_digest(archs: tuple[str, ...]) -> str:
    h = hashlib.sha256(",".join(archs).encode())
    for p in _sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def build_harness(out_dir: str | os.PathLike | None = None, archs: tuple[str, ...] = DEFAULT_ARCHS) -> HarnessBuild:
    """Compile the harness .so and the sanitizer driver into `out_dir` (default: a cache folder per source digest);
    a folder that already holds both for the same sources and archs is reused. TargetError (one line, log named)
    when nvcc is missing or fails."""
    if not archs:
        raise ConfigError("build_harness needs at least one CUDA arch, e.g. archs=('90', '86')")
    gencode = _gencode(tuple(archs))
    digest = build_digest(tuple(archs))
    out = ensure_writable_dir(out_dir if out_dir is not None else cache_dir() / "kernel-harness" / digest)
    lib, driver, stamp = out / LIB_NAME, out / DRIVER_NAME, out / "digest.txt"
    if lib.is_file() and driver.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return HarnessBuild(lib, driver, 0.0, True)
    nvcc = str(find_nvcc())
    flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-I{SOURCE_DIR}", *gencode]
    log = out / "build.log"
    t0 = time.perf_counter()
    units = [SOURCE_DIR / n for n in KERNEL_SOURCES] + [HARNESS_DIR / "harness.cu"]
    objects = [out / (u.stem + ".o") for u in units]
    with open(log, "w") as f:
        # The three translation units compile in parallel (cub's block scan makes each one slow).
        procs = []
        for unit, obj in zip(units, objects):
            cmd = [nvcc, *flags, "-c", str(unit), "-o", str(obj)]
            f.write(" ".join(cmd) + "\n")
            f.flush()
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
        failed = [p.args for p in procs if p.wait() != 0]
        steps = [[nvcc, *gencode, "-shared", "-cudart", "static", "-o", str(lib), *map(str, objects)],
                 [nvcc, "-std=c++17", "-O2", f"-I{SOURCE_DIR}", *gencode, "-cudart", "static", "-o", str(driver),
                  str(HARNESS_DIR / "driver.cu"), *map(str, objects)]]
        for cmd in ([] if failed else steps):
            f.write(" ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                failed.append(cmd)
                break
    if failed:
        first = next((ln.strip() for ln in log.read_text().splitlines() if "error" in ln.lower()), "see the log")
        raise TargetError(f"nvcc failed to build the kernel harness: {first}; full log in {log}")
    stamp.write_text(digest + "\n")
    return HarnessBuild(lib, driver, time.perf_counter() - t0, False)


# --------------------------------------------------------------------------------------------- the ctypes wrapper

_i64, _i32, _f32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_I32P = ctypes.POINTER(ctypes.c_int32)
_F32P = ctypes.POINTER(ctypes.c_float)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


class KernelHarness:
    """numpy front end of libtokensieve_kernel_harness.so; a CUDA error is a one-line TargetError naming the call."""

    def __init__(self, lib: str | os.PathLike) -> None:
        path = Path(lib)
        if not path.is_file():
            raise TargetError(f"kernel harness {str(path)!r} does not exist; build it with "
                              "`python -m tokensieve.targets.tensorrt.kernel_harness build`")
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        L = self._lib
        L.ts_error_string.restype = ctypes.c_char_p
        L.ts_error_string.argtypes = [ctypes.c_int]
        L.ts_device_count.restype = ctypes.c_int
        L.ts_token_compact_host.argtypes = [_vp, ctypes.c_int, _vp, ctypes.c_int, _i64, _i64, _i64, _i64, _i32,
                                            ctypes.c_int, _vp, _vp, _vp]
        L.ts_diversity_select_host.argtypes = [_vp, ctypes.c_int, _vp, _i64, _i64, _i64, _i64, _i64, ctypes.c_int,
                                               _f32, _vp]
        L.ts_diversity_select_device.argtypes = [_vp, ctypes.c_int, _vp, _i64, _i64, _i64, _i64, _i64, ctypes.c_int,
                                                 _f32, _vp, _vp]
        L.ts_time_diversity_select_host.argtypes = [_vp, ctypes.c_int, _vp, _i64, _i64, _i64, _i64, _i64,
                                                    ctypes.c_int, _f32, ctypes.c_int, ctypes.c_int, _F32P]
        for fn in ("ts_token_compact_host", "ts_diversity_select_host", "ts_diversity_select_device",
                   "ts_time_diversity_select_host"):
            getattr(L, fn).restype = ctypes.c_int

    def device_count(self) -> int:
        return int(self._lib.ts_device_count())

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise TargetError(f"{what} failed: CUDA error {err} ({self._lib.ts_error_string(err).decode()})")

    def token_compact(self, x: np.ndarray, keep: np.ndarray, capacity: int, *, dynamic: bool = False,
                      min_count: int = 0):
        """x [B,N,C] float32/float16, keep [B,N] int32/bool -> (out [B,capacity,C], count [B]); with `dynamic`,
        (out [B,S,C], count, S as a 0-D int32)."""
        x, keep = np.ascontiguousarray(x), np.ascontiguousarray(keep)
        if x.dtype not in (np.float32, np.float16) or keep.dtype not in (np.int32, np.bool_):
            raise ConfigError("token_compact takes float32/float16 tokens and an int32/bool mask")
        if x.ndim != 3 or keep.shape != x.shape[:2]:
            raise ConfigError(f"token_compact: tokens {x.shape} and mask {keep.shape} must be [B,N,C] and [B,N]")
        if not 0 <= min_count <= capacity:
            raise ConfigError(f"min_count={min_count} must be in [0, capacity={capacity}] (the plugin's rule)")
        B, N, C = x.shape
        out = np.zeros((B, capacity, C), x.dtype)
        count, size = np.zeros(B, np.int32), np.zeros(1, np.int32)
        err = self._lib.ts_token_compact_host(_ptr(x), x.itemsize, _ptr(keep), keep.itemsize, B, N, C, capacity,
                                              min_count, int(dynamic), _ptr(out), _ptr(count), _ptr(size))
        self._check(err, f"TokenCompact B={B} N={N} C={C} K={capacity}")
        if not dynamic:
            return out, count
        s = int(size[0])
        return out.reshape(-1)[: B * s * C].reshape(B, s, C).copy(), count, np.array(s, np.int32)

    def _select_args(self, x: np.ndarray, importance: np.ndarray | None, k: int, mode: int, num_prefix_tokens: int):
        x = np.ascontiguousarray(x)
        if x.dtype not in (np.float32, np.float16) or x.ndim != 3:
            raise ConfigError("diversity_select takes float32/float16 features [B,N,C]")
        if mode not in (0, 1) or (mode == 1) != (importance is not None):
            raise ConfigError("diversity_select: mode 0 (DivPrune) takes no importance, mode 1 (MMR) needs it")
        if not 0 < k <= x.shape[1] - num_prefix_tokens:
            raise ConfigError(f"k={k} must be in [1, N - num_prefix_tokens = {x.shape[1] - num_prefix_tokens}]")
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        return x, imp

    def diversity_select(self, x: np.ndarray, k: int, *, mode: int = 0, lam: float = 0.5, num_prefix_tokens: int = 0,
                         importance: np.ndarray | None = None) -> np.ndarray:
        """features [B,N,C] -> indices [B,k] int32, ascending, in [num_prefix_tokens, N) (mode 1: importance [B,N]
        is the normalized importance the plugin takes)."""
        x, imp = self._select_args(x, importance, k, mode, num_prefix_tokens)
        B, N, C = x.shape
        idx = np.full((B, k), -1, np.int32)
        err = self._lib.ts_diversity_select_host(_ptr(x), int(x.dtype == np.float16), _ptr(imp), B, N, C, k,
                                                 num_prefix_tokens, mode, lam, _ptr(idx))
        self._check(err, f"DiversitySelect B={B} N={N} C={C} K={k} mode={mode}")
        return idx

    def time_diversity_select(self, x: np.ndarray, k: int, *, mode: int = 0, lam: float = 0.5,
                              num_prefix_tokens: int = 0, importance: np.ndarray | None = None, warmup: int = 5,
                              iters: int = 50) -> float:
        """Mean milliseconds per kernel launch (inputs resident on the GPU), timed with CUDA events in the .so."""
        x, imp = self._select_args(x, importance, k, mode, num_prefix_tokens)
        B, N, C = x.shape
        ms = ctypes.c_float(0.0)
        err = self._lib.ts_time_diversity_select_host(_ptr(x), int(x.dtype == np.float16), _ptr(imp), B, N, C, k,
                                                      num_prefix_tokens, mode, lam, warmup, iters, ctypes.byref(ms))
        self._check(err, f"timing DiversitySelect B={B} N={N} C={C} K={k}")
        return float(ms.value)

    def diversity_select_device(self, features, k: int, *, mode: int = 0, lam: float = 0.5, num_prefix_tokens: int = 0,
                                importance=None, out=None, stream: int = 0):
        """torch.cuda tensors in (features [B,N,C] float32/float16, importance [B,N] float32) -> int32 indices [B,k]
        on the GPU, launched on `stream` (a raw cudaStream_t, e.g. torch.cuda.current_stream().cuda_stream)."""
        import torch

        B, N, C = features.shape
        if out is None:
            out = torch.empty((B, k), dtype=torch.int32, device=features.device)
        err = self._lib.ts_diversity_select_device(
            ctypes.c_void_p(features.data_ptr()), int(features.dtype == torch.float16),
            None if importance is None else ctypes.c_void_p(importance.data_ptr()), B, N, C, k, num_prefix_tokens,
            mode, lam, ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream))
        self._check(err, f"DiversitySelect (device) B={B} N={N} C={C} K={k}")
        return out


# --------------------------------------------------------------------------------------------- references + checks


def token_compact_expected(x: np.ndarray, keep: np.ndarray, capacity: int, dynamic: bool = False, min_count: int = 0):
    """TokenCompact's contract (compact_to_plugin.py, plugin_src/kernels.h): the first `capacity` kept rows of each
    sample in their original order, zero rows after them; count = rows written; dynamic: S = max(max count, min)."""
    B, _, C = x.shape
    out, count = np.zeros((B, capacity, C), x.dtype), np.zeros(B, np.int32)
    for b in range(B):
        rows = np.flatnonzero(keep[b])[:capacity]
        out[b, : len(rows)], count[b] = x[b, rows], len(rows)
    if not dynamic:
        return out, count
    s = max(int(count.max(initial=0)), min_count)
    return out[:, :s], count, np.array(s, np.int32)


def diversity_select_expected(x: np.ndarray, k: int, mode: int, lam: float, num_prefix_tokens: int,
                              raw_importance: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    """tokensieve's own method math (graph_passes/methods/diversity.py) -> ascending int32 indices [B,k]: DivPrune's
    `divprune_select` / MMR's `mmr_select` over the patch tokens x[:, p:], in float32 as the exported graph does."""
    import torch

    from tokensieve.graph_passes.methods.diversity import divprune_select, mmr_select

    p = num_prefix_tokens
    feats = torch.from_numpy(np.ascontiguousarray(x[:, p:])).to(device)
    with torch.no_grad():
        if mode == 0:
            picks = divprune_select(feats, k)
        else:
            imp = torch.from_numpy(np.ascontiguousarray(raw_importance[:, p:], dtype=np.float32)).to(device)
            picks = mmr_select(feats, imp, k, lam)
    return (picks.sort(dim=-1).values + p).to(torch.int32).cpu().numpy()


def plugin_importance(raw_importance: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """What the MMR plugin reads: the min-max normalized importance of the patch tokens (the standard form's gain
    before ·λ), placed at their positions; prefix positions are never candidates."""
    import torch

    from tokensieve.graph_passes.methods.diversity import normalized_importance

    p = num_prefix_tokens
    out = np.zeros(raw_importance.shape, np.float32)
    out[:, p:] = normalized_importance(torch.from_numpy(raw_importance[:, p:].astype(np.float32))).numpy()
    return out


def _with_ties(rng: np.random.Generator, B: int, N: int, C: int, p: int, dtype) -> np.ndarray:
    """Random tokens where about one patch token in eight repeats an earlier one (exact ties in every score)."""
    x = rng.standard_normal((B, N, C)).astype(np.float32)
    for b in range(B):
        dup = rng.choice(np.arange(p + 1, N), size=max(1, (N - p) // 8), replace=False)
        for d in dup:
            x[b, d] = x[b, rng.integers(p, d)]
    return x.astype(dtype)


@dataclass
class CaseResult:
    kernel: str
    case: str
    passed: bool
    max_abs_diff: float = 0.0
    detail: str = ""


def check_kernels(harness: KernelHarness, *, seed: int = 0, large: bool = True) -> list[CaseResult]:
    """Both kernels on seeded random inputs with ties vs the expected outputs: identical indices / counts / sizes and
    outputs within 1e-5 (TokenCompact copies rows, so it must be exact). `large` adds DivPrune at N=577, C=1024."""
    rng = np.random.default_rng(seed)
    results: list[CaseResult] = []
    # TokenCompact: capped and data-dependent, float32/float16 rows of 32, 20 and 10 bytes, int32/bool masks.
    for C, dtype, mask_dtype, dynamic, min_count in ((8, np.float32, np.int32, False, 0),
                                                     (5, np.float32, np.bool_, False, 0),
                                                     (5, np.float16, np.bool_, False, 0),
                                                     (48, np.float32, np.int32, True, 0),
                                                     (48, np.float16, np.bool_, True, 19),
                                                     (7, np.float16, np.int32, True, 3)):
        B, N, K = 4, 65, 20
        x = rng.standard_normal((B, N, C)).astype(dtype)
        keep = rng.random((B, N)) < 0.2
        keep[0] = True                  # more kept tokens than capacity
        keep[1] = False                 # none
        keep[2, ::2] = True if dynamic and min_count == 0 else keep[2, ::2]
        keep = keep.astype(mask_dtype)
        got = harness.token_compact(x, keep, K, dynamic=dynamic, min_count=min_count)
        want = token_compact_expected(x, keep, K, dynamic, min_count)
        same_shape = all(g.shape == w.shape for g, w in zip(got, want))
        diff = max(float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max(initial=0)) for g, w in zip(got, want)) \
            if same_shape else float("inf")
        exact = same_shape and all(np.array_equal(g, w) for g, w in zip(got, want))
        name = f"C={C} {np.dtype(dtype).name} mask={np.dtype(mask_dtype).name} {'dynamic' if dynamic else 'capped'}" \
               + (f" min_count={min_count}" if min_count else "")
        results.append(CaseResult("TokenCompact", name, exact, diff))
    # DiversitySelect: DivPrune (mode 0) and MMR (mode 1), float32 and float16 features, ties.
    # lam = 0: diversity only, but the first pick is still argmax importance (IDPruner's first round).
    cases = [(0, 3, 65, 48, 20, 1, np.float32, 0.6), (0, 2, 65, 48, 20, 1, np.float16, 0.6),
             (0, 2, 50, 16, 49, 1, np.float32, 0.6), (1, 3, 65, 48, 20, 1, np.float32, 0.6),
             (1, 2, 65, 48, 20, 0, np.float16, 0.6), (1, 2, 65, 48, 20, 1, np.float32, 0.0)]
    if large:
        cases += [(0, 2, 577, 1024, 64, 1, np.float32, 0.6), (1, 2, 577, 1024, 64, 1, np.float32, 0.6)]
    for mode, B, N, C, K, p, dtype, lam in cases:
        x = _with_ties(rng, B, N, C, p, dtype)
        raw = rng.random((B, N)).astype(np.float32)
        if lam > 0:
            raw[:, p::5] = raw.max(axis=1, keepdims=True)  # equal top importance: the first MMR pick is a tie
        got = harness.diversity_select(x, K, mode=mode, lam=lam, num_prefix_tokens=p,
                                       importance=plugin_importance(raw, p) if mode == 1 else None)
        # The reference reads the features the kernel read (a float16 input upcast exactly to float32).
        want = diversity_select_expected(x.astype(np.float32), K, mode, lam, p, raw if mode == 1 else None)
        same = got.shape == want.shape and bool((got == want).all())
        rows = int((got != want).any(axis=1).sum()) if got.shape == want.shape else B
        results.append(CaseResult("DiversitySelect", f"{'DivPrune' if mode == 0 else f'MMR λ={lam}'} B={B} N={N} "
                                  f"C={C} K={K} p={p} {np.dtype(dtype).name}", same,
                                  detail="" if same else f"{rows}/{B} samples pick different tokens"))
    return results


def time_divprune(harness: KernelHarness, *, batches=(1, 8), N: int = 577, C: int = 1024, K: int = 64, p: int = 1,
                  iters: int = 50, torch_iters: int = 10, seed: int = 0) -> list[dict]:
    """Plugin DivPrune kernel vs tokensieve's divprune_select in PyTorch on the GPU (both on resident inputs, CUDA
    events), per batch; also whether the two agree on the kept indices."""
    import torch

    from tokensieve.graph_passes.methods.diversity import divprune_select

    rng = np.random.default_rng(seed)
    rows = []
    for B in batches:
        x = rng.standard_normal((B, N, C)).astype(np.float32)
        plugin_ms = harness.time_diversity_select(x, K, num_prefix_tokens=p, iters=iters)
        feats = torch.from_numpy(x[:, p:]).cuda()
        with torch.no_grad():
            for _ in range(2):
                picks = divprune_select(feats, K)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(torch_iters):
                picks = divprune_select(feats, K)
            end.record()
            torch.cuda.synchronize()
        torch_ms = start.elapsed_time(end) / torch_iters
        want = (picks.sort(dim=-1).values + p).int().cpu().numpy()
        got = harness.diversity_select(x, K, num_prefix_tokens=p)
        rows.append({"batch": B, "N": N, "C": C, "K": K, "plugin_ms": plugin_ms, "torch_greedy_ms": torch_ms,
                     "speedup": torch_ms / plugin_ms, "same_indices": bool((got == want).all())})
    return rows


def run_driver(driver: str | os.PathLike, tool: str | None = None, timeout: float = 300) -> dict:
    """Run the sanitizer driver, under `compute-sanitizer --tool TOOL` when `tool` is given; {ok, seconds, summary}."""
    cmd = [str(driver)]
    if tool is not None:
        cmd = [_compute_sanitizer(), "--tool", tool, "--error-exitcode", "3", *cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool or "none", "ok": False, "seconds": timeout, "summary": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln),
                   lines[-1] if lines else "")
    return {"tool": tool or "none", "ok": proc.returncode == 0, "returncode": proc.returncode,
            "seconds": time.perf_counter() - t0, "summary": summary.strip(), "output_tail": lines[-20:]}


def _compute_sanitizer() -> str:
    import shutil

    for cand in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                 "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if cand and Path(cand).is_file():
            return cand
    raise TargetError("compute-sanitizer was not found; install the CUDA toolkit's sanitizer or put it on PATH")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m tokensieve.targets.tensorrt.kernel_harness", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the harness .so and the sanitizer driver; print their paths")
    b.add_argument("--arch", action="append", help="CUDA arch in CMake spelling (repeatable; default 90 and 86)")
    b.add_argument("--out", default=None)
    c = sub.add_parser("check", help="run both kernels against tokensieve's methods (needs a GPU)")
    c.add_argument("--lib", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        built = build_harness(args.out, tuple(args.arch or DEFAULT_ARCHS))
        print(json.dumps({"lib": str(built.lib), "driver": str(built.driver), "seconds": built.seconds,
                          "cached": built.cached}))
        return 0
    results = check_kernels(KernelHarness(args.lib))
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'} {r.kernel} {r.case} {r.detail}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
