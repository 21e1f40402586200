"""Hostile-input catalogue: every subcommand given bad values, bad files and bad paths answers with one short line
`tokensieve CMD: error: ...` and exit 2 (no traceback), and leaves the folder it ran in exactly as it was.

Each case runs `tokensieve.cli.main` in-process in a fresh folder (cwd, so paths and messages stay short). Cases
that need an export folder copy one module-scoped export of the tiny model. A handful of behaviours that need a real
process (an ASCII stdout, a closed pipe, a stdin that never closes) are at the end and use subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tokensieve.cli import main

MAX_LINE = 200
OUT = "out"            # the output folder every case names; it must not exist afterwards
TINY = ["--model", "tiny"]
FAST = ["--no-build", "--no-bench"]


# ------------------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (dot files too) -> (size, mtime_ns); FIFOs/devices by their lstat."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def assert_one_line_error(cmd: str, rc, err: str, match: str) -> str:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error line"
    last = lines[-1]
    assert last.startswith(f"tokensieve {cmd}: error: "), err
    assert len(last) <= MAX_LINE, f"{len(last)} characters: {last}"
    assert [ln for ln in lines if "error:" in ln] == [last], err  # one error line, the last
    assert match in last, (match, last)
    return last


def run_case(capsys, root: Path, argv: list[str], match: str) -> str:
    before = snapshot(root)
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    line = assert_one_line_error(argv[0], rc, captured.err, match)
    assert snapshot(root) == before, "files were created, changed or removed"
    assert not (root / OUT).exists()
    return line


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """One export of the tiny model (ONNX only), copied by the cases that need an export folder."""
    out = tmp_path_factory.mktemp("hostile-export") / "exp"
    assert main(["export", *TINY, "--prune", "cls-topk@1:0.5", "-o", str(out), *FAST, "--verify-inputs", "1"]) == 0
    return out


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exp(root: Path, export_dir: Path) -> Path:
    dst = root / "exp"
    shutil.copytree(export_dir, dst)
    return dst


def _edit_report(root: Path, export_dir: Path, edit) -> None:
    exp = _exp(root, export_dir)
    r = json.loads((exp / "report.json").read_text())
    r = edit(r)
    (exp / "report.json").write_bytes(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())


def _write(name: str, data: str | bytes):
    def setup(root: Path, _export_dir=None):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _fifo(name: str):
    def setup(root: Path, _export_dir=None):
        os.mkfifo(root / name)
    return setup


def _link(name: str, target: str):
    def setup(root: Path, _export_dir=None):
        os.symlink(target, root / name)
    return setup


def _mkdir(name: str):
    def setup(root: Path, _export_dir=None):
        (root / name).mkdir(parents=True)
    return setup


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels (and one tiny IDAT): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BILLION_LAUGHS = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                  + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
                            for i in range(8)))


def _stage(**kw) -> str:
    stage = {"method": "cls-topk", "after_block": 1, "keep": 0.5, **kw}
    return json.dumps({"stage": [stage]})


# ------------------------------------------------------------------------------------------ recipes (shorthand)

# --prune TEXT -> the one-line error; all refused before the model loads (or right after, for block/keep ranges)
SHORTHAND = {
    "nan param": ("adaptive(threshold=nan)@1:0.5", "threshold must be a finite number"),
    "inf param": ("ttv(direction_weight=inf)@1:0.5", "direction_weight must be a finite number"),
    "-inf param": ("holitom(beta=-inf)@1:0.5", "beta must be a finite number"),
    "nan lam": ("divprune(lam=nan)@1:0.5", "has no parameter 'lam'"),
    "alpha nan": ("cls-topk(alpha=nan)@1:0.5", "has no parameter 'alpha'"),
    "tome r inf": ("tome(r=inf)@1:0.5", "has no parameter 'r'"),
    "hiprune alpha nan": ("hiprune(alpha=nan)@2:0.5", "alpha must be a finite number"),
    "param above range": ("feather(uniform_share=2)@1:0.5", "outside [0.0, 1.0]"),
    "param below range": ("ttv(direction_weight=-1)@1:0.5", "outside [0.0, 100.0]"),
    "huge int param": ("random(seed=" + "9" * 60 + ")@1:0.5", "is outside"),
    "float for int": ("random(seed=1.5)@1:0.5", "seed must be an integer"),
    "string for number": ("adaptive(threshold=high)@1:0.5", "threshold must be a number"),
    "deep list param": ("cls-topk(fuse=" + "[" * 5000 + ")@1:0.5", "fuse must be true or false"),
    "newline param": ("cls-topk(fuse=true\nrecycle=true)@1:0.5", "fuse must be true or false"),
    "bool as word": ("cls-topk(fuse=maybe)@1:0.5", "fuse must be true or false"),
    "param twice": ("cls-topk(fuse=true,fuse=false)@1:0.5", "given twice"),
    "param no value": ("cls-topk(fuse)@1:0.5", "must be name=value"),
    "nested parens": ("cls-topk((fuse=true))@1:0.5", "Cannot parse recipe"),
    "recycle with fuse": ("cls-topk(recycle=true,fuse=true)@1:0.5", "set only one of them"),
    "keep nan": ("cls-topk@1:nan", "is not a number"),
    "keep inf": ("cls-topk@1:inf", "is not a number"),
    "keep 1e308": ("cls-topk@1:1e308", "keep ratio 1e+308 is out of range"),
    "keep zero": ("cls-topk@1:0", "keep count 0 is out of range"),
    "keep zero ratio": ("cls-topk@1:0.0", "keep ratio 0.0 is out of range"),
    "keep negative": ("cls-topk@1:-3", "keep count -3 is out of range"),
    "keep negative ratio": ("cls-topk@1:-0.5", "keep ratio -0.5 is out of range"),
    "keep above N": ("cls-topk@1:64", "must be below the 64 patch tokens"),
    "keep huge count": ("cls-topk@1:" + "9" * 30, "is out of range"),
    "keep word": ("cls-topk@1:most", "is not a number"),
    "keep empty": ("cls-topk@1:", "Cannot parse recipe"),
    "no keep": ("cls-topk@1", "Cannot parse recipe"),
    "no method": ("@1:0.5", "Cannot parse recipe"),
    "block negative": ("cls-topk@-1:0.5", "is negative"),
    "block out of range": ("cls-topk@9:0.5", "the model has blocks 0..3"),
    "block huge": ("cls-topk@" + "9" * 30 + ":0.5", "beyond any model"),
    "block word": ("cls-topk@a:0.5", "must be comma-separated integers"),
    "block empty list item": ("cls-topk@1,,2:0.5", "must be comma-separated integers"),
    "empty places": ("cls-topk@:0.5", "Cannot parse recipe"),
    "same block twice": ("cls-topk@1:0.5+attn-mean@1:0.5", "same block"),
    "trailing plus": ("cls-topk@1:0.5+", "an empty stage"),
    "double plus": ("cls-topk@1:0.5++ttv@2:0.5", "an empty stage"),
    "unknown method": ("foo@1:0.5", "Unknown method 'foo'"),
    "misspelled method": ("cls-tpok@1:0.5", "did you mean cls-topk"),
    "long method name": ("x" * 5000 + "@1:0.5", "Unknown method"),
    "long garbage": ("?" * 20000, "Cannot parse recipe"),
    "video method on a ViT": ("evs@1:0.5", "is a video method"),
    "stateful then other": ("adaptive@1:0.5+cls-topk@2:0.5", "follows a stateful adaptive stage"),
    "device as recipe": ("/dev/zero", "Cannot parse recipe"),
}


@pytest.mark.parametrize("recipe, match", SHORTHAND.values(), ids=SHORTHAND.keys())
def test_bad_shorthand(here, capsys, recipe, match):
    run_case(capsys, here, ["export", *TINY, "--prune", recipe, "-o", OUT, *FAST], match)


# ------------------------------------------------------------------------------------------ recipe files

RECIPE_FILES = {
    "missing file": (None, "r.toml", "No such file or directory"),
    "folder": (_mkdir("r.toml"), "r.toml", "it is a folder"),
    "fifo": (_fifo("r.json"), "r.json", "it is a FIFO"),
    "/dev/zero": (_link("r.json", "/dev/zero"), "r.json", "it is a device"),
    "/dev/urandom": (_link("r.yaml", "/dev/urandom"), "r.yaml", "it is a device"),
    "huge": (_write("r.json", "{" + " " * (17 << 20) + "}"), "r.json", "more than the 16 MiB"),
    "deep json": (_write("r.json", "[" * 100_000), "r.json", "nests too deeply"),
    "deep toml": (_write("r.toml", "stage = " + "[" * 100_000), "r.toml", "nests too deeply"),
    "deep yaml": (_write("r.yaml", "[" * 30_000), "r.yaml", "nests too deeply"),
    "billion laughs": (_write("r.yaml", BILLION_LAUGHS + "stage: *i\n"), "r.yaml", "aliases expand to more than"),
    "laughs in a param": (_write("r.yaml", BILLION_LAUGHS + "stage: [{method: cls-topk, after_block: 1, keep: 0.5, "
                                 "params: {fuse: *i}}]\n"), "r.yaml", "aliases expand"),
    "self alias": (_write("r.yaml", "a: &a [*a]\n"), "r.yaml", "refers to itself"),
    "python tag": (_write("r.yaml", "!!python/object/apply:os.system ['true']\n"), "r.yaml", "not valid YAML"),
    "invalid utf-8 toml": (_write("r.toml", b"\xff\xfe[[stage]]"), "r.toml", "not UTF-8"),
    "invalid utf-8 json": (_write("r.json", b'{"stage": "\xff"}'), "r.json", "not UTF-8"),
    "invalid utf-8 yaml": (_write("r.yml", b"stage: \xff\xfe"), "r.yml", "not UTF-8"),
    "bad json": (_write("r.json", "{"), "r.json", "is not valid JSON"),
    "bad toml": (_write("r.toml", "[[stage]\n"), "r.toml", "is not valid TOML"),
    "empty toml": (_write("r.toml", ""), "r.toml", "needs a non-empty `stage` list"),
    "list at top": (_write("r.json", "[1, 2]"), "r.json", "expected a table"),
    "scalar yaml": (_write("r.yaml", "hello"), "r.yaml", "expected a table"),
    "stage is an object": (_write("r.json", '{"stage": {"method": "cls-topk"}}'), "r.json", "non-empty `stage` list"),
    "stage item a list": (_write("r.json", '{"stage": [[1]]}'), "r.json", "must be a table"),
    "method a list": (_write("r.json", _stage(method=["x"] * 1000)), "r.json", "must be a method name"),
    "laughs as method": (_write("r.yaml", "a: &a [x, x, x]\nstage: [{method: *a, after_block: 1, keep: 0.5}]\n"),
                         "r.yaml", "must be a method name"),
    "block a string": (_write("r.json", _stage(after_block="1")), "r.json", "after_block must be an integer"),
    "block a float": (_write("r.json", _stage(after_block=1.0)), "r.json", "after_block must be an integer"),
    "block huge": (_write("r.json", _stage(after_block=10**4000)), "r.json", "beyond any model"),
    "keep NaN": (_write("r.json", '{"stage": [{"method": "cls-topk", "after_block": 1, "keep": NaN}]}'), "r.json",
                 "keep ratio nan is out of range"),
    "keep Infinity": (_write("r.json", '{"stage": [{"method": "cls-topk", "after_block": 1, "keep": Infinity}]}'),
                      "r.json", "keep ratio inf is out of range"),
    "keep 5000 digits": (_write("r.json", '{"stage": [{"method": "cls-topk", "after_block": 1, "keep": ' + "9" * 5000
                                + "}]}"), "r.json", "is not valid JSON"),
    "keep a bool": (_write("r.json", _stage(keep=True)), "r.json", "not a boolean"),
    "keep a list": (_write("r.json", _stage(keep=[0.5] * 10_000)), "r.json", "is not a number"),
    "keep a dict": (_write("r.json", _stage(keep={"a": 1})), "r.json", "is not a number"),
    "param NaN": (_write("r.json", '{"stage": [{"method": "adaptive", "after_block": 1, "keep": 0.5, '
                         '"params": {"threshold": NaN}}]}'), "r.json", "threshold must be a finite number"),
    "param a list": (_write("r.json", _stage(params={"fuse": list(range(10_000))})), "r.json",
                     "fuse must be true or false"),
    "params a list": (_write("r.json", _stage(params=[1])), "r.json", "params must be a table"),
    "yaml int param names": (_write("r.yaml", "stage: [{method: cls-topk, after_block: 1, keep: 0.5, "
                                    "params: {1: true, a: 2}}]\n"), "r.yaml", "params must be a table"),
    "unknown fields": (_write("r.json", _stage(**{"1": 2, "colour": 3})), "r.json", "unknown field(s)"),
    "too many values": (_write("r.json", json.dumps({"stage": [0] * 200_000})), "r.json", "more than 100000 values"),
    "diffrate not a table": (_write("r.json", '{"diffrate": [1]}'), "r.json", "diffrate needs patches"),
    "diffrate strings": (_write("r.json", '{"diffrate": {"patches": 64, "prune": "x", "merge": [1]}}'), "r.json",
                         "must be positive integer"),
    "diffrate growing": (_write("r.json", '{"diffrate": {"patches": 64, "prune": [70], "merge": [60]}}'), "r.json",
                         "must not grow"),
}


@pytest.mark.parametrize("setup, name, match", RECIPE_FILES.values(), ids=RECIPE_FILES.keys())
def test_bad_recipe_file(here, capsys, setup, name, match):
    if setup:
        setup(here)
    run_case(capsys, here, ["export", *TINY, "--prune", name, "-o", OUT, *FAST], match)


def test_tuned_recipe_read_back_is_checked(here, capsys):
    """tune's -o file is what `export --prune tuned.toml` reads: a hand-edited one is checked like any recipe."""
    (here / "tuned.toml").write_text('[[stage]]\nmethod = "cls-topk"\nafter_block = 1\nkeep = nan\n')
    run_case(capsys, here, ["export", *TINY, "--prune", "tuned.toml", "-o", OUT, *FAST], "keep ratio nan")


