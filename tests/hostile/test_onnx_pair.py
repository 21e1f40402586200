"""An ONNX model with external data (model.onnx + model.onnx.data, exporter/onnx_files.py) rewritten by a process
killed (SIGKILL) before, between and after its renames: the folder holds the old pair, the new pair, or the new
.data without any .onnx; never an .onnx beside weights of the other version or without its .data. The next write
removes the killed one's temp files and leaves exactly the new pair.

One helper process (no torch: onnx, onnx_ir, tokensieve.fileio) forks one child per kill point; the child counts
its os.replace / os.unlink calls on the folder's visible files and sends itself SIGKILL at the K-th.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HELPER = textwrap.dedent('''
    import json, os, signal, sys
    from contextlib import ExitStack
    from pathlib import Path

    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from tokensieve.exporter.onnx_files import stage_onnx

    root = Path(sys.argv[1])

    def model(version: str) -> ir.Model:
        """Y = X + W, W a 32x32 float (4 KiB: written as external data) filled with the version's number; the graph
        is named after the version too, so a mixed pair shows."""
        w = numpy_helper.from_array(np.full((32, 32), float(ord(version)), np.float32), "W")
        g = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], version,
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [32, 32])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [32, 32])], [w])
        return ir.from_proto(helper.make_model(g))

    def write(folder: Path, version: str) -> None:
        with ExitStack() as staged:
            stage_onnx(model(version), folder / "model.onnx", True, staged)

    def state(folder: Path) -> dict:
        names = sorted(p.name for p in folder.iterdir())
        onnx_file = folder / "model.onnx"
        out = {"names": names, "graph": None, "weights": None}
        if onnx_file.exists():
            try:
                m = onnx.load(str(onnx_file))  # the external data loaded from the location the .onnx names
                out["graph"] = m.graph.name
                bare = onnx.load(str(onnx_file), load_external_data=False)
                out["external"] = bare.graph.initializer[0].data_location == TensorProto.EXTERNAL
                out["weights"] = chr(int(numpy_helper.to_array(m.graph.initializer[0]).flat[0]))
            except Exception as e:  # a missing or short .data
                out["weights"] = f"unloadable: {type(e).__name__}"
        elif (folder / "model.onnx.data").exists():
            out["data"] = chr(int(np.fromfile(folder / "model.onnx.data", np.float32)[0]))
        return out

    def hook(folder: Path, at: int):
        count = [0]
        real_replace, real_unlink = os.replace, os.unlink

        def hit(path):
            p = Path(os.fspath(path)).absolute()
            if p.parent == folder and not p.name.startswith("."):
                count[0] += 1
                if count[0] == at:
                    os.kill(os.getpid(), signal.SIGKILL)

        def replace(src, dst, **kw):
            hit(dst)
            return real_replace(src, dst, **kw)

        def unlink(path, **kw):
            hit(path)
            return real_unlink(path, **kw)

        os.replace, os.unlink = replace, unlink

    results = []
    for at in range(1, 5):
        folder = (root / f"k{at}").absolute()
        folder.mkdir()
        write(folder, "A")
        pid = os.fork()
        if pid == 0:
            hook(folder, at)
            write(folder, "B")
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        after_kill = state(folder)
        write(folder, "B")  # the rerun
        results.append({"at": at, "status": status, "after_kill": after_kill, "after_rerun": state(folder)})
    print(json.dumps(results))
''')


def test_external_data_pair_survives_a_kill_at_each_rename(tmp_path):
    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    kinds = []
    for r in results:
        k = r["after_kill"]
        visible = [n for n in k["names"] if not n.startswith(".")]
        if "model.onnx" in visible:  # a complete pair of one version, loadable: the old one or the new one
            assert visible == ["model.onnx", "model.onnx.data"], r
            assert k["graph"] == k["weights"] and k["graph"] in ("A", "B") and k["external"], r
            kinds.append(k["graph"])
        else:  # the marker went first: the new weights without any .onnx that could point at them
            assert visible in ([], ["model.onnx.data"]), r
            kinds.append("no onnx")
        assert r["after_rerun"] == {"names": ["model.onnx", "model.onnx.data"], "graph": "B", "weights": "B",
                                    "external": True}, r
    # killed just before the 1st call (unlink of the old .onnx: nothing changed yet), the 2nd (.data renamed in), the
    # 3rd (.onnx renamed in); the 4th never comes (the write completes)
    assert [r["status"] for r in results] == [-9, -9, -9, 0], results
    assert kinds == ["A", "no onnx", "no onnx", "B"], results
    assert [results[1]["after_kill"]["data"], results[2]["after_kill"]["data"]] == ["A", "B"], results
    assert any(n.startswith(".") for n in results[2]["after_kill"]["names"]), results  # the killed one's temp files
