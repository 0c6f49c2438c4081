"""``s3://`` (and other fsspec) URLs -> local files, through a download cache that is never left half-written.

Each object is downloaded once into ``<cache_dir>/<protocol>/<bucket>/<key>@<version>/<name>``, where the version
is a hash of the object's ETag (or modification time) and size: a changed object gets a new folder and is fetched
again, an unchanged one is a cache hit. Downloads go to a temporary name in the same folder and are renamed into
place only when complete, under a file lock, so several DataLoader workers, threads or ranks can share one cache.

A flaky store is ridden out in three layers: botocore retries each request (``standard`` mode, 5 attempts, with
exponential backoff) when the store answers 500/503/``SlowDown`` or the connection fails; s3fs resumes a body
read that breaks or stalls (``read_timeout``) with a Range request; and a download that still fails is resumed
here from where its partial file stopped, ``RemoteCache.attempts`` times in all, before one line names the object.
botocore's retries and timeouts are set with ``data.remote.options.config_kwargs`` (``retries``,
``read_timeout``, ``connect_timeout``).

Credentials come from the standard AWS chain (environment, ``AWS_PROFILE``, instance role); an S3-compatible store
is reached through ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` or ``data.remote.endpoint_url``. Nothing here
stores or prints a secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglight.core.errors import ConfigError, DataError, DiskFullError, first_line
from seglight.core.io import atomic_path
from seglight.data.caching.files import files_under, record_use
from seglight.data.downloads import GaveUp, connection_error, download_resuming, exception_chain

log = logging.getLogger("seglight")

DOWNLOAD_THREADS = 8  # downloads wait on the network, not the CPU
SECRET_OPTIONS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key"}
SECRET_OPTIONS |= {"aws_session_token", "session_token", "access_key", "secret_key"}
# botocore's retries for each request to S3, unless data.remote.options.config_kwargs.retries says otherwise.
S3_RETRIES = {"max_attempts": 5, "mode": "standard"}


def default_cache_dir() -> Path:
    """seglight's cache folder outside Hydra runs: ``$SEGLIGHT_CACHE_DIR`` or ``~/.cache/seglight``."""
    return Path(os.environ.get("SEGLIGHT_CACHE_DIR", "~/.cache/seglight")).expanduser()


