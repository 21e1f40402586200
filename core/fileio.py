"""Atomic artifact writes: write to a temp file in the same folder, then rename over the target."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed; raise a one-line ConfigError if it cannot be written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create output folder {str(p)!r}: {e.strerror}; pass a writable -o/--output") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"Output folder {str(p)!r} is not writable; pass a writable -o/--output")
    return p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success rename it onto `target`, on error delete it."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "tokensieve export") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (flock on the folder itself: no lock file to leave behind) while one command
    writes into it; a second writer fails at once with one line instead of mixing its files with the first's. The
    kernel drops the lock when the process ends, however it ends (SIGKILL too)."""
    import fcntl

    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"Another {what} is writing into {str(folder)!r}; wait for it to finish or pass another "
                              "-o/--output") from None
        yield folder
    finally:
        os.close(fd)
