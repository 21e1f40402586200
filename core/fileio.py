"""Atomic artifact writes: write to a temp file in the same folder, then rename over the target.

Faults become one line: an OSError while writing (disk full, file-size limit, a folder where the file should go, a
file where a folder should be, no permission) is raised as a ConfigError naming the file, the reason and the fix,
and the temp file is removed. A process killed mid-write (SIGKILL) leaves its temp file behind: each temp file is
flock-ed by its writer while it exists, so the next writer of the same target removes the temp files nobody holds.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError

TEMP_SUFFIX = ".tmp"   # a temp file of target T is `.T.<8 random characters>.tmp` next to T (tempfile.mkstemp)

# errno -> (why, how to fix) for a file that cannot be written
_WRITE_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space on it or write elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space in your quota or write elsewhere"),
    errno.EFBIG: ("it would exceed the file-size limit (ulimit -f)", "raise the limit (ulimit -f unlimited) or write "
                  "elsewhere"),
    errno.EISDIR: ("that path is a folder", "pass a file path, or remove the folder"),
    errno.ENOTDIR: ("a part of its folder path is a file, not a folder", "pass a path inside a folder"),
    errno.ENOENT: ("its folder does not exist", "create the folder or pass another path"),
    errno.EACCES: ("permission denied", "pass a path you can write to"),
    errno.EPERM: ("the operation is not permitted", "pass a path you can write to"),
    errno.EROFS: ("the file system is read-only", "pass a path on a writable disk"),
    errno.ENAMETOOLONG: ("the name is too long", "pass a shorter path"),
    errno.EIO: ("an I/O error occurred", "check the disk"),
}


def write_error(e: OSError, target: str | os.PathLike, what: str = "write") -> ConfigError:
    """A one-line ConfigError for an OSError raised while writing `target`: what, where, why, and how to fix it."""
    why, fix = _WRITE_FAULTS.get(e.errno, (e.strerror or type(e).__name__, "check the path and the disk"))
    return ConfigError(f"Cannot {what} {str(target)!r}: {why}; {fix}")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed; raise a one-line ConfigError if it cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"Output folder {str(p)!r} is a file, not a folder; pass another -o/--output")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = ("a part of its path is a file, not a folder" if e.errno in (errno.EEXIST, errno.ENOTDIR)
               else _WRITE_FAULTS.get(e.errno, (e.strerror,))[0])
        raise ConfigError(f"Cannot create output folder {str(p)!r}: {why}; pass a writable -o/--output") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"Output folder {str(p)!r} is not writable; pass a writable -o/--output")
    return p


def _locked_temp(target: Path) -> tuple[int, Path]:
    """A new temp file next to `target`, flock-ed through the returned descriptor (so remove_stale_temps leaves it
    alone while this process lives). If a cleaner removed it between its creation and the lock, make another."""
    import fcntl

    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)   # blocks only while a cleaner holds it for its check
            if os.fstat(fd).st_ino == os.stat(tmp).st_ino:
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        except OSError:   # a file system without flock: unlocked, never removed by remove_stale_temps
            return fd, Path(tmp)
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temp files of the targets `names` in `folder` that no live writer holds (a killed run's); returns
    them. Best effort: a file that cannot be checked or removed stays."""
    paths = [p for name in names  # mkstemp: 8 random characters
             for p in Path(folder).glob(f".{_glob_escape(name)}.{'?' * 8}{TEMP_SUFFIX}")]
    return _remove_unheld(paths, os.O_RDONLY | os.O_NOFOLLOW, Path.unlink)


