"""Baselines on disk: one reviewable JSON file per hardware and test module.

``<root>/<hardware_key>/<module>.json`` (see DESIGN.md). Every write takes a file lock, re-reads
the file, merges its own entries into what is there and replaces the file atomically, so parallel
pytest-xdist workers and interrupted runs never lose or half-write an entry. A file that cannot be
read raises BaselineError naming the file and the fix, and is never written over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import BaselineError, ConfigError

SCHEMA = 1

#: Seconds to wait for another process's lock before giving up with a clear error.
LOCK_TIMEOUT_S = 120.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def module_key(nodeid: str) -> str:
    """File stem for a test's module: ``tests/test_models.py::t[1]`` -> ``tests__test_models``."""
    path = nodeid.split("::", 1)[0].replace("\\", "/")
    if path.endswith(".py"):
        path = path[:-3]
    return _UNSAFE.sub("_", path.replace("/", "__")) or "_"


def entry_key(nodeid: str, name: str) -> str:
    if not name or "::" in name:
        raise ConfigError(f"benchmark name {name!r} must be non-empty and must not contain '::'; "
                          "pass name='...' with a plain model name")
    return f"{nodeid}::{name}"


def split_entry_key(key: str) -> tuple[str, str]:
    """(test node id, model name) of an entry key."""
    nodeid, _, name = key.rpartition("::")
    return nodeid, name


def dumps(document: dict[str, Any]) -> str:
    """The one on-disk format: sorted keys, two-space indent, trailing newline (diffs read well)."""
    return json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _lock_path(target: Path, purpose: str) -> Path:
    """Lock files live in the temp dir, not beside the baselines, so they never reach a commit."""
    digest = hashlib.sha256(f"{purpose}\0{target.resolve()}".encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "pytest-autobatch-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.lock"


class _Lock:
    """A file lock whose timeout becomes a BaselineError that says what to do."""

    def __init__(self, lock_path: Path, what: str, timeout: float):
        from filelock import FileLock  # a few ms: only paid when baselines are used
        self._lock = FileLock(str(lock_path), timeout=timeout)
        self._what = what
        self._timeout = timeout

    def __enter__(self) -> "_Lock":
        from filelock import Timeout
        try:
            self._lock.acquire()
        except Timeout:
            raise BaselineError(
                f"could not lock {self._what} within {self._timeout:.0f} s: another pytest process "
                f"holds it. If none is running, delete {self._lock.lock_file} and run again."
            ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


class BaselineStore:
    """The baselines of one hardware key under ``root``."""

    def __init__(self, root: str | os.PathLike[str], hardware_key: str,
                 hardware: dict[str, Any] | None = None, *, lock_timeout: float = LOCK_TIMEOUT_S):
        if not hardware_key or _UNSAFE.search(hardware_key):
            raise ConfigError(f"hardware key {hardware_key!r} must be non-empty and use only "
                              "letters, digits, '_', '.' and '-'")
        self.root = Path(root)
        self.hardware_key = hardware_key
        self.hardware = dict(hardware or {})
        self.lock_timeout = lock_timeout

    @property
    def folder(self) -> Path:
        return self.root / self.hardware_key

    def path(self, module: str) -> Path:
        return self.folder / f"{module}.json"

    def path_for_key(self, key: str) -> Path:
        return self.path(module_key(split_entry_key(key)[0]))

    def modules(self) -> list[str]:
        """Modules that have a baseline file for this hardware."""
        if not self.folder.is_dir():
            return []
        return sorted(path.stem for path in self.folder.glob("*.json"))

    def read(self, module: str) -> dict[str, Any]:
        """The document of ``module`` (empty when there is no file); BaselineError when unreadable."""
        path = self.path(module)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"schema": SCHEMA, "hardware_key": self.hardware_key,
                    "hardware": self.hardware, "entries": {}}
        except OSError as exc:
            raise BaselineError(f"cannot read baseline file {path}: {exc}") from exc
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise BaselineError(self._corrupt(path, f"it is not valid JSON ({exc})")) from None
        self._validate(path, document)
        return document

    def _corrupt(self, path: Path, problem: str) -> str:
        return (f"baseline file {path} cannot be used: {problem}. It was left untouched. Fix it by "
                f"hand (e.g. resolve merge-conflict markers), restore it from version control "
                f"(git checkout -- {path}), or delete it and re-record with "
                f"pytest --autobatch --autobatch-update.")

    def _validate(self, path: Path, document: Any) -> None:
        if not isinstance(document, dict) or not isinstance(document.get("entries"), dict):
            raise BaselineError(self._corrupt(path, "it has no 'entries' object"))
        schema = document.get("schema")
        if schema != SCHEMA:
            raise BaselineError(self._corrupt(
                path, f"its schema is {schema!r}, this pytest-autobatch reads schema {SCHEMA} "
                      "(was it written by another version?)"))
        for key, entry in document["entries"].items():
            if not isinstance(entry, dict):
                raise BaselineError(self._corrupt(path, f"entry {key!r} is not an object"))

    def entries(self, module: str) -> dict[str, dict[str, Any]]:
        return self.read(module)["entries"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries(module_key(split_entry_key(key)[0])).get(key)

    def recorded_hardware(self, key: str) -> dict[str, Any]:
        """The hardware block stored beside ``key``'s entry."""
        return dict(self.read(module_key(split_entry_key(key)[0])).get("hardware") or {})

    def put(self, key: str, entry: dict[str, Any]) -> Path:
        """Store one entry, keeping every other entry of its file (also those of other workers)."""
        return self._update(module_key(split_entry_key(key)[0]), {key: entry}, ())

    def remove(self, module: str, keys: Iterable[str]) -> Path:
        return self._update(module, {}, tuple(keys))

    def _update(self, module: str, changed: dict[str, dict[str, Any]], removed: tuple[str, ...]) -> Path:
        path = self.path(module)
        with _Lock(_lock_path(path, "file"), str(path), self.lock_timeout):
            document = self.read(module)
            entries = {key: value for key, value in document["entries"].items() if key not in removed}
            entries.update(changed)
            new_document = {"schema": SCHEMA, "hardware_key": self.hardware_key,
                            "hardware": self.hardware or document.get("hardware", {}),
                            "entries": entries}
            try:
                text = dumps(new_document)
            except (TypeError, ValueError) as exc:
                raise BaselineError(f"cannot write {path}: an entry is not plain JSON ({exc}); "
                                    "the file was left as it was") from exc
            if not entries and not path.exists():
                return path
            _atomic_write(path, text)
        return path

    def search_lock(self, key: str) -> _Lock:
        """Held while one process searches ``key``, so two workers never run one search at once."""
        return _Lock(_lock_path(self.path_for_key(key), f"search\0{key}"), f"the search of {key}",
                     self.lock_timeout * 30)

    def unused(self, module: str, *, collected: set[str], finished: set[str],
               used: set[str]) -> list[str]:
        """Entries of ``module`` whose test no longer exists, or whose test finished without them.

        ``collected`` must hold every node id the run collected from this module (selected or
        deselected), so a ``-k`` filter never makes an entry look unused.
        """
        unused = []
        for key in self.entries(module):
            nodeid, _ = split_entry_key(key)
            if nodeid not in collected or (nodeid in finished and key not in used):
                unused.append(key)
        return sorted(unused)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace, so readers never see half a file.

    mkstemp creates the file readable by its owner only; a baseline is a file to commit and
    share, so it gets the permissions an ordinary open() would give it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp_name, 0o666 & ~_umask())
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