# ------------------------------------------------------------------------------------------ option values

OPTIONS = {
    "export atol nan": (["export", *TINY, "-o", OUT, *FAST, "--atol", "nan"], "argument --atol"),
    "export atol inf": (["export", *TINY, "-o", OUT, *FAST, "--atol", "inf"], "argument --atol"),
    "export atol negative": (["export", *TINY, "-o", OUT, *FAST, "--atol", "-1"], "must be a finite number >= 0"),
    "export verify-inputs 0": (["export", *TINY, "-o", OUT, *FAST, "--verify-inputs", "0"], "--verify-inputs"),
    "export verify-inputs 1e9": (["export", *TINY, "-o", OUT, *FAST, "--verify-inputs", "1000000000"], "out of range"),
    "export max-batch 0": (["export", *TINY, "-o", OUT, "--max-batch", "0"], "argument --max-batch"),
    "export max-batch 1e9": (["export", *TINY, "-o", OUT, "--max-batch", "1000000000"], "use 1..65536"),
    "export max-batch nan": (["export", *TINY, "-o", OUT, "--max-batch", "nan"], "is not an integer"),
    "export threads 0": (["export", *TINY, "-o", OUT, *FAST, "--threads", "0"], "argument --threads"),
    "export bench-blocks 0": (["export", *TINY, "-o", OUT, "--no-build", "--bench-blocks", "0"], "--bench-blocks"),
    "export bench-iters -1": (["export", *TINY, "-o", OUT, "--no-build", "--bench-iters", "-1"], "--bench-iters"),
    "export target unknown": (["export", *TINY, "-o", OUT, "--target", "rtx-sm999"], "Unknown TensorRT target"),
    "export precision unknown": (["export", *TINY, "-o", OUT, "--precision", "fp8"], "invalid choice: 'fp8'"),
    "export unknown flag": (["export", *TINY, "-o", OUT, "--colour", "red"], "unrecognized arguments"),
    "export image-size 0": (["export", *TINY, "-o", OUT, *FAST, "--image-size", "0"], "argument --image-size"),
    "export image-size text": (["export", *TINY, "-o", OUT, *FAST, "--image-size", "big"], "is not H or H,W"),
    "export image-size 3 values": (["export", *TINY, "-o", OUT, *FAST, "--image-size", "64,64,64"], "is not H or H,W"),
    "export image-size off the patch grid": (["export", *TINY, "-o", OUT, *FAST, "--image-size", "60"],
                                             "not a multiple of the model's patch size 8x8; pass e.g. --image-size 56,56"),
    "export outputs unknown": (["export", *TINY, "-o", OUT, *FAST, "--outputs", "pooler_output"],
                               "is not an output of ViTForImageClassification; choose from logits"),
    "export outputs empty": (["export", *TINY, "-o", OUT, *FAST, "--outputs", ","], "names no output; choose from logits"),
    "verify inputs nan": (["verify", "x", "--inputs", "nan"], "argument --inputs"),
    "verify batch 1e9": (["verify", "x", "--batch", "1000000000"], "argument --batch"),
    "verify batch huge digits": (["verify", "x", "--batch", "9" * 5000], "is not an integer"),
    "verify atol nan": (["verify", "x", "--atol", "nan"], "argument --atol"),
    "verify seed negative": (["verify", "x", "--seed", "-1"], "argument --seed"),
    "build max-batch 0": (["build", "m.onnx", "--max-batch", "0"], "argument --max-batch"),
    "build precision": (["build", "m.onnx", "--precision", "int3"], "invalid choice"),
    "build target unknown": (["build", "m.onnx", "--target", "sm86"], "does not exist"),
    "bench batch 0": (["bench", "x", "--batch", "0"], "is not a positive integer"),
    "bench batch nan": (["bench", "x", "--batch", "nan"], "is not a positive integer"),
    "bench batch list gap": (["bench", "x", "--batch", "1,,2"], "is not a positive integer"),
    "bench batch huge digits": (["bench", "x", "--batch", "9" * 5000], "is not a positive integer"),
    "bench batch twice": (["bench", "x", "--batch", "1,1"], "twice"),
    "bench batch too many": (["bench", "x", "--batch", ",".join(map(str, range(1, 100)))], "at most 64"),
    "bench blocks 0": (["bench", "x", "--blocks", "0"], "argument --blocks"),
    "bench warmup -1": (["bench", "x", "--warmup", "-1"], "argument --warmup"),
    "bench sweep nan": (["bench", "x", "--sweep", "nan"], "at least two"),
    "bench sweep nan pair": (["bench", "x", "--sweep", "0.5,nan"], "is not a number"),
    "bench sweep zero": (["bench", "x", "--sweep", "0,0.5"], "keep count 0 is out of range"),
    "bench sweep 1e308": (["bench", "x", "--sweep", "0.5,1e308"], "out of range"),
    "bench backend unknown": (["bench", "x", "--backend", "foo"], "Unknown backend 'foo'"),
    "bench sweep-batch 0": (["bench", "x", "--sweep-batch", "0"], "argument --sweep-batch"),
    "tune window nan": (["tune", *TINY, "-o", "t.toml", "--window", "nan"], "argument --window"),
    "tune window 0": (["tune", *TINY, "-o", "t.toml", "--window", "0"], "must be a finite number > 0"),
    "tune window 2": (["tune", *TINY, "-o", "t.toml", "--window", "2"], "<= 1"),
    "tune tol inf": (["tune", *TINY, "-o", "t.toml", "--tol", "inf"], "argument --tol"),
    "tune candidates 1": (["tune", *TINY, "-o", "t.toml", "--candidates", "1"], "argument --candidates"),
    "tune batch 0": (["tune", *TINY, "-o", "t.toml", "--batch", "0"], "argument --batch"),
    "tune output suffix": (["tune", *TINY, "--prune", "cls-topk@1:0.5", "-o", "t.txt"], "must be a recipe file"),
    "tune backend unknown": (["tune", *TINY, "-o", "t.toml", "--backend", "cuda"], "invalid choice"),
    "tune max-drop nan": (["tune", *TINY, "--images", "i", "--max-drop", "nan"], "argument --max-drop"),
    "tune max-drop 101": (["tune", *TINY, "--images", "i", "--max-drop", "101"], "<= 100"),
    "tune max-drop without images": (["tune", *TINY, "--max-drop", "1"], "add --images DIR"),
    "tune keeps without images": (["tune", *TINY, "--keeps", "0.5"], "add --images DIR"),
    "tune images with prune": (["tune", *TINY, "--images", "i", "--prune", "cls-topk@1:0.5"], "drop --prune"),
    "tune time-budget 0": (["tune", *TINY, "--images", "i", "--time-budget", "0"], "argument --time-budget"),
    "tune time-budget nan": (["tune", *TINY, "--images", "i", "--time-budget", "nan"], "argument --time-budget"),
    "tune keeps 1": (["tune", *TINY, "--images", "i", "--keeps", "0.5,1"], "keep ratio > 0 and < 1"),
    "tune keeps nan": (["tune", *TINY, "--images", "i", "--keeps", "nan"], "keep ratio > 0 and < 1"),
    "tune keeps empty entry": (["tune", *TINY, "--images", "i", "--keeps", "0.5,,0.7"], "without empty entries"),
    "tune methods unknown": (["tune", *TINY, "--images", "i", "--methods", "cls-topk,nope"], "unknown method 'nope'"),
    "tune after-blocks negative": (["tune", *TINY, "--images", "i", "--after-blocks", "1", "-1"], "not a block index"),
    "tune after-blocks huge": (["tune", *TINY, "--images", "i", "--after-blocks", "9" * 5000], "not a block index"),
    "tune images without processor": (["tune", *TINY, "--images", "i"], "pass --processor DIR"),
    "eval batch 0": (["eval", "x", "--images", "i", "--batch", "0"], "argument --batch"),
    "eval limit -5": (["eval", "x", "--images", "i", "--limit", "-5"], "argument --limit"),
    "eval no images": (["eval", "x"], "the following arguments are required: --images"),
}


