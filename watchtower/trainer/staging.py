"""Staging the dataset into a node-local cache, so a hot spare holds the data before it is needed.

The Smol Training Playbook's lesson: a replacement node that must first download the dataset (24 TB:
1.5–3 hours) is not a spare. A group stages its source files through fsspec into its node's cache
when it starts — a spare starts long before it is promoted, so promotion costs no copy — and a
restart on the same node finds the files already there.

A cached file is valid when its size matches the source's; it is written to a temporary name and
renamed, so a crash mid-copy leaves nothing that looks complete. TP ranks of a group share the node's
cache: one copies under an exclusive file lock, the others then find the files present.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
from fsspec.registry import known_implementations

from watchtower.validation import ConfigError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
PARTIAL = ".partial"  # suffix of a copy in progress


@dataclass
class StageReport:
    files: list[str]  # local paths, in the source's order
    copied_files: int
    copied_bytes: int
    seconds: float


def cache_path(cache_dir: Path, url: str) -> Path:
    """Where a source file lives in the cache: a digest of its full URL (no collisions between two
    sources with the same file names) plus its base name (readable in `ls`)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir / digest / Path(url.split("://", 1)[-1]).name


def require_fsspec_backend(url: str, field: str = "source") -> None:
    """Refuse a URL whose fsspec backend is not installed (`s3://` without s3fs) or whose protocol fsspec
    does not know, with one line naming the package to install, so a run fails at validation and not
    with a traceback after its processes have started. Costs one import of the backend; no I/O.

        >>> require_fsspec_backend("/data/corpus.txt")  # a local path needs nothing
        >>> require_fsspec_backend("nosuch://bucket/x")
        Traceback (most recent call last):
        ...
        watchtower.validation.ConfigError: config error: source = 'nosuch://bucket/x': fsspec knows no protocol 'nosuch' (give a local path or a URL like s3://bucket/corpus/)
    """
    for part in url.split("::"):  # chained URLs: simplecache::s3://bucket/x
        protocol = fsspec.core.split_protocol(part)[0]
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ConfigError(field, url, f"fsspec knows no protocol {protocol!r} (give a local path or a URL "
                              "like s3://bucket/corpus/)") from None
        except ImportError as err:
            backend = known_implementations.get(protocol, {}).get("class", "")
            package = backend.split(".")[0]
            fix = f"pip install {package}" if package and package != "fsspec" else str(err)
            raise ConfigError(field, url, f"the {protocol}:// backend of fsspec is not installed: {fix}") from None


def _remote_size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        size = fs.size(path)
    except (OSError, NotImplementedError):
        return None
    return int(size) if size is not None else None


def _copy(url: str, dest: Path, max_bytes: int, progress: Callable[[], None]) -> int:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{PARTIAL}")
    copied = 0
    with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
        while copied < max_bytes:
            chunk = src.read(min(CHUNK_BYTES, max_bytes - copied))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
            progress()
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return copied


def _wait_for_the_copier(lock, cache_dir: Path, progress: Callable[[], None]) -> None:
    """Take the node's staging lock. While another rank holds it and copies, report progress each
    time its partial files change (its progress is this group's too); a copier that stalls stops
    the reports, so a supervisor still sees the stall. Costs a scan of the cache per second waited."""
    seen: tuple = ()
    next_scan = 0.0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= next_scan:
            next_scan = time.monotonic() + 1.0
            partials = []
            for p in cache_dir.rglob(f"*{PARTIAL}"):
                try:
                    partials.append((str(p), p.stat().st_size))
                except FileNotFoundError:  # renamed into place between the listing and the stat
                    pass
            if tuple(sorted(partials)) != seen:
                seen = tuple(sorted(partials))
                progress()
        time.sleep(0.25)


def stage(urls: list[str], cache_dir: Path, max_bytes: int,
          progress: Callable[[], None] | None = None) -> StageReport:
    """Copy each URL into `cache_dir` unless an intact copy is there; stop once `max_bytes` of text are
    staged (what the trainer will read). Returns the local paths to read from. `progress` is called
    per chunk copied (8 MB) and per file checked: a sign of life for a supervisor during a long copy."""
    progress = progress or (lambda: None)
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    local: list[str] = []
    copied_files = copied_bytes = total = 0
    with open(cache_dir / ".lock", "w") as lock:
        _wait_for_the_copier(lock, cache_dir, progress)
        for url in urls:
            progress()
            if total >= max_bytes:
                break
            fs, path = fsspec.core.url_to_fs(url)
            size = _remote_size(fs, path)
            want = min(size, max_bytes - total) if size is not None else max_bytes - total
            dest = cache_path(cache_dir, url)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not (dest.exists() and dest.stat().st_size == want):
                if dest.exists():
                    log.warning("staged copy of %s is %d bytes, expected %d: copying again",
                                url, dest.stat().st_size, want)
                n = _copy(url, dest, want, progress)
                copied_files += 1
                copied_bytes += n
            total += dest.stat().st_size
            local.append(str(dest))
    report = StageReport(local, copied_files, copied_bytes, time.monotonic() - started)
    log.info("staged %d files into %s: copied %d (%.1f MB) in %.2fs", len(local), cache_dir,
             copied_files, copied_bytes / 1e6, report.seconds)
    return report
