"""The package's exceptions, and how an out-of-memory error is recognised without importing torch."""

from __future__ import annotations

import re
import sys


class AutobatchError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(AutobatchError, ValueError):
    """Bad input from the user: the message names the thing and the fix."""


class OutOfMemory(AutobatchError):
    """A batch did not fit: on a device, a simulated device, or under a CPU memory budget.

    ``limit`` says which limit was hit ("device", "budget", "simulated") so reports can label it.
    """

    def __init__(self, message: str, *, batch: int | None = None, needed_bytes: int | None = None,
                 available_bytes: int | None = None, limit: str = "device") -> None:
        super().__init__(message)
        self.batch = batch
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.limit = limit


class NoBatchFits(AutobatchError):
    """Batch 1 does not fit: the search has nothing to return."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (escape sequences too) shown as ``\\xNN``: safe for a terminal."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class BaselineError(AutobatchError):
    """A stored baseline cannot be read or written; the file is left as it was.

    The message is made printable: a hostile file can never write escape sequences to the terminal.
    """

    def __init__(self, message: str) -> None:
        super().__init__(printable(str(message)))


class MissingDependency(AutobatchError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs {package!r}, which is not installed. "
                         f"Install it with: pip install 'pytest-autobatch[{extra}]'")
        self.package = package
        self.extra = extra


_OOM_MESSAGES = (
    "out of memory",                       # CUDA caching allocator, HIP, MPS
    "cudnn_status_not_supported",          # cuDNN refusing huge batches
    "can't allocate memory",               # DefaultCPUAllocator
    "cublas_status_alloc_failed",          # cuBLAS workspace allocation
)


def is_oom_error(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError, allocator RuntimeErrors and our own OutOfMemory.

    Torch is looked up in sys.modules instead of imported: if torch was never imported,
    no torch error can have been raised.
    """
    if isinstance(exc, OutOfMemory):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MESSAGES)
    return False


class OomCatcher:
    """``with catch_oom() as caught:`` keeps an out-of-memory error in ``caught.error`` and lets
    every other exception through: a model bug is never taken for an OOM."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __enter__(self) -> "OomCatcher":
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if isinstance(error, Exception) and is_oom_error(error):
            self.error = error
            return True
        return False


def catch_oom() -> OomCatcher:
    return OomCatcher()
