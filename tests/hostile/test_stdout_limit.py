"""Standard output redirected into a file under the file-size limit (`ulimit -f`, RLIMIT_FSIZE): a command that prints
more than the limit exits 2 with one line naming the limit, no traceback, and the file holds only a prefix of what it
printed (never a silently truncated output with exit 0). Python ignores SIGXFSZ, so the write past the limit fails
with EFBIG (a C program would be killed). The cases that went wrong: `--help`, which argparse writes in one call and
whose failed write it drops (exit 0), and PYTHONUNBUFFERED=1 (python -u), whose text layer drops the part a short
write left. Run as a user would: bash sets the limit, then execs the command with stdout redirected."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tokensieve.cli import main

LIMIT_KIB = 2  # bash's ulimit -f counts 1024-byte blocks


def _full_output(capsys, argv: list[str]) -> bytes:
    try:
        main(argv)
    except SystemExit:  # not reached: main returns --help's exit status
        pass
    return capsys.readouterr().out.encode()


CASES = {  # argv, PYTHONUNBUFFERED
    "methods -u": (["methods"], "1"),
    "export --help -u": (["export", "--help"], "1"),
    "export --help buffered": (["export", "--help"], None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All cases at once (each a fresh Python that imports tokensieve: ~2 s): {case: (exit code, stderr, file)}."""
    tmp = tmp_path_factory.mktemp("fsize")
    procs = {}
    for case, (argv, unbuffered) in CASES.items():
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"HF_HUB_OFFLINE": "1"}
        if unbuffered:
            env["PYTHONUNBUFFERED"] = unbuffered
        out = tmp / f"{case.replace(' ', '_')}.txt"
        script = f'ulimit -f {LIMIT_KIB} && exec "$0" -m tokensieve.cli "$@" > "{out}"'
        procs[case] = (subprocess.Popen(["bash", "-c", script, sys.executable, *argv], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env), out)
    results = {}
    for case, (proc, out) in procs.items():
        _, err = proc.communicate(timeout=120)
        results[case] = (proc.returncode, err.decode(errors="replace"), out.read_bytes())
    return results


@pytest.mark.parametrize("case", CASES)
def test_output_past_the_file_size_limit_is_one_line(runs, case, capsys):
    argv = CASES[case][0]
    full = _full_output(capsys, argv)
    assert len(full) > LIMIT_KIB * 1024 * 1.5, len(full)  # the case prints well past the limit
    code, err, written = runs[case]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    lines = err.strip().splitlines()
    prog = "tokensieve" if "--help" in argv else f"tokensieve {argv[0]}"
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: Cannot write '<standard output>': "), lines
    assert "file-size limit (ulimit -f)" in lines[0] and len(lines[0]) <= 200, lines[0]
    assert len(written) == LIMIT_KIB * 1024 and full.startswith(written)  # what fitted, then the error
