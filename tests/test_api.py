"""api.verify never passes what it did not check: NaN/Inf on either side, a shape mismatch, a bad atol.

One tiny export (module fixture, ~3 s); the ONNX side is broken by editing its graph, the eager side by wrapping the
reference.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from tiny_models import build
from tokensieve import api
from tokensieve.errors import ConfigError, VerificationError
from tokensieve.exporter.onnx_files import save_onnx


@pytest.fixture(scope="module")
def exported():
    model, x = build("dinov2")  # last_hidden_state (B, N, C): rows a padded reference can blank
    return api.export(model, x, "cls-topk@1:0.5")


@pytest.fixture(scope="module")
def debug_path(exported, tmp_path_factory):
    return api.save(exported, tmp_path_factory.mktemp("ok"), parts=("debug",))["debug"]


def _verify(result, path, reference=None, **kw):
    blocks = [s.stage.after_block for s in result.stages]
    return api.verify_onnx(reference or result.reference, result.input_shape, blocks, path, num_inputs=2, batch=2,
                           **kw)


def _times_onnx_output(proto: onnx.ModelProto, value: float, tmp_path) -> str:
    """The debug ONNX with its model output multiplied by `value` (NaN / Inf): what a broken kernel would give."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    out = m.graph.output[0]
    raw = out.name + ".raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), "bad_scale"))
    m.graph.node.append(onnx.helper.make_node("Mul", [raw, "bad_scale"], [out.name]))
    path = tmp_path / "broken.onnx"
    save_onnx(m, path)
    return path


def test_the_untouched_export_passes(exported, debug_path):
    report = _verify(exported, debug_path)
    assert report.passed and report.nonfinite == [] and report.shape_match


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_onnx_output_fails(exported, tmp_path, value):
    report = _verify(exported, _times_onnx_output(exported.debug_onnx, value, tmp_path))
    assert report.indices_match == [True]  # the selection is untouched: only the output is broken
    assert report.nonfinite == ["onnx"] and not report.passed
    with pytest.raises(VerificationError, match="NaN/Inf in the onnx output"):
        api.check_verified(report)


def test_nonfinite_eager_output_fails(exported, debug_path):
    def nan_reference(x):
        out, kept = exported.reference(x)
        return out * float("nan"), kept

    report = _verify(exported, debug_path, nan_reference)
    assert report.nonfinite == ["eager"] and not report.passed


def test_whole_nan_rows_are_padding_only_when_the_reference_pads(exported, debug_path):
    """A compacting stage's reference pads with whole NaN rows (not compared); without one, such rows fail."""
    def padded_reference(x):
        out, kept = exported.reference(x)
        out = out.clone()
        out[:, -1] = float("nan")
        return out, kept

    assert not _verify(exported, debug_path, padded_reference).passed
    assert _verify(exported, debug_path, padded_reference, padded=True).passed
    assert api.pads_output(["adaptive"]) and not api.pads_output(["cls-topk", "tome"])


def test_output_shape_mismatch_fails(exported, debug_path):
    def short_reference(x):
        out, kept = exported.reference(x)
        return out[:, :-1], kept

    report = _verify(exported, debug_path, short_reference)
    assert not report.shape_match and not report.passed


@pytest.mark.parametrize("atol", [math.nan, math.inf, -1e-4, "1e-4"])
def test_bad_atol_is_refused(exported, debug_path, atol):
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        _verify(exported, debug_path, atol=atol)


def test_export_folder_refuses_a_bad_target_before_loading(tmp_path):
    """export_folder checks the build arguments first: nothing is loaded, no folder is left behind."""
    with pytest.raises(ConfigError):
        api.export_folder("default", "cls-topk@3:0.7", tmp_path / "out", target="rtx-sm00")
    assert not (tmp_path / "out").exists()


def test_reports_of_another_schema_are_refused(tmp_path):
    (tmp_path / "report.json").write_text('{"model": "default"}')
    with pytest.raises(ConfigError, match="no schema version"):
        api.read_export_report(tmp_path)
    (tmp_path / "report.json").write_text('["not", "an", "object"]')
    with pytest.raises(ConfigError, match="not an object"):
        api.read_export_report(tmp_path)
    (tmp_path / "report.json").write_text(f'{{"schema": "{api.REPORT_SCHEMA}"}}')
    with pytest.raises(ConfigError, match="lacks macs_dense"):
        api.read_export_report(tmp_path, required=("macs_dense",))


# ------------------------------------------------------------------------------------------ the export folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_second_writer_is_refused_while_the_folder_is_locked(tmp_path):
    from tokensieve.fileio import folder_lock

    with folder_lock(tmp_path), pytest.raises(ConfigError, match="Another tokensieve export is writing into"):
        api.export_folder("tiny", "cls-topk@1:0.5", tmp_path, build=False, bench=False)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_reexport_keeps_the_previous_result(tmp_path, monkeypatch):
    """A re-export writes into a staging folder and swaps at the end: interrupted midway (Ctrl-C during verify), the
    folder is byte-for-byte the previous export; a killed run's leftover staging folder is removed by the next run."""
    out = tmp_path / "out"
    first = api.export_folder("tiny", "cls-topk@1:0.5", out, build=False, bench=False, verify_inputs=1)
    assert first["verify"]["passed"] and api.read_export_report(out)["files"]["model"] == str(out / "model.onnx")
    before = _snapshot(out)
    assert set(before) == {"model.onnx", "model.debug.onnx", "dense.onnx", "report.json", "config.json",
                           "preprocessor_config.json", api.WEIGHTS}
    leftover = out / (api.STAGING_PREFIX + "killed")
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.export_folder("tiny", "cls-topk@1:0.25", out, build=False, bench=False, verify_inputs=1)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder, the killed one's too
