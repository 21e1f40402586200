"""A fork server for the hostile tests: run many `tokensieve` commands cheaply, and kill them.

A Python process that imports torch takes seconds here, so the server imports tokensieve and its heavy libraries
(torch, onnx, the torch.onnx exporter, ONNX Runtime, TensorRT-RTX) once and forks one child per command. It is a
separate process, not the test process: pytest may have run torch ops (and started OpenMP threads) before, and a fork
of a process with such threads may hang. The server runs no torch op; each child sets torch to one thread and runs
`tokensieve.cli.main(argv)`, its stdin on /dev/null and stdout + stderr in a log file, then `os._exit(code)`.

Protocol: one JSON object per line on the server's stdin, one reply per line on its stdout.
    {"op": "spawn", "argv": [...], "log": PATH, ...options}  -> {"pid": PID}
    {"op": "wait", "pid": PID}                                 -> {"code": EXIT CODE, or -SIGNAL if killed}
Spawn options (all optional):
    "fsize": N        RLIMIT_FSIZE of the child (a write past N bytes fails with EFBIG: Python ignores SIGXFSZ)
    "stamp": true     progress lines go to the log as "@<CLOCK_MONOTONIC seconds> <line>"
    "hook": {"folder": DIR, "at": K, "signal": SIG, "count_file": PATH}
                      the child sends itself SIG just before its K-th os.replace/os.unlink of a visible file (name not
                      starting with ".") directly in DIR (K = 0: never; the number of such calls goes to count_file)
    "tmpfs": {"path": DIR, "size": "1m"}
                      the child first mounts a tmpfs of that size on DIR in its own mount (and user) namespace
    "more": [ARGV, ...], "fill": N, "listing": {"dir": DIR, "to": PATH}
                      after argv, run each of `more` in the same child (the tmpfs stays), first writing a file of N
                      bytes (or as many as fit) into listing's dir when "fill" is given; after each run append
                      {"code", "files": {relative path: sha256}} (hidden files included) of that dir to listing's
                      "to" file (JSON lines): what a tmpfs held, seen from outside its namespace
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
READY = "forkserver ready"


# ------------------------------------------------------------------------------------------------ client


class ForkServer:
    """The test side: start the server (a few seconds, once), spawn children, signal them, wait for them."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([PYTHON, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1, env=env)
        line = self.proc.stdout.readline().strip()
        if line != READY:
            self.close()
            raise RuntimeError(f"fork server did not start: {line!r}")

    def _call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def spawn(self, argv: list[str], log: str | os.PathLike, **options) -> int:
        if "more" in options:
            options["more"] = [[str(a) for a in more] for more in options["more"]]
        return self._call({"op": "spawn", "argv": [str(a) for a in argv], "log": str(log), **options})["pid"]

    def wait(self, pid: int) -> int:
        return self._call({"op": "wait", "pid": pid})["code"]

    def run(self, argv, log, **options) -> int:
        return self.wait(self.spawn(argv, log, **options))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stamps(log: str | os.PathLike) -> dict[str, float]:
    """The CLOCK_MONOTONIC time of each stamped progress line of a log, by its first word ("[2/5]", ...)."""
    out = {}
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("@"):
            t, _, msg = line[1:].partition(" ")
            out.setdefault(msg.split(" ", 1)[0], float(t))
    return out


# ------------------------------------------------------------------------------------------------ server


def _preimport():
    import torch

    torch.set_num_threads(1)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401 - the ONNX exporter (onnxscript), seconds to import
    from transformers.models.vit import modeling_vit  # noqa: F401

    import tokensieve.api  # noqa: F401
    import tokensieve.cli  # noqa: F401
    import tokensieve.models  # noqa: F401
    import tokensieve.runtime.onnxruntime_runner  # noqa: F401
    import tokensieve.targets.tensorrt.builder  # noqa: F401

    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        pass


