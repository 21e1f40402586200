"""Faults while writing: a full disk (ENOSPC, a small tmpfs), the file-size limit (RLIMIT_FSIZE: Python ignores
SIGXFSZ, so a write past it fails with EFBIG), a folder where a file should go, and a path under a regular file. Each
command exits 2 with one line (`tokensieve CMD: error: Cannot write ...: why; fix`), no traceback, no temp file or
staging folder left, and the previous result as it was (a folder the failing export created is removed). The
commands run in children of a fork server (forkserver.py); the tmpfs lives in the child's own mount namespace."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from forkserver import ForkServer

TOY_PROCESSOR = Path(__file__).resolve().parents[2] / "core" / "toy_vit"


@pytest.fixture(scope="module")
def server():
    fs = ForkServer()
    yield fs
    fs.close()


@pytest.fixture(scope="module")
def export_dir(server, tmp_path_factory):
    """A tiny dense export without engine (4 s): the input of the bench/eval/build cases."""
    out = tmp_path_factory.mktemp("wf") / "export"
    log = out.parent / "export.log"
    assert server.run(["export", "--model", "tiny", "--prune", "dense", "--no-bench", "--no-build",
                       "--verify-inputs", "1", "-o", out], log) == 0, log.read_text()[-2000:]
    return out


def one_line_error(log: Path, command: str, *needles: str) -> str:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    lines = text.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:], text[-2000:]  # one error line, the last one
    assert errors[0].startswith(f"tokensieve {command}: error: "), errors
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def no_temp_files(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []
    assert left == [], left


def _listings(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_full_disk_keeps_the_previous_export(server, tmp_path):
    """A 3 MiB tmpfs: the first export (1.8 MiB: three ONNX graphs + their one shared weights file) fits; the second
    one's staged files do not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    argv = ["export", "--model", "tiny", "--prune", "dense", "--no-bench", "--no-build", "--verify-inputs", "1",
            "-o", out]
    code = server.run(argv, tmp_path / "log", tmpfs={"path": str(disk), "size": "3m"}, more=[argv],
                      listing={"dir": str(disk), "to": str(tmp_path / "listing")})
    text = (tmp_path / "log").read_text()
    if code == 97:
        pytest.skip(f"cannot mount a tmpfs here: {text.strip()}")
    first, second = _listings(tmp_path / "listing")
    assert first["code"] == 0, text[-2000:]
    assert code == second["code"] == 2
    line = one_line_error(tmp_path / "log", "export", "the disk is full", "free space")
    assert second["files"] == first["files"], (second["files"], first["files"])  # same bytes, nothing else
    print(f"\n{line}")


def test_the_file_size_limit_fails_the_export_and_removes_its_new_folder(server, tmp_path):
    out = tmp_path / "new" / "out"
    log = tmp_path / "log"
    code = server.run(["export", "--model", "tiny", "--prune", "dense", "--no-bench", "--no-build", "-o", out], log,
                      fsize=512 * 1024)
    assert code == 2, log.read_text()[-2000:]
    one_line_error(log, "export", "file-size limit", "ulimit -f")
    assert not out.exists()  # the folder it created is gone again, staging folder and temp files with it


def test_the_file_size_limit_fails_a_build_and_keeps_the_previous_engine(server, export_dir, tmp_path):
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"tensorrt_rtx does not import ({type(e).__name__}); the engine build cannot run here")
    engine = tmp_path / "model.engine"
    assert server.run(["build", export_dir / "model.onnx", "-o", engine, "--max-batch", "4"], tmp_path / "b0") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("model.engine*")}
    log = tmp_path / "log"
    code = server.run(["build", export_dir / "model.onnx", "-o", engine], log, fsize=1024 * 1024)
    assert code == 2, log.read_text()[-2000:]
    one_line_error(log, "build", "file-size limit")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("model.engine*")} == before
    no_temp_files(tmp_path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A regular file, a folder named like a file, and images (for visualize / eval)."""
    from tokensieve.toy import png_bytes, write_image_folder

    root = tmp_path_factory.mktemp("paths")
    (root / "file").write_text("a regular file\n")
    for name in ("dir.json", "dir.md", "dir.png", "dir.engine", "dir.toml"):
        (root / name).mkdir()
    import numpy as np

    (root / "cat.png").write_bytes(png_bytes(np.full((64, 64, 3), 128, np.uint8)))
    write_image_folder(root / "images", 2, labels=False)
    return root


def _cases(export_dir: Path, r: Path):
    f, onnx = r / "file", export_dir / "model.onnx"
    bench = ["bench", export_dir, "--blocks", "1", "--iters", "1", "--warmup", "0"]
    vis = ["visualize", r / "cat.png", "--model", "tiny", "--prune", "cls-topk@1:0.5"]
    return [
        ("export", ["export", "--model", "tiny", "--no-bench", "-o", f], r, "is a file"),
        ("export", ["export", "--model", "tiny", "--no-bench", "-o", f / "out"], r, "is a file"),
        ("build", ["build", onnx, "-o", r / "dir.engine"], r, "is a folder"),
        ("build", ["build", onnx, "-o", f / "model.engine"], r, "is a file"),
        ("bench", [*bench, "--json", r / "dir.json"], r, "is a folder"),
        ("bench", [*bench, "--md", f / "b.md"], r, "is a file"),
        ("bench", [*bench, "--plot", r / "dir.png"], r, "is a folder"),
        ("tune", ["tune", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", f / "t.toml"], r, "is a file"),
        ("visualize", [*vis, "-o", f / "kept.png"], r, "is a file"),
        ("visualize", [*vis, "-o", r / "kept.png", "--json", r / "dir.json"], r, "is a folder"),
        ("eval", ["eval", export_dir, "--images", r / "images", "--processor", TOY_PROCESSOR, "--json",
                  r / "dir.json"], r, "is a folder"),
    ]


def test_a_folder_or_a_file_in_the_way_is_one_line(server, export_dir, paths):
    """Where a file should be written there is a folder, or a part of the path is a regular file."""
    lines = []
    for i, (command, argv, folder, needle) in enumerate(_cases(export_dir, paths)):
        log = paths / f"case{i}.log"
        log_in_root = log
        code = server.run(argv, log)
        assert code == 2, (argv, log.read_text()[-2000:])
        lines.append(one_line_error(log_in_root, command, needle))
        log.unlink()
        no_temp_files(folder)
        no_temp_files(export_dir)
    print("\n" + "\n".join(lines))


def test_stale_temp_files_go_and_a_live_writers_stay(tmp_path):
    """The temp files of a killed writer (no flock on them) are removed by the next writer of that target; a live
    writer's (flock-ed) and files that only look alike stay."""
    import os
    import tempfile

    from tokensieve.fileio import atomic_path, remove_stale_temps

    fd, stale = tempfile.mkstemp(prefix=".model.engine.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    (tmp_path / ".model.engine.my-backup.tmp").write_text("not ours")
    with atomic_path(tmp_path / "model.engine") as live:
        live.write_text("being written")
        assert not Path(stale).exists()  # removed when this writer started
        assert remove_stale_temps(tmp_path, ["model.engine"]) == [] and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.engine.my-backup.tmp", "model.engine"]
