"""Baselines on disk: one reviewable JSON file per hardware and test module.

``<root>/<hardware_key>/<module>.json`` (see DESIGN.md). Every write takes a lock (a hidden file
beside the baseline, deleted on release), re-reads the file, merges its own entries into what is
there and replaces the file atomically, so parallel pytest-xdist workers and interrupted runs never
lose or half-write an entry. Every read is checked against the schema (schema.py); a file that
cannot be used raises BaselineError naming the file and the fix, and is never written over.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Iterable

from .errors import BaselineError, ConfigError
from .schema import SCHEMA, Entry, parse_document

#: Seconds to wait for another process's lock before giving up with a clear error.
LOCK_TIMEOUT_S = 120.0

#: A baseline file larger than this is refused before it is parsed (a few thousand entries fit).
MAX_FILE_BYTES = 64 * 2**20

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_READABLE = re.compile(r"[A-Za-z0-9.-]+(?:_[A-Za-z0-9.-]+)*")


def module_key(nodeid: str) -> str:
    """File stem for a test's module: ``tests/test_models.py::t[1]`` -> ``tests__test_models``.

    Injective: a path whose readable form could be shared (it holds ``__``, a ``_`` at the edge of
    a folder name, or characters other than letters, digits, ``_``, ``.`` and ``-``) gets ``+`` and
    12 hex digits of its hash appended, e.g. ``test_a__test_x.py`` -> ``test_a__test_x+1f2e...``.
    Readable names never hold ``+``, so they never meet a hashed one.
    """
    path = nodeid.split("::", 1)[0].replace("\\", "/")
    if path.endswith(".py"):
        path = path[:-3]
    segments = path.split("/")
    if path and all(_READABLE.fullmatch(segment) for segment in segments):
        return "__".join(segments)
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', path.replace('/', '__')) or '_'}+{digest}"


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


def _lock_path(target: Path, purpose: str = "") -> Path:
    """The lock of ``target``: a hidden file beside it, removed when released (never committed)."""
    suffix = f".{hashlib.sha256(purpose.encode()).hexdigest()[:12]}" if purpose else ""
    return target.parent / f".{target.name}{suffix}.lock"


class _Lock:
    """An exclusive lock on a file beside the baselines, deleted on release.

    On POSIX: flock on a file opened without following symlinks; after locking, the path must still
    name the locked file (a releasing holder may have deleted it), else it starts over. Elsewhere
    the filelock package. A timeout is a BaselineError that says what to do.
    """

    def __init__(self, lock_path: Path, what: str, timeout: float):
        self.path = lock_path
        self._what = what
        self._timeout = timeout
        self._fd: int | None = None
        self._fallback: Any = None

    def __enter__(self) -> "_Lock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            raise BaselineError(f"cannot lock {self._what} with {self.path}: {exc.strerror or exc}. "
                                f"{_os_fix(exc, self.path)}") from None
        return self

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            from filelock import FileLock, Timeout
            self._fallback = FileLock(str(self.path), timeout=self._timeout)
            try:
                self._fallback.acquire()
            except Timeout:
                self._timed_out()
            return
        deadline = time.monotonic() + self._timeout
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        while True:
            fd = os.open(self.path, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._mark_waiting()
                if time.monotonic() > deadline:
                    self._timed_out()
                time.sleep(0.02)
                continue
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)   # released and deleted meanwhile: lock the new file

    @property
    def _waiting(self) -> Path:
        return self.path.with_name(self.path.name + ".waiting")

    def _mark_waiting(self) -> None:
        """Tell the holder that someone waits (it then writes what it found at once)."""
        if not os.path.lexists(self._waiting):
            try:
                os.close(os.open(self._waiting, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644))
            except OSError:
                pass

    @property
    def contended(self) -> bool:
        """Whether another process waited for this lock while it was held."""
        return os.path.lexists(self._waiting)

    def _timed_out(self) -> None:
        raise BaselineError(
            f"could not lock {self._what} within {self._timeout:.0f} s: another pytest process "
            f"holds it. If none is running, delete {self.path} and run again.")

    def __exit__(self, *exc_info: object) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            return
        if self._fd is not None:
            for path in (self._waiting, self.path):   # still holding the lock: nobody holds these
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            os.close(self._fd)         # closing releases the flock
            self._fd = None


def _os_fix(exc: OSError, path: Path) -> str:
    """What to do about an OSError on ``path``."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"The disk holding {path.parent} is full: free some space and run again."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{path.parent} is not writable by this user: make it writable, or pass "
                "--autobatch-baselines DIR with a writable copy of the baselines.")
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link, which pytest-autobatch never follows: delete it."
    return f"Check {path.parent} and run again."


