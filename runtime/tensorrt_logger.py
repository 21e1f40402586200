"""A TensorRT logger that stays quiet and keeps warnings and errors, so a failure can quote them in one line.

Shared by the builder (targets/) and TrtRunner; moved here from targets/tensorrt/trt_logger.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from types import ModuleType
from typing import Iterator

# Logged on every build without a GPU (TensorRT-RTX probes CUDA); never the reason a build failed.
_NOISE = ("CUDA driver version is insufficient", "cudaError 35")


@functools.cache
def collecting_logger(trt: ModuleType):
    """One logger per flavor module: standard TensorRT keeps using the first logger a process hands it,
    so a fresh logger per build would miss the messages of every build after the first."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []
            self.echo = bool(os.environ.get("TOKENSIEVE_TRT_VERBOSE"))

        def log(self, severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity.name, msg))
            if self.echo:
                print(f"[TRT] [{severity.name}] {msg}", file=sys.stderr)

        @contextlib.contextmanager
        def capture(self) -> Iterator["CollectingLogger"]:
            self.messages.clear()
            yield self

        def errors(self) -> list[str]:
            """Error messages of the current capture, minus the no-GPU noise."""
            errs = [m for sev, m in self.messages if "ERROR" in sev and not any(n in m for n in _NOISE)]
            return list(dict.fromkeys(errs))

        def summary(self, limit: int = 400) -> str:
            """The captured errors as one line (for an exception message)."""
            text = " | ".join(" ".join(m.split()) for m in self.errors()) or "no error was logged"
            return text if len(text) <= limit else text[: limit - 3] + "..."

    return CollectingLogger()
