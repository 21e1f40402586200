"""TorchRunner on CPU: the saved programs (model.pt2 / dense.pt2) give ONNX Runtime's outputs of the same export; fp16,
the bench backend and the one-line errors. CUDA graphs / CUDA-event timing need a GPU (scripts/gpu_check.sh)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokensieve import api
from tokensieve.errors import ConfigError, TargetError
from tokensieve.models import load_model
from tokensieve.runtime import RUNNERS, OrtRunner, TorchRunner
from tokensieve.runtime.torch_runner import cast_weight_inputs, program_module, read_program

RECIPE = "divprune@1:0.5"  # a float32 scoring island (x.float()) in the graph: what the fp16 mode must keep


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, shape = load_model("tiny")
    result = api.export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), RECIPE)
    out = tmp_path_factory.mktemp("torch-runner")
    paths = api.save(result, out, parts=("debug", "dense", "torch"))
    return result, paths


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_save_writes_both_programs_with_io_names(saved):
    result, paths = saved
    assert paths["torch"].name == "model.pt2" and paths["torch_dense"].name == "dense.pt2"
    _, meta = read_program(paths["torch"])
    assert meta["input_names"] == ["pixel_values"]
    assert meta["output_names"] == [result.output_name, "kept_idx.1"]
    assert not [p.name for p in paths["torch"].parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cpu_outputs_equal_onnxruntime(saved):
    _, paths = saved
    with OrtRunner(paths["debug"]) as ort_runner, TorchRunner(paths["torch"], device="cpu") as runner:
        assert runner.input_specs[0][0] == "pixel_values" and isinstance(runner.input_specs[0][1][0], str)
        feeds = ort_runner.make_random_feeds(batch=3, seed=1)
        want, got = ort_runner.infer(feeds), runner.infer(feeds)
        assert list(got) == list(want) == runner.output_names
        name, idx = runner.output_names
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got[idx], want[idx])
        assert runner.inference_time > 0 and runner.memory_usage()["kind"] == "host_rss_delta"
    with OrtRunner(paths["dense"]) as ort_runner, TorchRunner(paths["torch_dense"], device="cpu") as runner:
        want, got = ort_runner.infer(feeds), runner.infer(feeds)
        np.testing.assert_allclose(next(iter(got.values())), next(iter(want.values())), atol=1e-5, rtol=0)


def test_fp16_runs_in_half_and_keeps_fp32_scores(saved):
    """fp16: half weights and activations (the output is float16), the same kept indices (scores stay fp32)."""
    _, paths = saved
    with TorchRunner(paths["torch"], device="cpu") as r32, TorchRunner(paths["torch"], device="cpu", dtype="fp16") as r16:
        feeds = r32.make_random_feeds(batch=2, seed=2)
        a, b = r32.infer(feeds), r16.infer(feeds)
        name, idx = r32.output_names
        assert b[name].dtype == np.float16 and a[name].dtype == np.float32
        assert 0 < np.abs(b[name].astype(np.float32) - a[name]).max() < 2e-2
        np.testing.assert_array_equal(a[idx], b[idx])
        assert "fp16" in r16.device_label


def test_cast_weight_inputs_is_idempotent_on_half_graphs(saved):
    _, paths = saved
    program, _ = read_program(paths["torch_dense"])
    gm = program.module().half()
    first = cast_weight_inputs(gm, torch.float16)
    assert first > 0
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    assert str(linear.args[0].target) == "aten.to.dtype"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_tensor_moves_to_the_device(saved, dtype):
    """A regression test for the CUDA path without a GPU: on the meta device, a tensor the graph creates on the
    trace-time device (DivPrune's arange one-hot) next to moved weights fails as it would on CUDA."""
    _, paths = saved
    module = program_module(read_program(paths["torch"])[0], "meta", dtype)
    with torch.inference_mode():
        out = module(torch.randn(2, 3, 64, 64, device="meta"))
    assert [t.device.type for t in out] == ["meta", "meta"]
    assert out[0].dtype == (torch.float16 if dtype == "fp16" else torch.float32)


def test_bench_backend_torch_times_both_programs(saved):
    _, paths = saved
    assert RUNNERS["torch"] is TorchRunner
    report = api.bench(paths["torch_dense"], paths["torch"], batch=2, blocks=1, iters=2, warmup=1, backend="torch",
                       ideal_speedup=1.5)
    assert report.speedup > 0 and report.dense["count"] == 2 and report.backend.startswith("torch ")


def test_errors_are_one_line(saved, tmp_path):
    _, paths = saved
    with pytest.raises(TargetError) as e:
        TorchRunner(tmp_path / "none.pt2")
    assert "parts=('torch',)" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        TorchRunner(paths["torch"], dtype="bf16")
    assert "fp32, fp16" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        TorchRunner(paths["torch"], device="cpu", cuda_graph=True)
    assert "--device cuda" in _one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as e:
            TorchRunner(paths["torch"], device="cuda")
        assert "--device cpu" in _one_line(e)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TargetError) as e:
        TorchRunner(bad, device="cpu").activate()
    assert "cannot load" in _one_line(e)
    with TorchRunner(paths["torch"], device="cpu") as runner:
        with pytest.raises(ConfigError) as e:
            runner.infer({"pixel_values": np.zeros((1, 3, 8, 8), np.float32)})
        assert "resize your input" in _one_line(e)


