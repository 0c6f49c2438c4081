"""The on-disk caches as files: when each entry was last used, which runs use them now, least-recently-used pruning.

Three caches hold files: the preprocessing cache (``data.cache=disk``: one ``<key>.pt`` per case and setting), the
remote object cache (one ``<name>@<version>/`` folder per downloaded object) and the DICOM cache (one
``<series>@<where>-<version>/`` folder per converted series, one ``zip/<name>@<version>/`` folder per extracted zip).
Reading a file does not reliably
update its access time (``noatime`` and ``relatime`` mounts), so seglight records each use itself: it sets the
entry's access time explicitly, and keeps its modification time (which the preprocessing cache's keys read).

A run holds a lease on each cache folder it uses: a small file in ``<cache>/.leases/`` that it keeps locked while it
runs (the lock goes with the process, however it ends). Pruning never removes an entry that a running run has used
since it started, so a run never loses the files it reads; a reader that already has a file open keeps reading it
after it is removed (POSIX). Only the standard library is used here: ``python -m seglight.cache`` starts fast.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: leases cannot be told alive from stale, so every lease counts as alive
    fcntl = None  # type: ignore[assignment]

USE_RESOLUTION_S = 60.0  # an entry's use is recorded at most once a minute (a stat and a utime per read)
STALE_TEMP_S = 24 * 3600.0  # a temporary file this old belongs to a write that was killed
LEASES = ".leases"
CACHE_KINDS = ("preprocessed", "remote", "dicom")
GB = 1e9


def record_use(path: str | Path) -> None:
    """Note that ``path`` (a cache entry's file) was just used, for least-recently-used pruning."""
    try:
        stat = os.stat(path)
        now = time.time_ns()
        if now - stat.st_atime_ns < USE_RESOLUTION_S * 1e9:
            return
        os.utime(path, ns=(now, stat.st_mtime_ns))
    except OSError:
        pass  # a read-only cache, or the entry pruned meanwhile: not worth failing a read for


@dataclass
class Entry:
    """One prunable unit of a cache: a preprocessed case, or one version of a downloaded object."""

    kind: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def cache_entries(root: Path, kind: str) -> list[Entry]:
    """The entries of the cache folder ``root`` (``kind``: one of ``CACHE_KINDS``), temporary files aside."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind {kind!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    if kind == "preprocessed":
        files: Iterable[Path] = root.glob("*.pt")
    else:
        files = (p for p in files_under(root) if not _hidden(p, root))
    grouped: dict[Path, Entry] = {}
    for file in files:
        try:
            stat = file.stat()
        except OSError:  # removed meanwhile (another prune, a replaced entry)
            continue
        if not file.is_file():
            continue
        unit = _unit(file, root, kind) if kind != "preprocessed" else file
        entry = grouped.setdefault(unit, Entry(kind, unit, 0, 0.0))
        entry.bytes += stat.st_size
        entry.last_used = max(entry.last_used, stat.st_atime, stat.st_mtime)
    return list(grouped.values())


class CacheLease:
    """This process's claim on a cache folder: what it uses from now on survives pruning while it runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.pid = os.getpid()
        self.started = time.time()
        folder = self.root / LEASES
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{self.pid}-{secrets.token_hex(3)}"
        record = {"pid": self.pid, "host": socket.gethostname(), "started": self.started, "command": sys.argv}
        # Locked under a temporary name, then renamed: a pruner never sees an unlocked lease of a live run.
        tmp = folder / f".{name}.tmp"
        self._fd: int | None = None
        try:
            tmp.write_text(json.dumps(record))
            self._fd = os.open(tmp, os.O_RDWR)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # OSError where the file system has no locks
            self.path = folder / f"{name}.json"
            os.replace(tmp, self.path)
        except OSError:
            if self._fd is not None:
                os.close(self._fd)
            tmp.unlink(missing_ok=True)
            raise
        atexit.register(self.release)

    @property
    def held(self) -> bool:
        """Whether the lease is still held (not released)."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lease up (at exit at the latest); only the process that took it can."""
        if self._fd is None or os.getpid() != self.pid:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


_held: dict[Path, CacheLease] = {}


def hold(root: str | Path) -> CacheLease | None:
    """This process's lease on the cache folder ``root`` (taken on first call); None where it cannot be written."""
    key = Path(root).expanduser().resolve()
    lease = _held.get(key)
    if lease is None or lease.pid != os.getpid() or not lease.held:
        try:
            lease = _held[key] = CacheLease(key)
        except OSError:
            return None  # a read-only cache: nobody can prune it from here either
    return lease


def live_leases(root: Path) -> list[dict[str, Any]]:
    """The leases of runs still running on ``root`` (removing those of runs that ended)."""
    folder = Path(root).expanduser() / LEASES
    alive = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    pass  # locked, so its run is alive (or no locks here: assume it is)
                else:
                    path.unlink(missing_ok=True)  # nobody holds it: its run ended
                    continue
            try:
                alive.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                alive.append({"started": 0.0})
        finally:
            os.close(fd)
    return alive


@dataclass
class CacheReport:
    """What a cache folder holds, and how much of it running runs use."""

    kind: str
    root: Path
    entries: list[Entry] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def in_use(self) -> list[Entry]:
        """Entries that a running run has used since it started."""
        if not self.runs:
            return []
        since = min(float(run.get("started", 0.0)) for run in self.runs) - USE_RESOLUTION_S - 2.0
        return [e for e in self.entries if e.last_used >= since]


def inspect_caches(roots: Mapping[str, str | Path]) -> list[CacheReport]:
    """One report per cache folder (``kind -> folder``)."""
    reports = []
    for kind, root in roots.items():
        root = Path(root).expanduser()
        reports.append(CacheReport(kind, root, cache_entries(root, kind), live_leases(root)))
    return reports


@dataclass
class PruneResult:
    """What pruning removed and what it kept."""

    removed: int = 0
    removed_bytes: int = 0
    kept_bytes: int = 0
    in_use_bytes: int = 0


def prune(roots: Mapping[str, str | Path], max_bytes: int) -> PruneResult:
    """Remove least recently used entries across the caches until they hold at most ``max_bytes`` together.

    Entries used by a running run since it started are kept even beyond the limit; temporary files of writes
    that were killed long ago go too.
    """
    reports = inspect_caches(roots)
    result = PruneResult()
    protected: set[Path] = set()
    for report in reports:
        for entry in report.in_use():
            protected.add(entry.path)
            result.in_use_bytes += entry.bytes
        _remove_stale_temporary_files(report.root)
    entries = sorted((e for r in reports for e in r.entries), key=lambda e: e.last_used)
    total = sum(e.bytes for e in entries)
    for entry in entries:
        if total <= max_bytes:
            break
        if entry.path in protected:
            continue
        _remove(entry, Path(roots[entry.kind]).expanduser())
        total -= entry.bytes
        result.removed += 1
        result.removed_bytes += entry.bytes
    result.kept_bytes = total
    return result


def _unit(file: Path, root: Path, kind: str) -> Path:
    """The entry a file of the remote or DICOM cache belongs to: a downloaded object's ``<name>@<version>``
    folder; a converted series' folder; an extracted zip's folder, with everything in it."""
    if kind == "remote":
        return file.parent if "@" in file.parent.name else file
    parts = file.relative_to(root).parts
    depth = 2 if parts[0] == "zip" else 1
    return root.joinpath(*parts[:depth]) if len(parts) > depth else file


def _remove(entry: Entry, root: Path) -> None:
    if entry.path.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)
    folder = entry.path.parent
    while folder != root and root in folder.parents:  # empty bucket/prefix folders of the remote cache
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def _remove_stale_temporary_files(root: Path) -> None:
    if not root.is_dir():
        return
    cutoff = time.time() - STALE_TEMP_S
    for path in files_under(root):
        if not path.name.startswith("."):
            continue
        # ".partial": seglight.core.io.atomic_path's temporary files (the name is repeated: stdlib only here).
        if (path.suffix not in (".tmp", ".part") and ".partial" not in path.name) or LEASES in path.parts:
            continue
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
        except OSError:
            continue


def files_under(root: Path) -> Iterable[Path]:
    """Every file below ``root``, walked so that folders removed meanwhile (by a concurrent prune or a finished
    download) are skipped instead of failing the walk, as ``Path.rglob`` does on Python 3.11."""
    for folder, _, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def format_size(num_bytes: float) -> str:
    """``1.2 GB``, ``340.0 MB``."""
    return f"{num_bytes / GB:.1f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:.1f} MB"