class BaselineStore:
    """The baselines of one hardware key under ``root``.

    Reads are validated (schema.py) and cached until the file changes. ``put`` stages an entry;
    ``flush`` writes every staged entry with one locked write per file (the plugin flushes at the
    end of the session), ``put(..., now=True)`` writes at once.
    """

    def __init__(self, root: str | os.PathLike[str], hardware_key: str,
                 hardware: dict[str, Any] | None = None, *, lock_timeout: float = LOCK_TIMEOUT_S):
        if not hardware_key or _UNSAFE.search(hardware_key):
            raise ConfigError(f"hardware key {hardware_key!r} must be non-empty and use only "
                              "letters, digits, '_', '.' and '-'")
        self.root = Path(root)
        self.hardware_key = hardware_key
        self.hardware = dict(hardware or {})
        self.lock_timeout = lock_timeout
        self._cache: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._staged: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def folder(self) -> Path:
        return self.root / self.hardware_key

    def path(self, module: str) -> Path:
        return self.folder / f"{module}.json"

    def path_for_key(self, key: str) -> Path:
        return self.path(module_key(split_entry_key(key)[0]))

    def _check_inside(self, path: Path) -> None:
        """Refuse a path that leads out of the baselines directory through a symlink."""
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise BaselineError(
                f"{path} leads outside the baselines directory {self.root} (a symbolic link to "
                f"{path.resolve()}); pytest-autobatch never follows links out of it. Replace the "
                "link with a real folder or file.") from None

    def modules(self) -> list[str]:
        """Modules that have a baseline file for this hardware."""
        if not self.folder.is_dir():
            return []
        self._check_inside(self.folder)
        return sorted(path.stem for path in self.folder.glob("*.json"))

    def _empty(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "hardware_key": self.hardware_key, "hardware": self.hardware,
                "entries": {}}

    def read(self, module: str) -> dict[str, Any]:
        """The validated document of ``module`` (empty when there is no file); BaselineError when
        it cannot be used. Staged entries are not included."""
        path = self.path(module)
        try:
            self._check_inside(path)
            stat = os.stat(path)
        except FileNotFoundError:
            return self._empty()
        except OSError as exc:
            raise BaselineError(f"cannot read baseline file {path}: {exc}") from exc
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        document = self._load(path, stat.st_size)
        self._cache[path] = (signature, document)
        return document

    def read_entries(self, module: str) -> dict[str, Entry]:
        """The typed, checked entries of ``module``."""
        document = self.read(module)
        return parse_document(document, self.hardware_key, str(self.path(module)))

    def _load(self, path: Path, size: int) -> dict[str, Any]:
        if size > MAX_FILE_BYTES:
            raise BaselineError(self._corrupt(path, f"it is {size:,} bytes, more than the "
                                                    f"{MAX_FILE_BYTES:,} a baseline file may hold"))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BaselineError(f"cannot read baseline file {path}: {exc}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BaselineError(self._corrupt(path, f"it is not UTF-8 text ({exc})")) from None
        try:
            document = json.loads(text)
        except RecursionError:
            raise BaselineError(self._corrupt(path, "it is nested too deeply")) from None
        except ValueError as exc:
            raise BaselineError(self._corrupt(path, f"it is not valid JSON ({exc})")) from None
        parse_document(document, self.hardware_key, str(path))
        return typing.cast(dict[str, Any], document)

    def _corrupt(self, path: Path, problem: str) -> str:
        return (f"baseline file {path} cannot be used: {problem}. It was left untouched. Fix it by "
                f"hand (e.g. resolve merge-conflict markers), restore it from version control "
                f"(git checkout -- {path}), or delete it and re-record with "
                f"pytest --autobatch --autobatch-update.")

    def entries(self, module: str) -> dict[str, dict[str, Any]]:
        """Stored entries of ``module`` with this session's staged ones on top."""
        stored: dict[str, dict[str, Any]] = self.read(module)["entries"]
        staged = self._staged.get(module)
        return {**stored, **staged} if staged else stored

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries(module_key(split_entry_key(key)[0])).get(key)

    def recorded_hardware(self, key: str) -> dict[str, Any]:
        """The hardware block stored beside ``key``'s entry."""
        return dict(self.read(module_key(split_entry_key(key)[0])).get("hardware") or {})

    def put(self, key: str, entry: dict[str, Any], *, now: bool = True) -> Path:
        """Store one entry, keeping every other entry of its file (also those of other workers).

        ``now=False`` stages it for ``flush``: one write per file however many entries.
        The entry is checked first; a bad one raises BaselineError and nothing is written.
        """
        module = module_key(split_entry_key(key)[0])
        path = self.path(module)
        self._check_writable(path, {key: entry})
        if not now:
            self._staged.setdefault(module, {})[key] = entry
            return path
        return self._update(module, {key: entry}, ())

    def flush(self) -> list[Path]:
        """Write every staged entry: one locked write per file. Entries stay staged on failure."""
        written = []
        for module in sorted(self._staged):
            written.append(self._update(module, self._staged[module], ()))
            del self._staged[module]
        return written

    @property
    def staged(self) -> int:
        return sum(len(entries) for entries in self._staged.values())

    def remove(self, module: str, keys: Iterable[str]) -> Path:
        return self._update(module, {}, tuple(keys))

    def _check_writable(self, path: Path, entries: dict[str, dict[str, Any]]) -> str:
        """The file text of ``entries`` alone, or BaselineError: checked before anything is written."""
        document = {**self._empty(), "entries": entries}
        parse_document(document, self.hardware_key, str(path))
        return self._dumps(path, document)

    def _dumps(self, path: Path, document: dict[str, Any]) -> str:
        try:
            return dumps(document)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BaselineError(f"cannot write {path}: an entry is not plain JSON ({exc}); "
                                "the file was left as it was") from None

    def _update(self, module: str, changed: dict[str, dict[str, Any]], removed: tuple[str, ...]) -> Path:
        path = self.path(module)
        self._check_inside(path.parent if path.parent.exists() else self.root)
        with _Lock(_lock_path(path), str(path), self.lock_timeout):
            document = self.read(module)
            entries = {key: value for key, value in document["entries"].items() if key not in removed}
            entries.update(changed)
            new_document = {"schema": SCHEMA, "hardware_key": self.hardware_key,
                            "hardware": self.hardware or document.get("hardware", {}),
                            "entries": entries}
            text = self._dumps(path, new_document)
            _remove_stale_temporaries(path)
            if not entries and not path.exists():
                return path
            try:
                _atomic_write(path, text)
            except OSError as exc:
                raise BaselineError(f"cannot write baseline file {path}: {exc.strerror or exc}. The "
                                    f"stored file was left as it was. {_os_fix(exc, path)}") from None
        return path

    def search_lock(self, key: str) -> _Lock:
        """Held while one process searches ``key``, so two workers never run one search at once."""
        path = self.path_for_key(key)
        return _Lock(_lock_path(path, f"search\0{key}"), f"the search of {key}", self.lock_timeout * 30)

    def misplaced(self) -> dict[str, list[str]]:
        """module -> keys stored in its file that belong to another module's file (old naming)."""
        found = {}
        for module in self.modules():
            keys = [key for key in self.read(module)["entries"]
                    if module_key(split_entry_key(key)[0]) != module]
            if keys:
                found[module] = keys
        return found

    def migrate(self) -> list[str]:
        """Move entries filed under the old, non-injective names to their own files; one message
        per move. An entry already in its new file is kept there (it is the newer one)."""
        messages = []
        for module, keys in self.misplaced().items():
            entries = self.read(module)["entries"]
            moving: dict[str, dict[str, dict[str, Any]]] = {}
            for key in keys:
                moving.setdefault(module_key(split_entry_key(key)[0]), {})[key] = entries[key]
            for target, moved in sorted(moving.items()):
                present = self.read(target)["entries"]
                self._update(target, {k: v for k, v in moved.items() if k not in present}, ())
                messages.append(f"pytest-autobatch: moved {len(moved)} baseline entr"
                                f"{'y' if len(moved) == 1 else 'ies'} from {self.path(module)} to "
                                f"{self.path(target)} (baseline files are now named one per test "
                                "module); commit both files")
            self._update(module, {}, tuple(keys))
        return messages

    def unused(self, module: str, *, collected: set[str], finished: set[str],
               used: set[str]) -> list[str]:
        """Entries of ``module`` whose test no longer exists, or whose test finished without them.

        ``collected`` must hold every node id the run collected from this module (selected or
        deselected), so a ``-k`` filter never makes an entry look unused. Entries of another
        module (a file from the old naming) are never reported.
        """
        unused = []
        for key in self.entries(module):
            nodeid, _ = split_entry_key(key)
            if module_key(nodeid) != module:
                continue
            if nodeid not in collected or (nodeid in finished and key not in used):
                unused.append(key)
        return sorted(unused)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a killed writer; called under the file's lock, when no
    other writer of ``path`` can have one open."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


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