def test_bench_settings_pass_device_and_dtype_to_the_torch_runner_only():
    from tokensieve.benchmark import BenchSettings

    opts = BenchSettings(backend="torch", device="cpu", dtype="fp16").runner_options()
    assert opts == {"device": "cpu", "dtype": "fp16"}
    with pytest.raises(ConfigError) as e:
        BenchSettings(backend="onnxruntime", dtype="fp16")
    assert "--dtype does not apply to --backend onnxruntime; it is an option of --backend torch" == _one_line(e)


def test_one_loaded_program_serves_fp32_and_fp16_runners(saved):
    """program=(ExportedProgram, meta) builds runners without reading the file again, and fp16 leaves it float32."""
    _, paths = saved
    loaded = read_program(paths["torch"])
    with TorchRunner(paths["torch"], device="cpu", dtype="fp16", program=loaded) as r16:
        feeds = r16.make_random_feeds(batch=1, seed=3)
        assert next(iter(r16.infer(feeds).values())).dtype == np.float16
    assert all(t.dtype == torch.float32 for t in loaded[0].state_dict.values() if t.is_floating_point())
    with TorchRunner(paths["torch"], device="cpu", program=loaded) as r32:
        assert next(iter(r32.infer(feeds).values())).dtype == np.float32


class _Payload:
    """Unpickling this writes a sentinel file: the code a hostile .pt2 would run."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _rewrite(src, dst, replace):
    """Copy the zip archive `src` to `dst`, entry by entry, with replace(name, data) -> data."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace(info.filename, zin.read(info)))


@pytest.mark.parametrize("attack", ["pickled sample inputs", "use_pickle weight", "custom-object constant"])
def test_a_program_archive_that_would_unpickle_is_refused_before_loading(saved, tmp_path, attack):
    """bench --backend torch on an untrusted export folder: torch.export.load would unpickle these
    (weights_only=False); read_program refuses them in one line and nothing runs."""
    import pickle

    _, paths = saved
    sentinel = tmp_path / "ran"
    evil = pickle.dumps(_Payload(str(sentinel)))

    def replace(name, data):
        if attack == "pickled sample inputs" and name.endswith("sample_inputs/model.pt"):
            return evil
        if attack == "use_pickle weight" and name.endswith("_weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        if attack == "custom-object constant" and name.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "custom_obj_0", "use_pickle": False}}}).encode()
        return data

    bad = tmp_path / "model.pt2"
    _rewrite(paths["torch"], bad, replace)
    with pytest.raises(TargetError) as e:
        read_program(bad)
    assert "unpickle" in _one_line(e) and len(_one_line(e)) < 300
    assert not sentinel.exists()
