"""Replace a file's whole content at once, readable by other users.

Readers (Prometheus's file_sd through inotify, a trainer reading its launch config) must never see
half a file, so the text goes to a temporary file beside the target and is renamed over it. The
temporary file is made by `mkstemp`, which creates it 0600; the result is set to `mode` (0644 by
default) before the rename, or a Prometheus running as its own user would read nothing. Costs one
create, write, chmod and rename; no fsync (these files are rewritten, not durable state), unless
`durable`: then the file is fsynced before the rename and its directory after it (two syncs), for
state a node crash must not leave empty (remediation.json).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, text: str, mode: int = 0o644, durable: bool = False) -> None:
    """Write `text` to `path` through a temp file and a rename; the parent directory is created.

    >>> import tempfile, pathlib, stat
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "targets.json"
    >>> write_atomic(target, "[]")
    >>> target.read_text(), oct(stat.S_IMODE(target.stat().st_mode))
    ('[]', '0o644')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