def _remove_unheld(paths, open_flags: int, remove) -> list[Path]:
    """`remove(p)` for each of `paths` no live process holds flock-ed (opened with `open_flags`, checked to be the
    same inode after the lock); returns those removed. One that cannot be checked or removed stays."""
    import fcntl

    removed = []
    for p in paths:
        try:
            fd = os.open(p, open_flags)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.lstat(p).st_ino:
                remove(p)
                removed.append(p)
        except OSError:   # held by a live process (BlockingIOError), gone, or not removable: leave it
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def locked_temp_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new folder `<parent>/<prefix><8 random characters>` for scratch files, flock-ed while the block runs and
    removed after it. A process killed meanwhile leaves it unlocked (the kernel drops the lock), so
    remove_stale_temp_dirs(parent, prefix), which the next run calls, deletes it; a live run's is left alone."""
    import fcntl
    import shutil

    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)   # blocks only while a cleaner holds it for its check
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        except OSError:   # a file system without flock: unlocked, so a cleaner may remove it; use it all the same
            break
        os.close(fd)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_stale_temp_dirs(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Delete the folders `<parent>/<prefix>*` of locked_temp_dir that no live process holds (a killed run's);
    returns them. Best effort: one that cannot be checked or removed stays."""
    import shutil

    paths = Path(parent).glob(f"{_glob_escape(prefix)}{'?' * 8}")   # mkdtemp: 8 random characters
    return _remove_unheld(paths, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, shutil.rmtree)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temp paths next to `targets`; on success rename them onto the targets, on error delete them.

    With several targets the LAST is the commit marker (the file readers trust, e.g. an engine's .json): the old
    marker is removed first and the new one renamed in last, so a process killed in between leaves the set without
    its marker, never an old marker beside new files. Ctrl-C during the renames is held until they are done. An
    OSError (disk full, file-size limit, a folder in the way) becomes a one-line ConfigError."""
    paths = [Path(t) for t in targets]
    for t in paths:
        if t.is_dir():
            raise ConfigError(f"Cannot write {str(t)!r}: that path is a folder; pass a file path, or remove the folder")
        remove_stale_temps(t.parent, [t.name])
    held: list[tuple[int, Path]] = []
    current = paths[0]
    try:
        try:
            for t in paths:
                current = t
                held.append(_locked_temp(t))
            yield [tmp for _, tmp in held]
            check_interrupted()   # a Ctrl-C that Python swallowed stops here, before anything is replaced
            mode = 0o666 & ~_umask()   # mkstemp makes 0600; artifacts get the usual permissions
            for _, tmp in held:
                os.chmod(tmp, mode)
            with deferred_interrupts():
                if len(paths) > 1:
                    current = paths[-1]
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(paths[-1])
                for t, (_, tmp) in zip(paths, held):
                    current = t
                    os.replace(tmp, t)
        except OSError as e:
            raise write_error(e, current) from e
    except BaseException:
        for _, tmp in held:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        for fd, _ in held:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success rename it onto `target`, on error delete it (atomic_paths)."""
    with atomic_paths(target) as (tmp,):
        yield tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(target)


_interrupted = threading.Event()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While the block runs, Ctrl-C (SIGINT) is also recorded, so that check_interrupted() raises KeyboardInterrupt
    even where Python swallowed the first one: raised inside a finalizer (`__del__` run by the garbage collector),
    it is printed as "Exception ignored in ..." and the work would go on. Only in the main thread, and only while
    Python's default handler is installed (a caller's own handler is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    import sys

    _interrupted.clear()

    def handler(signum, frame):
        _interrupted.set()
        raise KeyboardInterrupt

    def unraisable(u, hook=sys.unraisablehook):   # the swallowed one: no "Exception ignored" traceback either
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = unraisable.__defaults__[0]


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came during interruptible() (the steps of a long job and the commit points
    of atomic_paths call it)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM while the block runs, e.g. a few renames that must not stop halfway; a signal
    that came meanwhile takes effect when it ends (the handler in place before is called / SIGTERM is sent again).
    Python runs signal handlers in the main thread only, so a recording handler defers them whichever thread the
    kernel picked. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(got):
            handler = old[sig]
            if callable(handler):
                handler(sig, None)       # Python's Ctrl-C handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "tokensieve export") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (flock on the folder itself: no lock file to leave behind) while one command
    writes into it; a second writer fails at once with one line instead of mixing its files with the first's. `what`
    says who may hold the lock, not who asks for it: the default ("Another tokensieve export is writing into ...") is
    neutral between `tokensieve export` and `export-vlm`, which take the same lock and may meet in one folder. The
    kernel drops the lock when the process ends, however it ends (SIGKILL too). If the folder was removed or replaced
    before the lock was taken (a failed first run removes the folder it created), it is made again and locked."""
    import fcntl

    folder = Path(folder)
    for _ in range(10):
        ensure_writable_dir(folder)
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise write_error(e, folder, "lock the output folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"Another {what} is writing into {str(folder)!r}; wait for it or pass another -o") from None
        try:
            same = os.stat(folder).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:   # locked a folder that is no longer at this path
            os.close(fd)
            continue
        try:
            yield folder
        finally:
            os.close(fd)
        return
    raise ConfigError(f"Output folder {str(folder)!r} keeps disappearing; pass another -o/--output")
