"""libtokensieve_plugins.so, tokensieve's TensorRT plugins (TokenCompact, DiversitySelect): find, build, load.

The C++/CUDA sources live in `plugin_src/` next to this file. They need TensorRT's headers only (no TensorRT library),
so the library builds on a CPU-only machine with nvcc: headers come from $TENSORRT_INCLUDE_DIR or from the
TensorRT 10.14 headers vendored in PyPI `kernel-lens==2.0.1` (downloaded once by this explicit build step, pinned to
the wheel's sha256, unpacked into the cache; never installed or imported).
TensorRT finds the plugins through the library's exported `getCreators`; `load_plugins` registers them with the
Python registry so the ONNX parser maps `tokensieve` domain nodes onto them. A library is code: it is loaded only
from a path the user gave (`--plugins`, or $TOKENSIEVE_PLUGIN_LIB), never picked up from the cache or plugin_src/build.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from tokensieve.errors import TargetError
from tokensieve.fileio import ensure_writable_dir, locked_temp_dir, remove_stale_temp_dirs
from tokensieve.runtime.tensorrt_plugins import LIBRARY_NAME, PLUGIN_LIB_ENV, register_plugin_library

HEADERS_ENV = "TENSORRT_INCLUDE_DIR"
SOURCE_DIR = Path(__file__).resolve().parent / "plugin_src"
SOURCE_BUILD_DIR = SOURCE_DIR / "build"   # where `cmake -S plugin_src -B plugin_src/build` puts the library
PLUGIN_NAMESPACE = "tokensieve"
PLUGIN_VERSION = "1"
KERNEL_LENS = "kernel-lens==2.0.1"
# sha256 of kernel_lens-2.0.1-py3-none-any.whl on PyPI (its one file; pip --require-hashes refuses any other bytes)
KERNEL_LENS_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
_HEADER_PREFIX = "kernel_lens/include/tensorrt/"
_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu", ".txt")
_BUILD_HINT = (f"build it with tokensieve.targets.tensorrt.plugins.build_plugin_library() "
               f"(or `python -m tokensieve.targets.tensorrt.plugins`), or set {PLUGIN_LIB_ENV}=/path/to/{LIBRARY_NAME}")


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/tokensieve (default ~/.cache/tokensieve): downloaded headers and built plugin libraries."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokensieve"


def source_digest() -> str:
    """12 hex digits over the plugin sources, so a cached build never outlives a source change."""
    h = hashlib.sha256()
    for p in sorted(SOURCE_DIR.iterdir()):
        if p.is_file() and p.suffix in _SOURCE_SUFFIXES:
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def default_build_dir() -> Path:
    return cache_dir() / "plugins" / source_digest()


def plugin_library_path() -> Path:
    """$TOKENSIEVE_PLUGIN_LIB (the user's explicit choice); TargetError if it is unset or missing.

    A library is code, so one that merely sits in the cache (build_plugin_library's default output) or in
    plugin_src/build is never loaded implicitly: the error names it, for the user to pass with --plugins."""
    env = os.environ.get(PLUGIN_LIB_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise TargetError(f"{PLUGIN_LIB_ENV}={env!r} does not exist; point it at {LIBRARY_NAME} or unset it")
        return path
    found = (default_build_dir() / LIBRARY_NAME, SOURCE_BUILD_DIR / LIBRARY_NAME)
    built = next((p for p in found if p.is_file()), None)
    if built is not None:
        raise TargetError(f"No plugin library given; pass --plugins {built} (or set {PLUGIN_LIB_ENV}): a library is "
                          "code and is never loaded from the cache implicitly")
    raise TargetError(f"The tokensieve plugin library {LIBRARY_NAME} is not built; {_BUILD_HINT}")


def ensure_headers() -> Path:
    """A folder with TensorRT's NvInferRuntime.h: $TENSORRT_INCLUDE_DIR, else kernel-lens's copy in the cache, fetched
    there on first use (build_plugin_library, `tests/assets.py fetch`: explicit setup steps) by `pip download
    --require-hashes` of the one pinned wheel; the headers are unpacked from it, nothing is installed."""
    env = os.environ.get(HEADERS_ENV)
    if env:
        if (Path(env) / "NvInferRuntime.h").is_file():
            return Path(env)
        raise TargetError(f"{HEADERS_ENV}={env!r} has no NvInferRuntime.h; point it at TensorRT's include folder "
                          f"(Jetson: /usr/include/aarch64-linux-gnu) or unset it to download {KERNEL_LENS}'s headers")
    dest = cache_dir() / "kernel-lens-2.0.1" / "include" / "tensorrt"   # the layout runtime/cpp's tests use too
    if (dest / "NvInferRuntime.h").is_file():
        return dest
    root = ensure_writable_dir(dest.parent.parent)
    fix = f"set {HEADERS_ENV} to a folder with TensorRT's NvInferRuntime.h"
    remove_stale_temp_dirs(root, ".download-")  # a killed fetch's (nobody holds it)
    with locked_temp_dir(root, ".download-") as tmp:
        pins = Path(tmp) / "requirements.txt"
        pins.write_text(f"{KERNEL_LENS} --hash=sha256:{KERNEL_LENS_SHA256}\n")
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--require-hashes", "--no-deps",
                            "--only-binary=:all:", "-q", "--no-input", "--timeout", "30", "--retries", "1",
                            "-d", str(Path(tmp) / "wheel"), "-r", str(pins)],
                           check=True, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        except (subprocess.SubprocessError, OSError) as e:
            detail = _last_line(getattr(e, "stderr", None) or str(e))
            raise TargetError(f"Cannot download TensorRT headers ({KERNEL_LENS} from PyPI): {detail}; {fix}") from e
        wheels = sorted((Path(tmp) / "wheel").glob("kernel_lens-*.whl"))
        if len(wheels) != 1 or hashlib.sha256(wheels[0].read_bytes()).hexdigest() != KERNEL_LENS_SHA256:
            raise TargetError(f"pip download {KERNEL_LENS} gave no wheel with the pinned sha256; {fix}")
        staged = Path(tmp) / "include" / "tensorrt"
        staged.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as z:  # the headers only; kernel-lens itself is never imported
            for name in z.namelist():
                if name.startswith(_HEADER_PREFIX) and not name.endswith("/") and "/" not in name[len(_HEADER_PREFIX):]:
                    (staged / name[len(_HEADER_PREFIX):]).write_bytes(z.read(name))
        if not (staged / "NvInferRuntime.h").is_file():
            raise TargetError(f"{KERNEL_LENS} has no {_HEADER_PREFIX}NvInferRuntime.h; {fix}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not (dest / "NvInferRuntime.h").is_file():  # another process may have won the race
            shutil.rmtree(dest, ignore_errors=True)
            staged.rename(dest)
    return dest


def find_nvcc() -> Path:
    """$CUDACXX, nvcc on PATH, $CUDA_HOME/bin/nvcc or DEFAULT_CUDA_HOME/bin/nvcc; TargetError if none."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    candidates += [str(Path(root) / "bin" / "nvcc") for root in (os.environ.get("CUDA_HOME"), DEFAULT_CUDA_HOME) if root]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise TargetError(f"nvcc (the CUDA compiler) was not found, so {LIBRARY_NAME} cannot be built; install the CUDA "
                      f"toolkit and set CUDACXX=/path/to/nvcc, or set {PLUGIN_LIB_ENV} to a prebuilt library")


def build_plugin_library(out_dir: str | os.PathLike | None = None, archs: tuple[str, ...] = ("86",)) -> Path:
    """Compile plugin_src/ into `<out_dir>/libtokensieve_plugins.so` (default: the cache, keyed by source digest).

    `archs` use CMake's CUDA_ARCHITECTURES spelling: "86" = sm_86 code + compute_86 PTX (JIT on newer GPUs),
    "86-real" = code only, "86-virtual" = PTX only. Uses CMake when it is installed, else one nvcc command.
    A failed build raises a one-line TargetError; the full compiler output stays in `<out_dir>/build.log`.
    """
    if not archs:
        raise TargetError("build_plugin_library needs at least one CUDA arch, e.g. archs=('86',)")
    headers, nvcc = ensure_headers(), find_nvcc()
    out = ensure_writable_dir(Path(out_dir) if out_dir is not None else default_build_dir())
    log_path = out / "build.log"
    remove_stale_temp_dirs(out, ".build-")  # a killed build's (nobody holds it)
    with locked_temp_dir(out, ".build-") as tmp:
        work = Path(tmp)
        steps, built = (_cmake_steps if shutil.which("cmake") else _nvcc_steps)(work, headers, nvcc, archs)
        with open(log_path, "w") as log:
            for step in steps:
                log.write("$ " + " ".join(step) + "\n")
                log.flush()
                try:
                    proc = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise TargetError(f"Building {LIBRARY_NAME} failed to run {Path(step[0]).name}: {e}") from e
                if proc.returncode != 0:
                    log.close()
                    raise TargetError(f"Building {LIBRARY_NAME} failed ({Path(step[0]).name} exit {proc.returncode}): "
                                      f"{_first_error(log_path)}; full log: {log_path}")
        if not built.is_file():
            raise TargetError(f"Building {LIBRARY_NAME} produced no library; full log: {log_path}")
        staged = out / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
        shutil.copy2(built, staged)
        os.replace(staged, out / LIBRARY_NAME)  # atomic: a concurrent loader never sees half a library
    return out / LIBRARY_NAME


def load_plugins(trt_module: ModuleType, path: str | os.PathLike | None = None) -> Path:
    """Register the library's creators with `trt_module`'s plugin registry (once per process); return its path.

    `path` defaults to `plugin_library_path()` ($TOKENSIEVE_PLUGIN_LIB only); the registration is shared with TrtRunner
    (tokensieve.runtime.tensorrt_plugins).
    """
    lib = Path(path) if path is not None else plugin_library_path()
    return register_plugin_library(trt_module, lib, _BUILD_HINT)


_Steps = tuple[list[list[str]], Path]   # commands to run, the library they produce


def _cmake_steps(work: Path, headers: Path, nvcc: Path, archs: tuple[str, ...]) -> _Steps:
    cmake, build = shutil.which("cmake") or "cmake", work / "cmake"
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DTENSORRT_INCLUDE_DIR={headers}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"]
    return [configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)]], build / LIBRARY_NAME