@pytest.mark.parametrize("argv, match", OPTIONS.values(), ids=OPTIONS.keys())
def test_bad_option_value(here, capsys, argv, match):
    run_case(capsys, here, argv, match)


def test_unknown_command_is_one_line(here, capsys):
    rc = main(["frobnicate"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and "invalid choice: 'frobnicate'" in err
    assert err.startswith("tokensieve: error: ") and len(err.strip()) <= MAX_LINE and not list(here.iterdir())


# ------------------------------------------------------------------------------------------ paths


PATHS = {
    "output is a file": (_write("out_file", "x"), ["export", *TINY, "-o", "out_file", *FAST], "is a file"),
    "output under a file": (_write("f", "x"), ["export", *TINY, "-o", "f/out", *FAST], "Cannot create output"),
    "unknown model": (None, ["export", "--model", "nonexistent", "-o", OUT, *FAST], "neither a built-in model"),
    "model folder without config": (_mkdir("m"), ["export", "--model", "m", "-o", OUT, *FAST], "has no config.json"),
    "model siglip2 naflex": (_write("m/config.json", '{"model_type": "siglip2"}'), ["export", "--model", "m", "-o", OUT,
                             *FAST], "is SigLIP2 NaFlex (patchified inputs, not images), which `tokensieve export` cannot trace"),
    "model config garbage": (_write("m/config.json", b"\xff\x00garbage"), ["export", "--model", "m", "-o", OUT, *FAST],
                             "m"),
    "verify missing folder": (None, ["verify", "missing"], "has no report.json"),
    "verify a file": (_write("f", "x"), ["verify", "f"], "has no report.json"),
    "verify /dev/null": (None, ["verify", "/dev/null"], "has no report.json"),
    "bench missing folder": (None, ["bench", "missing"], "has no report.json"),
    "inspect missing": (None, ["inspect", "missing.onnx"], "does not exist"),
    "inspect /dev/zero": (None, ["inspect", "/dev/zero"], "is not a regular file"),
    "inspect a fifo": (_fifo("p.onnx"), ["inspect", "p.onnx"], "is not a regular file"),
    "inspect garbage onnx": (_write("g.onnx", b"\x00garbage\xff"), ["inspect", "g.onnx"], "not a readable ONNX"),
    "inspect empty onnx": (_write("e.onnx", b""), ["inspect", "e.onnx"], "e.onnx"),
    "inspect empty folder": (_mkdir("d"), ["inspect", "d"], "holds no report.json"),
    "build missing onnx": (None, ["build", "missing.onnx", "-o", f"{OUT}/x.engine"], "does not exist"),
    "eval missing folder": (None, ["eval", "missing", "--images", "i"], "has no report.json"),
    "visualize missing image": (None, ["visualize", "missing.png", *TINY, "--prune", "cls-topk@1:0.5", "-o", "k.png"],
                                "does not exist"),
    "visualize output not png": (_write("i.png", _png_header(8, 8)), ["visualize", "i.png", *TINY, "--prune",
                                                                       "cls-topk@1:0.5", "-o", "k.jpg"],
                                 "writes a PNG"),
    "visualize dense recipe": (_write("i.png", _png_header(8, 8)), ["visualize", "i.png", *TINY, "--prune", "dense",
                                                                     "-o", "k.png"], "at least one stage"),
    "visualize png bomb": (_write("i.png", _png_header(100_000, 100_000)),
                           ["visualize", "i.png", *TINY, "--prune", "cls-topk@1:0.5", "-o", "k.png"],
                           "100000x100000 pixels"),
    "visualize not an image": (_write("i.png", "hello"), ["visualize", "i.png", *TINY, "--prune", "cls-topk@1:0.5",
                                                           "-o", "k.png"], "is not a readable image"),
    "visualize /dev/zero": (_link("i.png", "/dev/zero"), ["visualize", "i.png", *TINY, "--prune", "cls-topk@1:0.5",
                                                          "-o", "k.png"], "it is a device"),
    "visualize a folder": (_mkdir("i.png"), ["visualize", "i.png", *TINY, "--prune", "cls-topk@1:0.5", "-o", "k.png"],
                           "it is a folder"),
    "tune output folder not created": (None, ["tune", *TINY, "--prune", "cls-topk@9:0.5", "-o", "sub/t.toml"],
                                       "the model has blocks 0..3"),
    "tune output under a file": (_write("f", "x"), ["tune", *TINY, "--prune", "cls-topk@1:0.5", "-o", "f/t.toml"],
                                 "is a file, not a folder"),
    "tune images missing": (None, ["tune", *TINY, "--images", "nope", "--processor", "p"], "does not exist"),
    "tune images empty": (_mkdir("imgs"), ["tune", *TINY, "--images", "imgs", "--processor", "p"], "No images"),
    "tune images a file": (_write("imgs", "x"), ["tune", *TINY, "--images", "imgs", "--processor", "p"],
                           "does not exist"),
    "tune images json under a file": (_write("f", "x"), ["tune", *TINY, "--images", "i", "--processor", "p",
                                                          "--json", "f/front.json"], "is a file, not a folder"),
    "visualize output folder not created": (None, ["visualize", "missing.png", *TINY, "--prune", "cls-topk@1:0.5",
                                                   "-o", "sub/k.png"], "does not exist"),
    "visualize output under a file": (_write("f", "x"), ["visualize", "missing.png", *TINY, "--prune",
                                                         "cls-topk@1:0.5", "-o", "f/k.png"], "is a file, not a folder"),
    "export-vlm missing": (None, ["export-vlm", "missing", "-o", OUT], "not a Hugging Face model folder"),
    "export-vlm not a vlm": (_write("v/config.json", '{"model_type": "vit"}'), ["export-vlm", "v", "-o", OUT,
                                                                              "--no-build"], "not a supported VLM"),
    # cli_vlm.vlm_kind reads config.json through manifest.read_json_object (a list or deep nesting: one line)
    "export-vlm config list": pytest.param(_write("v/config.json", "[1]"), ["export-vlm", "v", "-o", OUT, "--no-build"],
                                           "config.json"),
    "export-vlm config deep": pytest.param(_write("v/config.json", "[" * 100_000), ["export-vlm", "v", "-o", OUT,
                                                                                    "--no-build"], "config.json"),
}


@pytest.mark.parametrize("setup, argv, match", PATHS.values(), ids=PATHS.keys())
def test_bad_path(here, capsys, setup, argv, match):
    if setup:
        setup(here)
    run_case(capsys, here, argv, match)


# ------------------------------------------------------------------------------------------ export-vlm (no weights)


QWEN = '{"model_type": "qwen2_vl"}'
LLAVA = '{"model_type": "llava"}'
VLM = {
    "grid nan": (QWEN, ["--grid", "nan"], "must be three integers"),
    "grid zero": (QWEN, ["--grid", "0,28,28"], "must be >= 1"),
    "grid two values": (QWEN, ["--grid", "1,28"], "must be three integers"),
    "grid missing": (QWEN, [], "needs the static image grid"),
    "grid for llava": (LLAVA, ["--grid", "1,28,28"], "--grid is for Qwen2-VL"),
    "prune nan": (QWEN, ["--grid", "1,28,28", "--prune", "attn-mean:nan"], "is not a number"),
    "prune param nan": (QWEN, ["--grid", "1,28,28", "--prune", "ttv(direction_weight=nan):0.5"], "finite number"),
    "steps 0": (QWEN, ["--grid", "1,28,28", "--steps", "0"], "--steps 0 must be >= 1"),
    "max-sequence 0": (QWEN, ["--grid", "1,28,28", "--max-sequence", "0"], "--max-sequence 0"),
    "inner bias without inner": (LLAVA, ["--inner-bias", "b.npy"], "--inner-bias"),
    "precision unknown": (LLAVA, ["--precision", "fp4"], "invalid choice"),
}


@pytest.mark.parametrize("config, args, match", VLM.values(), ids=VLM.keys())
def test_bad_export_vlm_arguments(here, capsys, config, args, match):
    (here / "v").mkdir()
    (here / "v" / "config.json").write_text(config)
    no_build = [] if "--max-sequence" in args or "--precision" in args else ["--no-build"]
    run_case(capsys, here, ["export-vlm", "v", "-o", OUT, *no_build, *args], match)


# ------------------------------------------------------------------------------------------ export folders


def _drop(key):
    def edit(r):
        del r[key]
        return r
    return edit


def _set(key, value):
    def edit(r):
        r[key] = value
        return r
    return edit


REPORTS = {
    "report truncated": (lambda r: json.dumps(r)[:100], "is not valid JSON"),
    "report a list": (lambda r: "[1, 2, 3]", "it holds a JSON list"),
    "report deep": (lambda r: "[" * 100_000, "nests too deeply"),
    "report invalid utf-8": (lambda r: json.dumps(r).encode().replace(b'"model"', b'"\xff"'),
                             "not valid JSON"),
    "report no schema": (_drop("schema"), "no schema version"),
    "report other schema": (_set("schema", "tokensieve.export/9" + "x" * 5000), "this tokensieve reads"),
    "report input_shape a string": (_set("input_shape", "1x3x32x32"), "input_shape holds"),
    "report input_shape zero": (_set("input_shape", [1, 3, 0, 32]), "input_shape holds"),
    "report stages dicts of junk": (_set("stages", [[1]]), "stages holds"),
    "report tokens a number": (_set("tokens_per_block", 5), "tokens_per_block holds"),
    "report verify a list": (_set("verify", [True]), "verify holds"),
    "report macs zero": (_set("macs_pruned", 0), "macs_pruned holds"),
    "report model a list": (_set("model", ["tiny"] * 10_000), "model holds"),
}
REPORT_COMMANDS = {"verify": ["verify", "exp"], "bench": ["bench", "exp", "--blocks", "1", "--iters", "1"],
                   "inspect": ["inspect", "exp"]}


@pytest.mark.parametrize("edit, match", REPORTS.values(), ids=REPORTS.keys())
@pytest.mark.parametrize("cmd", REPORT_COMMANDS)
def test_bad_report(here, capsys, export_dir, edit, match, cmd):
    _edit_report(here, export_dir, edit)
    run_case(capsys, here, REPORT_COMMANDS[cmd], match)


def test_report_is_a_fifo(here, capsys, export_dir):
    exp = _exp(here, export_dir)
    (exp / "report.json").unlink()
    os.mkfifo(exp / "report.json")
    run_case(capsys, here, ["verify", "exp"], "it is a FIFO")
    run_case(capsys, here, ["bench", "exp"], "it is a FIFO")


def test_report_is_huge(here, capsys, export_dir):
    exp = _exp(here, export_dir)
    with open(exp / "report.json", "ab") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB without writing them
    run_case(capsys, here, ["inspect", "exp"], "more than the 16 MiB")


MISSING = {
    "verify without debug onnx": ("model.debug.onnx", ["verify", "exp"], "model.debug.onnx"),
    "bench without dense onnx": ("dense.onnx", ["bench", "exp"], "dense.onnx' does not exist"),
    "bench without model onnx": ("model.onnx", ["bench", "exp"], "model.onnx' does not exist"),
    "bench tensorrt without engine": (None, ["bench", "exp", "--backend", "tensorrt"],
                                      "holds no engine built from model.onnx"),
    "verify batch beyond memory": (None, ["bench", "exp", "--batch", "1000000000"], "of memory"),
    "bench sweep stage missing": (None, ["bench", "exp", "--sweep", "0.5,0.7", "--sweep-stage", "5"],
                                  "--sweep-stage 5 does not exist"),
    "eval images missing": (None, ["eval", "exp", "--images", "nope"], "nope"),
}


@pytest.mark.parametrize("remove, argv, match", MISSING.values(), ids=MISSING.keys())
def test_export_folder_missing_parts(here, capsys, export_dir, remove, argv, match):
    exp = _exp(here, export_dir)
    if remove:
        (exp / remove).unlink()
    run_case(capsys, here, argv, match)


EVAL_FILES = {  # what the hostile entry is, where it goes, and the message's key words
    "eval image a fifo": ("FIFO", "i/a.png", "it is a FIFO"),
    "eval image /dev/zero": ("ZERO", "i/a.png", "it is a device"),
    "eval image huge": ("HUGE", "i/a.png", "more than the 256 MiB"),
    "eval image png bomb": ("BOMB", "i/a.png", "more than 50,000,000"),
    "eval processor config a fifo": ("FIFO", "proc/preprocessor_config.json", "it is a FIFO"),
    "eval processor config /dev/zero": ("ZERO", "proc/preprocessor_config.json", "it is a device"),
    "eval processor model config a fifo": ("FIFO", "proc/config.json", "it is a FIFO"),
    "eval model config a fifo": ("FIFO", "m/config.json", "it is a FIFO"),
    "eval model config /dev/zero": ("ZERO", "m/config.json", "it is a device"),
}


@pytest.mark.parametrize("kind, where, match", EVAL_FILES.values(), ids=EVAL_FILES.keys())
def test_eval_reads_regular_files_only(here, capsys, export_dir, kind, where, match):
    """`eval`: an image, the image processor's configs and the model's config.json (id2label) are read bounded, as
    regular files only: a FIFO or /dev/zero is one line (no hang), a huge file or a bomb's header is refused unread."""
    from tokensieve import toy

    _edit_report(here, export_dir, _set("model", "m"))
    (here / "m").mkdir()
    toy.image_processor().save_pretrained(here / "proc")
    (here / "i").mkdir()
    (here / "i" / "b.png").write_bytes(toy.png_bytes(toy.make_images(1, 0)[0][0]))
    target = here / where
    target.unlink(missing_ok=True)
    if kind == "FIFO":
        os.mkfifo(target)
    elif kind == "ZERO":
        target.symlink_to("/dev/zero")
    elif kind == "HUGE":
        with open(target, "wb") as f:
            f.truncate(257 << 20)  # sparse
    else:
        target.write_bytes(_png_header(100_000, 100_000))
    run_case(capsys, here, ["eval", "exp", "--images", "i", "--processor", "proc"], match)


# ------------------------------------------------------------------------------------------ engines


ENGINES = {
    "no metadata": (None, "No engine metadata"),
    "metadata truncated": ('{"schema": ', "is unreadable (JSONDecodeError"),
    "metadata a list": ("[1]", "is not tokensieve engine metadata"),
    "metadata deep": ("[" * 100_000, "nests too deeply"),
    "metadata not utf-8": (b'{"schema": "\xff"}', "UnicodeDecodeError"),
    "metadata other schema": ('{"schema": "tokensieve.tensorrt-engine/99", "flavor": "x", "tensorrt_version": "1"}',
                              "schema version 99"),
    "metadata a folder": ("DIR", "it is a folder"),
    "metadata /dev/urandom": ("URANDOM", "it is a device"),
    "metadata a fifo": ("FIFO", "it is a FIFO"),
}


@pytest.mark.parametrize("meta, match", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("engine", [b"", b"garbage" * 10], ids=["empty engine", "garbage engine"])
def test_bad_engine(here, capsys, meta, match, engine):
    (here / "m.engine").write_bytes(engine)
    meta_path = here / "m.engine.json"
    if meta == "DIR":
        meta_path.mkdir()
    elif meta == "URANDOM":
        os.symlink("/dev/urandom", meta_path)
    elif meta == "FIFO":
        os.mkfifo(meta_path)
    elif meta is not None:
        meta_path.write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    run_case(capsys, here, ["inspect", "m.engine"], match)


def test_engine_not_matching_its_metadata(here, capsys):
    """A truncated engine: the size in its (valid) metadata differs."""
    from tokensieve.runtime.engine_metadata import FIELDS, SCHEMA

    meta = {k: None for k in FIELDS} | {"schema": SCHEMA, "flavor": "tensorrt_rtx", "tensorrt_version": "1",
                                        "engine_size_bytes": 1000, "target": "rtx-sm86"}
    (here / "m.engine").write_bytes(b"x" * 10)
    (here / "m.engine.json").write_text(json.dumps(meta))
    run_case(capsys, here, ["inspect", "m.engine"], "is 10 bytes but its metadata records 1000")


# ------------------------------------------------------------------------------------------ VLM manifests


def _manifest(**kw) -> dict:
    m = {"version": 1, "model_type": "qwen2_vl", "modality": "image", "grid_thw": [1, 4, 4], "prune": "attn-mean:2",
         "method": "attn-mean", "options": {}, "keep": 2, "image_tokens": 4, "num_image_tokens": 2,
         "placeholder_token_id": 5, "num_text_layers": 2, "layout": {}, "files": {"vision": "vision_prune.onnx"},
         "sizes": {}, "seconds": {}, "vision_ops": {}, "prefill_ops": {}}
    return m | kw


MANIFESTS = {
    "manifest truncated": ('{"version": 1', "is not valid JSON"),
    "manifest a list": ("[]", "it holds a JSON list"),
    "manifest deep": ("[" * 100_000, "nests too deeply"),
    "manifest no version": (json.dumps({k: v for k, v in _manifest().items() if k != "version"}), "has no version"),
    "manifest grid a number": (json.dumps(_manifest(grid_thw=7)), "grid_thw holds 7"),
    "manifest files a list": (json.dumps(_manifest(files=["a"] * 1000)), "files holds"),
    "manifest engines junk": (json.dumps(_manifest(engines={"vision": 1})), "engines holds"),
    "manifest unknown field": (json.dumps(_manifest(colour="red")), "unknown field(s)"),
    "manifest modality": (json.dumps(_manifest(modality="smell")), "modality holds"),
}


@pytest.mark.parametrize("text, match", MANIFESTS.values(), ids=MANIFESTS.keys())
def test_bad_vlm_manifest(here, capsys, text, match):
    (here / "v").mkdir()
    (here / "v" / "manifest.json").write_text(text)
    run_case(capsys, here, ["inspect", "v"], match)


# ------------------------------------------------------------------------------------------ real processes


def _cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensieve.cli", *map(str, args)], capture_output=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120, **kw)


def test_ascii_stdout_gets_replacement_not_a_traceback(export_dir):
    """LANG=C / an ASCII stdout: the '→' of the tokens line comes out as '?' (exit 0), not UnicodeEncodeError."""
    proc = _cli("inspect", export_dir, env={"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr and b"tokens" in proc.stdout and b"?" in proc.stdout


def test_closed_pipe_exits_quietly():
    """`tokensieve methods | head -1`: the reader leaves; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m tokensieve.cli methods | head -c 1 >/dev/null; "
                          "echo \"status=${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash",
                          capture_output=True, timeout=120)
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr
    assert b"status=141" in proc.stderr or b"status=0" in proc.stderr, proc.stderr


def test_full_disk_stdout_is_one_line(export_dir):
    """`tokensieve inspect OUT > /dev/full` (and `methods`, a table): one line naming standard output, exit 2, no
    traceback, and no "Exception ignored" from the interpreter's final flush."""
    proc = subprocess.run(f"{sys.executable} -m tokensieve.cli inspect {export_dir} >/dev/full; echo \"a=$?\" >&2; "
                          f"{sys.executable} -m tokensieve.cli methods >/dev/full; echo \"b=$?\" >&2", shell=True,
                          executable="/bin/bash", capture_output=True, timeout=120)
    lines = proc.stderr.decode().splitlines()
    assert lines[1::2] == ["a=2", "b=2"], lines
    for cmd, line in zip(("inspect", "methods"), lines[0::2]):
        assert line == f"tokensieve {cmd}: error: Cannot write '<standard output>': the disk is full; free space on " \
                       "it or write elsewhere", lines


def test_stdin_is_never_read(here):
    """A user error with stdin an open pipe that never closes: the command does not wait for input."""
    proc = subprocess.Popen([sys.executable, "-m", "tokensieve.cli", "inspect", "missing.onnx"], cwd=here,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rc = proc.wait(timeout=60)  # stdin stays open (communicate() would close it); the output is a few lines
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.stdin.close()
    assert rc == 2 and b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1].startswith("tokensieve inspect: error: ")
