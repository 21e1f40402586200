"""An engine build killed (SIGKILL) while its scratch folder exists leaves it behind (nothing runs at a SIGKILL); the
next build into that folder removes it, while a live build's scratch folder is left alone (fileio.locked_temp_dir:
flock-ed while in use). The scratch folder is where the builder saves a model over protobuf's 2 GB limit for the
parser; the test lowers that limit to 0 so a tiny MatMul takes the same path (TensorRT-RTX, no GPU needed).

One helper process (tensorrt_rtx, onnx_ir, the builder: no torch) forks the build it kills.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tokensieve.fileio import locked_temp_dir, remove_stale_temp_dirs

HELPER = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path

    import numpy as np
    import onnx
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    from tokensieve.targets.base import BuildSpec
    from tokensieve.targets.tensorrt import build_engine, builder

    root = Path(sys.argv[1])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])],
        [numpy_helper.from_array(np.ones((16, 32), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(root / "tiny.onnx"))
    builder.PROTO_LIMIT = 0  # every model goes through the scratch folder, as one over 2 GB does
    spec = BuildSpec(target="rtx-sm86", max_batch=4)

    def scratch():
        return sorted(p.name for p in root.iterdir() if p.name.startswith(builder.SCRATCH_PREFIX))

    pid = os.fork()
    if pid == 0:
        real_save = onnx_ir.save

        def save_then_die(*args, **kw):  # the lowered model is in the scratch folder: killed before the parse
            real_save(*args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)

        onnx_ir.save = save_then_die
        build_engine(root / "tiny.onnx", root / "tiny.engine", spec)
        os._exit(0)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    after_kill = scratch()
    files = sorted(p.name for p in (root / after_kill[0]).iterdir()) if after_kill else []
    info = build_engine(root / "tiny.onnx", root / "tiny.engine", spec)  # the next build
    print(json.dumps({"status": status, "after_kill": after_kill, "scratch_files": files, "after_rerun": scratch(),
                      "names": sorted(p.name for p in root.iterdir()), "size": info.size_bytes}))
''')


def test_killed_builds_scratch_folder_is_removed_by_the_next_build(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    (tmp_path / "helper.py").write_text(HELPER)
    (tmp_path / "work").mkdir()
    proc = subprocess.run([sys.executable, str(tmp_path / "helper.py"), str(tmp_path / "work")], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["status"] == -9, r
    assert len(r["after_kill"]) == 1 and "tiny.onnx" in r["scratch_files"], r  # what the kill left
    assert r["after_rerun"] == [] and r["size"] > 0, r
    assert r["names"] == ["tiny.engine", "tiny.engine.json", "tiny.onnx"], r  # no temp file of any kind


def test_live_scratch_folder_is_left_alone(tmp_path):
    """The cleaner skips a folder a live run holds, takes an unheld one, and ignores other names."""
    stale = tmp_path / ".tokensieve-build-abcd1234"
    stale.mkdir()
    (stale / "x").write_text("killed")
    (tmp_path / ".tokensieve-build-notmine").mkdir()  # not mkdtemp's 8 characters: not ours
    with locked_temp_dir(tmp_path, ".tokensieve-build-") as live:
        (live / "model.onnx").write_text("in use")
        assert remove_stale_temp_dirs(tmp_path, ".tokensieve-build-") == [stale]
        assert (live / "model.onnx").read_text() == "in use"
    assert not live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokensieve-build-notmine"]
