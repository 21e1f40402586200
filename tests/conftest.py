"""Make the helper modules in tests/ (tiny_models, tiny_traced) importable from every test folder; skip GPU tests
without a GPU; under `-n N --dist loadfile`, hand out the slowest files first (see HEAVY_FILES)."""
from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _has_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Test files that take far longer than their test count suggests (module-scoped exports, end-to-end scripts), slowest
# first (serial seconds, one torch thread, 2-core machine under load, Dec 2026). pytest-xdist's loadfile queue otherwise
# orders files by test count, which left several of these (test_default_model_engines: 2 tests, 70 s; test_faults: 4
# tests, 87 s) for the end of the run, where one worker then ran on alone. Handing them out first leaves only short
# files for the tail. A path missing here is only scheduled later; a stale one is ignored.
HEAVY_FILES = (
    "tests/exporter/vlm/test_fastv.py",                          # 107
    "tests/hostile/test_faults.py",                     # 87
    "tests/targets/tensorrt/test_default_model_engines.py",      # 72
    "tests/exporter/vlm/test_qwen2_vl_fastv.py",                 # 55
    "tests/test_cli.py",                                # 50
    "tests/exporter/vlm/test_export_vlm_cli.py",                 # 50
    "tests/graph_passes/methods/test_adaptive.py",              # 48
    "tests/graph_passes/methods/test_merge.py",         # 48
    "tests/graph_passes/fx/test_compact_token_axis.py",    # 46
    "tests/exporter/vlm/test_qwen2_5_vl.py",                     # 45
    "tests/exporter/vlm/test_qwen2_5_vl_video.py",               # 40
    "tests/graph_passes/fx/test_hoist_token_gathers.py",   # 44
    "tests/graph_passes/methods/test_attention_graph.py",           # 39
    "tests/graph_passes/methods/test_hiprune.py",               # 39
    "tests/targets/tensorrt/test_diversity_to_plugin.py",        # 38
    "tests/exporter/vlm/test_llava_parts.py",                    # 35
    "tests/scripts/test_bench_video.py",                # 34
    "tests/graph_passes/methods/test_tome_prop_attn.py",        # 32
    "tests/test_tune.py",
    "tests/scripts/test_bench_vlm.py",                  # 27
    "tests/test_benchmark.py",
    "tests/test_api.py",
    "tests/scripts/test_gpu_check.py",
    "tests/scripts/test_bench_adaptive.py",
    "tests/targets/tensorrt/test_plugins.py",
    "tests/test_export_int8_optimize.py",               # 24
    "tests/test_shared_weights.py",
    "tests/exporter/vlm/test_gemma3.py",                         # 33
    "tests/exporter/vlm/test_internvl.py",                       # 22
    "tests/exporter/vlm/test_qwen3_vl.py",                       # 62
    "tests/graph_passes/fx/test_place_in_block.py",
    "tests/graph_passes/test_paper_macs.py",
    "tests/test_heads.py",
    "tests/test_hf_folder.py",
    "tests/test_pareto.py",
    "tests/targets/tensorrt/test_engine_options.py",
)


def pytest_configure(config):
    """The controller keeps the file order the workers collect (pytest_collection_modifyitems below). Each xdist
    worker computes with one torch thread: CI runs as many workers as cores, and two workers' default pools (one thread
    per core each, spin-waiting between the tiny models' small ops) slowed eager references ~15x (an adaptive verify
    of 20 inputs: 10.5 s -> 0.6 s). OMP_NUM_THREADS=1 passes this on to the CLI subprocesses the tests start."""
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False
    if hasattr(config, "workerinput"):
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def _heavy_files_first(items) -> None:
    """Reorder whole files (each stays contiguous, in its own order): HEAVY_FILES first, then the others by test count
    (descending, xdist's own order)."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    counts, first = {}, {}
    for i, item in enumerate(items):
        path = item.nodeid.split("::", 1)[0]
        counts[path] = counts.get(path, 0) + 1
        first.setdefault(path, i)

    def key(item):
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank)), -counts[path], first[path]

    items.sort(key=key)


def pytest_collection_modifyitems(config, items):
    """Skip every @pytest.mark.gpu test cleanly on a machine without an NVIDIA GPU; under xdist's loadfile, put the
    slowest files first."""
    import pytest

    if hasattr(config, "workerinput"):  # an xdist worker: the controller schedules files in this collection order
        _heavy_files_first(items)

    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
