"""One supervisor per job directory: an exclusive `flock` on `<output>/supervisor.lock`.

Two supervisors on one directory would run two sets of groups writing the same checkpoints. The
lock is taken before anything starts and held for the process's lifetime; the kernel drops it
when the process dies however it dies (SIGKILL, OOM), so the next `supervise` after a dead one
goes ahead and resumes from the last checkpoint. The file's descriptor is not inherited by the
groups (Python opens it close-on-exec), so a group cannot keep the lock alive. Costs one open.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from watchtower.validation import ConfigError

LOCK_FILE = "supervisor.lock"


class JobDirLock:
    """Claim `out` for this process; a live holder makes it a ConfigError naming its pid (exit 2)
    and `key`, the setting the user gave the directory with (`--output-dir` for the demo).

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> mine = JobDirLock(out)
    >>> JobDirLock(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    watchtower.validation.ConfigError: config error: job.output_dir = '...': is being supervised by a live supervisor (pid ...
    >>> mine.release(); JobDirLock(out).release()
    """

    def __init__(self, out: Path, key: str = "job.output_dir"):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(key, str(out), f"is being supervised by a live supervisor (pid {holder}); "
                              "stop it first or give another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