def _nvcc_steps(work: Path, headers: Path, nvcc: Path, archs: tuple[str, ...]) -> _Steps:
    """The same build as CMakeLists.txt in one nvcc call, for machines without CMake."""
    sources = sorted(str(p) for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".cu"))
    gencode = []
    for arch in archs:
        sm, _, kind = arch.partition("-")
        code = {"real": f"sm_{sm}", "virtual": f"compute_{sm}"}.get(kind, f"[sm_{sm},compute_{sm}]")
        gencode.append(f"-gencode=arch=compute_{sm},code={code}")
    return [[str(nvcc), "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
             "-Xlinker", "--no-undefined", "--cudart", "static", "-isystem", str(headers), *gencode, *sources,
             "-o", str(work / LIBRARY_NAME)]], work / LIBRARY_NAME


def _first_error(log_path: Path) -> str:
    lines = [" ".join(line.split()) for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("$ ")]  # our own command echo
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or ["no output"])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    """python -m tokensieve.targets.tensorrt.plugins [--arch 86 --arch 87-real] [--out DIR]: build, print the path."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tokensieve.targets.tensorrt.plugins", description=main.__doc__)
    ap.add_argument("--arch", action="append", help="CUDA arch in CMake spelling (repeatable; default 86)")
    ap.add_argument("--out", help="output folder (default: the tokensieve cache)")
    args = ap.parse_args(argv)
    print(build_plugin_library(args.out, tuple(args.arch or ("86",))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