def _mount_tmpfs(path: str, size: str) -> None:
    """Mount a tmpfs on `path`, visible to this process only (a new mount namespace; a new user namespace too
    unless root). Raises OSError if the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, CLONE_NEWUSER, MS_REC, MS_PRIVATE = 0x00020000, 0x10000000, 0x4000, 1 << 18
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER

    def check(rc):
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    check(libc.unshare(flags))
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))  # our mounts stay ours
    check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, f"size={size}".encode()))


def _install_hook(folder: str, at: int, sig: int, count_file: str | None):
    folder = os.path.abspath(folder)
    count = [0]
    real_replace, real_unlink = os.replace, os.unlink

    def hit(path):
        p = os.path.abspath(os.fspath(path))
        if os.path.dirname(p) == folder and not os.path.basename(p).startswith("."):
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), sig)

    def replace(src, dst, **kw):
        hit(dst)
        return real_replace(src, dst, **kw)

    def unlink(path, **kw):
        hit(path)
        return real_unlink(path, **kw)

    os.replace, os.unlink = replace, unlink
    return lambda: count_file and Path(count_file).write_text(str(count[0]))


def _child(msg: dict) -> int:
    import resource

    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C as in a fresh `tokensieve` process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if msg.get("tmpfs"):
        try:
            _mount_tmpfs(msg["tmpfs"]["path"], msg["tmpfs"]["size"])
        except OSError as e:
            print(f"forkserver: cannot mount a tmpfs: {e}", file=sys.stderr, flush=True)
            return 97
    if msg.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (msg["fsize"], msg["fsize"]))
    import tokensieve.cli as cli

    if msg.get("stamp"):
        plain = cli._log
        cli._log = lambda line: plain(f"@{time.monotonic():.4f} {line}")
    done = lambda: None  # noqa: E731
    if msg.get("hook"):
        h = msg["hook"]
        done = _install_hook(h["folder"], int(h["at"]), int(h["signal"]), h.get("count_file"))
    code = cli.main(list(msg["argv"]))
    _listing(msg, code)
    for i, argv in enumerate(msg.get("more", ())):
        if i == 0 and msg.get("fill"):
            _fill(Path(msg["listing"]["dir"]) / "filler", int(msg["fill"]))
        code = cli.main(list(argv))
        _listing(msg, code)
    sys.stdout.flush()
    sys.stderr.flush()
    done()
    return code


def _fill(path: Path, size: int) -> None:
    """Write up to `size` bytes to `path`, stopping quietly when the disk is full."""
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while size > 0:
                size -= f.write(chunk[: min(size, len(chunk))])
        except OSError:
            pass


def _listing(msg: dict, code: int) -> None:
    import hashlib

    if not msg.get("listing"):
        return
    root = Path(msg["listing"]["dir"])
    files = {}
    for p in sorted(root.rglob("*")) if root.is_dir() else ():
        if p.is_file() and p.name != "filler":
            files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            files[str(p.relative_to(root)) + "/"] = "dir"
    with open(msg["listing"]["to"], "a") as f:
        f.write(json.dumps({"code": code, "exists": root.is_dir(), "files": files}) + "\n")


def serve():
    _preimport()
    out = sys.stdout
    print(READY, file=out, flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "spawn":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(msg)
                except SystemExit as e:  # argparse usage errors
                    code = e.code if isinstance(e.code, int) else 2
                except BaseException:  # a traceback the test will see in the log
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    with_flush = (sys.stdout, sys.stderr)
                    for s in with_flush:
                        try:
                            s.flush()
                        except Exception:  # noqa: BLE001
                            pass
                    os._exit(code)
            reply = {"pid": pid}
        elif msg["op"] == "wait":
            _, status = os.waitpid(msg["pid"], 0)
            reply = {"code": os.waitstatus_to_exitcode(status)}
        else:
            reply = {"error": f"unknown op {msg['op']!r}"}
        print(json.dumps(reply), file=out, flush=True)


if __name__ == "__main__":
    serve()
