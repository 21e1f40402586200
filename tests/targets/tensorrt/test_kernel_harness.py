"""The kernel harness (targets/tensorrt/kernel_harness.py): the plugins' own .cu files compile with nvcc into a
ctypes-loadable .so and a sanitizer driver without TensorRT; its wrapper and checker work on CPU; the kernels
themselves run only on a GPU (the `gpu` tests, and scripts/gpu_check.sh)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import plugin_refs
import pytest

from tokensieve.errors import ConfigError, TargetError
from tokensieve.targets.tensorrt import kernel_harness as kh

requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file(),
                                   reason="nvcc (CUDA toolkit) is not installed")
COMPILE_BUDGET_S = 120


@pytest.fixture(scope="session")
def harness_build() -> kh.HarnessBuild:
    """One compile per source digest (the cache folder scripts/gpu_check.py uses too), shared by the test files."""
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    return kh.build_harness()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@requires_nvcc
def test_builds_from_the_plugin_sources_for_sm90_and_sm86(harness_build):
    assert harness_build.seconds < COMPILE_BUDGET_S, f"harness compile took {harness_build.seconds:.1f}s"
    lib, driver = harness_build.lib, harness_build.driver
    data = lib.read_bytes()
    assert b"sm_90" in data and b"sm_86" in data  # the fatbin names its SASS targets
    log = (lib.parent / "build.log").read_text()
    # The plugin's own files, compiled in place: no copies of kernel code. The cache is keyed by the sources'
    # bytes, so a build made from another checkout of the same sources is reused: match the in-repo path only.
    for name in kh.KERNEL_SOURCES:
        assert f"/targets/tensorrt/plugin_src/{name} " in log
    assert driver.is_file() and driver.stat().st_mode & 0o111
    again = kh.build_harness()
    assert again.cached and again.lib == lib


@requires_nvcc
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="binutils missing")
def test_exports_the_c_entry_points_without_tensorrt(harness_build):
    nm = subprocess.run(["nm", "-D", "--defined-only", str(harness_build.lib)], capture_output=True, text=True,
                        check=True).stdout
    exported = {ln.split()[-1] for ln in nm.splitlines() if ln.split()[1:2] == ["T"] and ln.split()[-1].startswith("ts_")}
    assert exported == {"ts_device_count", "ts_error_string", "ts_token_compact_host", "ts_token_compact_device",
                        "ts_token_compact_workspace_size", "ts_diversity_select_host", "ts_diversity_select_device",
                        "ts_time_diversity_select_host"}
    needed = subprocess.run(["readelf", "-d", str(harness_build.lib)], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in needed and "libnvinfer" not in needed


@requires_nvcc
def test_wrapper_loads_and_fails_in_one_line_without_a_gpu(harness_build):
    harness = kh.KernelHarness(harness_build.lib)
    x = np.ones((1, 9, 4), np.float32)
    with pytest.raises(ConfigError) as e:
        harness.diversity_select(x, 9, num_prefix_tokens=1)
    assert "k=9" in _one_line(e)
    with pytest.raises(ConfigError):
        harness.diversity_select(x, 2, mode=1)  # MMR without importance
    with pytest.raises(ConfigError) as e:
        harness.token_compact(x, np.ones((1, 9), np.int32), 4, dynamic=True, min_count=5)
    assert "capacity=4" in _one_line(e)
    if harness.device_count() == 0:
        with pytest.raises(TargetError) as e:
            harness.diversity_select(x, 2)
        assert "CUDA error" in _one_line(e)
        assert kh.run_driver(harness_build.driver)["returncode"] == 2  # "NO DEVICE", not a crash


def test_missing_library_is_one_line(tmp_path):
    with pytest.raises(TargetError) as e:
        kh.KernelHarness(tmp_path / "none.so")
    assert "kernel_harness build" in _one_line(e)
    with pytest.raises(ConfigError):
        kh._gencode(("sm90",))


def test_expected_outputs_match_the_plugin_tests_float64_mirror():
    """The checker's references (tokensieve's own divprune_select / mmr_select in float32, and the TokenCompact
    contract) agree with the independent float64 numpy mirrors of the kernels on inputs with ties."""
    mirrors = plugin_refs  # the independent numpy mirrors of the kernels
    rng = np.random.default_rng(0)
    x = kh._with_ties(rng, 3, 41, 24, 1, np.float32)
    raw = rng.random((3, 41)).astype(np.float32)
    raw[:, 1::5] = raw.max(axis=1, keepdims=True)  # a tie at the first MMR pick
    for mode in (0, 1):
        imp = kh.plugin_importance(raw, 1) if mode == 1 else None
        got = kh.diversity_select_expected(x, 12, mode, 0.6, 1, raw if mode == 1 else None)
        want = mirrors.diversity_select_reference(x, 12, mode, 0.6, 1, imp)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32 and (np.diff(got, axis=1) > 0).all() and got.min() >= 1
    keep = rng.random((3, 41)) < 0.3
    keep[0] = True
    for dynamic, min_count in ((False, 0), (True, 0), (True, 9)):
        got = kh.token_compact_expected(x, keep, 10, dynamic, min_count)
        want = mirrors.token_compact_reference(x, keep, 10, dynamic, min_count)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_checker_passes_the_float64_mirror_and_catches_a_wrong_kernel():
    """check_kernels end to end with test_plugins' float64 mirror standing in for the CUDA kernels: every case
    passes; a kernel with an off-by-one pick, or one that loses a row, is reported."""
    mirrors = plugin_refs  # the independent numpy mirrors of the kernels

    class Mirror:
        def token_compact(self, x, keep, capacity, dynamic=False, min_count=0):
            return mirrors.token_compact_reference(x, keep, capacity, dynamic, min_count)

        def diversity_select(self, x, k, mode=0, lam=0.5, num_prefix_tokens=0, importance=None):
            return mirrors.diversity_select_reference(x.astype(np.float32), k, mode, lam, num_prefix_tokens, importance)

    results = kh.check_kernels(Mirror(), large=False)
    assert len(results) == 12 and all(r.passed for r in results), [r for r in results if not r.passed]

    class Wrong(Mirror):
        def token_compact(self, x, keep, capacity, dynamic=False, min_count=0):
            out = super().token_compact(x, keep, capacity, dynamic, min_count)
            out[0][:, 0] = 0  # the first kept row lost
            return out

        def diversity_select(self, x, k, mode=0, lam=0.5, num_prefix_tokens=0, importance=None):
            idx = super().diversity_select(x, k, mode, lam, num_prefix_tokens, importance)
            n = x.shape[1]  # an off-by-one last pick: N-1 (or N-2 where N-1 was picked)
            idx[:, -1] = np.where(idx[:, -1] == n - 1, n - 2, n - 1)
            return np.sort(idx, axis=1)

    wrong = kh.check_kernels(Wrong(), large=False)
    assert not any(r.passed for r in wrong if r.kernel == "TokenCompact")
    assert not all(r.passed for r in wrong if r.kernel == "DiversitySelect")


@pytest.mark.gpu
@requires_nvcc
def test_kernels_match_tokensieve_methods_on_gpu(harness_build):
    harness = kh.KernelHarness(harness_build.lib)
    results = kh.check_kernels(harness, large=False)
    assert [r for r in results if not r.passed] == []
    rows = kh.time_divprune(harness, batches=(1,), N=65, C=64, K=16, iters=5, torch_iters=2)
    assert rows[0]["plugin_ms"] > 0 and rows[0]["same_indices"]
    assert kh.run_driver(harness_build.driver)["ok"]