def is_remote(path: Any) -> bool:
    """True for a URL such as ``s3://bucket/key`` (``file://`` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join_path(base: str | Path, relative: str) -> str:
    """``relative`` taken from ``base``, for local folders and URLs alike; absolute paths and URLs pass through."""
    if "://" in relative:
        return relative
    if is_remote(base):
        protocol, rest = str(base).split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, relative))}"
    path = Path(relative).expanduser()
    return str(path if path.is_absolute() else (Path(base).expanduser() / path).resolve())


def redact(url: str | None) -> str:
    """A URL without any ``user:password@`` part, for messages and logs."""
    return re.sub(r"://[^/@]*@", "://", url) if url else ""


class RemoteError(DataError):
    """A remote object that cannot be fetched; ``systemic`` when every object would fail the same way."""

    def __init__(self, message: str, systemic: bool = False) -> None:
        super().__init__(message)
        self.systemic = systemic


@dataclass
class CacheUsage:
    """How many files and bytes a cache folder holds, for the user to see."""

    path: Path
    files: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.path} ({self.files} files, {self.bytes / 1e6:.1f} MB)"


def cache_usage(path: Path) -> CacheUsage:
    """Files and bytes under ``path`` (temporary and lock files excluded)."""
    files = total = 0
    if path.is_dir():
        for item in files_under(path):
            hidden = any(part.startswith(".") for part in item.relative_to(path).parts)
            if hidden:
                continue
            try:
                size = item.stat().st_size
            except OSError:  # removed meanwhile
                continue
            files += 1
            total += size
    return CacheUsage(path, files, total)


@dataclass
class RemoteCache:
    """Reads remote text files and lists remote folders, and fetches remote objects into a local cache.

    Every method also accepts local paths, which pass through untouched, so callers need not tell them apart.

    Args:
        cache_dir: where downloaded objects are kept.
        endpoint_url: an S3-compatible endpoint; ``None`` lets boto use ``AWS_ENDPOINT_URL(_S3)`` or AWS itself.
        options: further fsspec/s3fs settings (``anon``, ``requester_pays``, ``config_kwargs``...); never
            credentials.
        attempts: how many times a download is tried (each try with the clients' own retries), resuming from
            where the previous try stopped, before it fails with one line naming the object.
        backoff_s: the wait before the second try; it doubles with each further try (at most 30 s).
    """

    cache_dir: Path = field(default_factory=lambda: default_cache_dir() / "remote")
    endpoint_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    downloaded: int = 0
    downloaded_bytes: int = 0
    attempts: int = 3
    backoff_s: float = 1.0
    retried: int = 0  # downloads resumed after a failed try

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        self.options = dict(self.options or {})
        secret = sorted(k for k in self.options if k.lower() in SECRET_OPTIONS)
        if secret:
            raise ConfigError(
                f"data.remote.options.{secret[0]}: credentials do not belong in the config (it is saved with "
                "every run); use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
            )
        self._filesystems: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Filesystem clients hold sockets and event loops; a copy in another process makes its own.
        state = dict(self.__dict__)
        state["_filesystems"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading and listing -------------------------------------------------------------------------------

    def read_text(self, path: str | Path) -> str:
        """The text of a local or remote file."""
        if not is_remote(path):
            try:
                return Path(path).expanduser().read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from None
        fs, rpath = self._filesystem(str(path))
        try:
            return fs.cat_file(rpath).decode("utf-8")
        except Exception as exc:
            raise self._error(str(path), exc) from None

    def exists(self, path: str | Path) -> bool:
        """Whether a local or remote file or folder exists (access problems raise)."""
        if not is_remote(path):
            return Path(path).expanduser().exists()
        fs, rpath = self._filesystem(str(path))
        try:
            fs.info(rpath)
            return True
        except FileNotFoundError as exc:
            if _bucket_missing(exc):
                raise self._error(str(path), exc) from None
            return False
        except Exception as exc:
            raise self._error(str(path), exc) from None

    def list_files(self, folder: str | Path) -> list[str]:
        """Full paths (or URLs) of the files directly inside a local or remote folder, sorted."""
        if not is_remote(folder):
            return sorted(str(p) for p in Path(folder).expanduser().iterdir() if p.is_file())
        fs, rpath = self._filesystem(str(folder))
        try:
            entries = fs.ls(rpath.rstrip("/"), detail=True, refresh=True)
        except Exception as exc:
            raise self._error(str(folder), exc) from None
        return sorted(fs.unstrip_protocol(e["name"]) for e in entries if e.get("type") == "file")

    def find(self, folder: str | Path, max_depth: int | None = None, limit: int | None = None) -> list[str]:
        """Every file below a local or remote folder, as sorted paths relative to it with ``/`` separators.

        Hidden files and folders (a name starting with ``.``) are left out. ``max_depth`` is the most path parts
        a returned path may have (``subj_001/img.nii.gz`` has 2); ``None`` goes all the way down. ``limit`` stops
        a local search after that many files (some of them, not the first in order).
        """
        if not is_remote(folder):
            return _find_local(Path(folder).expanduser(), max_depth, limit)
        fs, rpath = self._filesystem(str(folder))
        rpath = rpath.rstrip("/")
        try:
            # One flat listing of the prefix (paged by the store), rather than one request per folder.
            names = fs.find(rpath)
        except Exception as exc:
            raise self._error(str(folder), exc) from None
        found = []
        for name in names:
            relative = str(name)[len(rpath) :].lstrip("/")
            parts = relative.split("/")
            if any(not p or p.startswith(".") for p in parts):  # hidden, or a "folder/" marker object
                continue
            if max_depth is None or len(parts) <= max_depth:
                found.append(relative)
        return sorted(found)[:limit]

    # -- fetching ------------------------------------------------------------------------------------------

    def fetch(self, url: str, callback: Any = None) -> Path:
        """The local copy of ``url``, downloaded now unless the cache holds this version already.

        ``callback`` is an ``fsspec.callbacks.Callback`` that sees the download's progress.
        """
        fs, rpath = self._filesystem(url)
        try:
            info = fs.info(rpath)
        except Exception as exc:
            raise self._error(url, exc) from None
        if info.get("type") == "directory":
            raise RemoteError(f"{url}: is a folder, not a file")
        size = info.get("size")
        dest = self.local_path(url, info)
        if _complete(dest, size):
            record_use(dest)
            return dest
        from filelock import FileLock

        lock_dir = self.cache_dir / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"{hashlib.sha1(url.encode()).hexdigest()}.lock")):
            if _complete(dest, size):  # another worker or rank finished it while we waited
                return dest
            self._download(fs, rpath, url, dest, size, callback)
        self._prune_old_versions(dest)
        return dest

    def fetch_all(self, urls: Iterable[str]) -> tuple[dict[str, Path], dict[str, str]]:
        """Fetch several objects in parallel: (local path per URL, problem per URL that could not be fetched).

        A problem that every object would share (missing bucket, credentials, endpoint) raises at once,
        as one message, instead of being repeated per object.
        """
        pending = list(dict.fromkeys(urls))
        fetched: dict[str, Path] = {}
        problems: dict[str, str] = {}
        if not pending:
            return fetched, problems

        def one(url: str) -> None:
            try:
                fetched[url] = self.fetch(url)
            except RemoteError as err:
                if err.systemic:
                    raise
                problems[url] = str(err)

        one(pending[0])  # a systemic problem surfaces once, before a burst of parallel requests
        pool = ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS)
        try:
            for future in [pool.submit(one, url) for url in pending[1:]]:
                future.result()
        finally:
            # On a systemic problem or a signal (SIGTERM), the downloads not started yet are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
        return fetched, problems

    def local_path(self, url: str, info: dict[str, Any]) -> Path:
        """Where version ``info`` of ``url`` lives in the cache."""
        protocol, rest = url.split("://", 1)
        parts = [p for p in posixpath.normpath(rest).split("/") if p not in ("", ".", "..")]
        version_of = [info.get(k) for k in ("ETag", "etag", "md5", "mtime", "LastModified", "updated")]
        fingerprint = json.dumps([version_of, info.get("size")], default=str).encode()
        version = hashlib.sha1(fingerprint).hexdigest()[:12]
        name = parts[-1]
        return self.cache_dir.joinpath(protocol, *parts[:-1], f"{name}@{version}", name)

    def usage(self) -> CacheUsage:
        """Files and bytes the cache holds now."""
        return cache_usage(self.cache_dir)

    def _download(self, fs: Any, rpath: str, url: str, dest: Path, size: int | None, callback: Any) -> None:
        from fsspec.callbacks import NoOpCallback

        callback = callback or NoOpCallback()
        try:
            with atomic_path(dest, durable=False, size_hint=size) as tmp:  # a lost copy is fetched again
                self._download_with_retries(fs, rpath, url, tmp, dest, size, callback)
        except BaseException as exc:
            _remove_empty(dest.parent, self.cache_dir)
            if isinstance(exc, RemoteError | DiskFullError) or not isinstance(exc, Exception):
                raise
            raise self._error(url, exc, downloading=True) from None
        with self._lock:
            self.downloaded += 1
            self.downloaded_bytes += dest.stat().st_size

    def _download_with_retries(
        self, fs: Any, rpath: str, url: str, tmp: Path, dest: Path, size: int | None, callback: Any
    ) -> None:
        """Download into ``tmp``, resuming a try that breaks off (``seglight.data.downloads``)."""
        try:
            tries = download_resuming(fs, rpath, tmp, size, callback, self.attempts, self.backoff_s, url)
        except GaveUp as failed:
            exc = failed.__cause__ or failed
            raise RemoteError(
                f"{url}: download interrupted ({type(exc).__name__}: {first_line(exc)}; tried {failed.tries} "
                "times); nothing was kept in the cache, run again to retry",
                systemic=connection_error({type(e).__name__ for e in exception_chain(exc)}),
            ) from None
        with self._lock:
            self.retried += tries - 1
        got = tmp.stat().st_size if tmp.exists() else 0
        if size is not None and got != size:
            raise RemoteError(f"{url}: download incomplete ({got} of {size} bytes); run again to retry")
        if tries > 1:
            # Pieces from several requests: they belong to one version only if the object did not change.
            fs.invalidate_cache(rpath)
            if self.local_path(url, fs.info(rpath)) != dest:
                raise RemoteError(f"{url}: the object changed while it was downloaded; run again to fetch it")

    def _prune_old_versions(self, dest: Path) -> None:
        # Older versions of the same object are dead weight once the new one is in place.
        stem = dest.parent.name.rsplit("@", 1)[0]
        for sibling in dest.parent.parent.glob(f"{glob_escape(stem)}@*"):
            if sibling != dest.parent and sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)

    def _filesystem(self, url: str) -> tuple[Any, str]:
        protocol = url.split("://", 1)[0]
        with self._lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                fs = self._filesystems[protocol] = self._make_filesystem(protocol, url)
        return fs, fs._strip_protocol(url)

    def _make_filesystem(self, protocol: str, url: str) -> Any:
        import fsspec

        # A client of its own (not fsspec's shared instance), so credentials and endpoint are read afresh.
        options: dict[str, Any] = {**self.options, "skip_instance_cache": True}
        if protocol in ("s3", "s3a") and self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if protocol in ("s3", "s3a"):
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("retries", dict(S3_RETRIES))
            options["config_kwargs"] = config
        try:
            return fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{url}: cannot read {protocol}:// paths ({exc})") from None

    def _endpoint(self) -> str:
        endpoint = (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        return redact(endpoint) if endpoint else "AWS S3"

    def _error(self, url: str, exc: BaseException, downloading: bool = False) -> RemoteError:
        """One clear message for what went wrong with ``url``, without the client's traceback."""
        names = {type(e).__name__ for e in exception_chain(exc)}
        detail = first_line(exc)
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if "NoCredentialsError" in names or "PartialCredentialsError" in names:
            return RemoteError(
                f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or run where an instance role provides them",
                systemic=True,
            )
        if isinstance(exc, FileNotFoundError):
            if _bucket_missing(exc):
                return RemoteError(f"{url}: bucket '{bucket}' does not exist at {self._endpoint()}", True)
            return RemoteError(f"{url}: no such object in bucket '{bucket}'")
        if isinstance(exc, PermissionError) or names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return RemoteError(
                f"{url}: access denied by {self._endpoint()} ({detail}); check the AWS credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and the bucket's "
                "permissions",
                systemic=True,
            )
        if downloading:
            return RemoteError(
                f"{url}: download interrupted ({detail}); nothing was kept in the cache, run again to retry",
                systemic=connection_error(names),
            )
        if connection_error(names):
            return RemoteError(f"{url}: cannot reach {self._endpoint()} ({detail})", systemic=True)
        return RemoteError(f"{url}: cannot be read ({type(exc).__name__}: {detail})")


def localize_paths(value: Any, fetched: dict[str, Path]) -> Any:
    """``value`` (a path or a list of paths) with every fetched URL replaced by its local copy."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [localize_paths(v, fetched) for v in value]
    return str(fetched[value]) if isinstance(value, str) and value in fetched else value


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _find_local(base: Path, max_depth: int | None, limit: int | None = None) -> list[str]:
    """``RemoteCache.find`` for a local folder; symbolic links are followed, each real folder visited once."""
    found: list[str] = []
    visited: set[str] = set()
    for current, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(current)
        relative = Path(current).relative_to(base)
        depth = len(relative.parts)
        if real in visited:  # a link back up the tree
            dirs[:] = []
            continue
        visited.add(real)
        deeper = max_depth is None or depth + 1 < max_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if deeper else []
        if max_depth is None or depth + 1 <= max_depth:
            found.extend((relative / f).as_posix() for f in sorted(files) if not f.startswith("."))
        if limit is not None and len(found) >= limit:
            break
    return sorted(found[:limit] if limit is not None else found)


def _complete(dest: Path, size: int | None) -> bool:
    return dest.is_file() and (size is None or dest.stat().st_size == size)


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to ``stop`` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (another version or worker) or already gone
            return
        folder = folder.parent


def _bucket_missing(exc: BaseException) -> bool:
    return any(
        "NoSuchBucket" in type(e).__name__ or "bucket does not exist" in str(e).lower()
        for e in exception_chain(exc)
    )
