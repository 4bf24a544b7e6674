"""Hold trainers at their start, serving /metrics, until the test lets them train.

A trainer that stages its data (`--data.stage always`) takes the node cache's lock before its first
step, and serves /metrics while it waits (every counter at 0). A test that holds that lock can start
its trainers at once and let them train only once Prometheus has scraped them: their start (a torch
import, seconds) overlaps Prometheus's target discovery (file_sd changes reach the scrape loops on a
5 s tick) instead of following it, and no step can outrun the first scrape (a loss spike that
Prometheus never saw at 0 never pages: see waiting.wait_for_loss_spike_page).

Example:
    held = HeldStart(tmp_path / "cache")
    proc = start_trainer(..., *held.trainer_args)   # serves /metrics, trains nothing yet
    wait_until(<Prometheus has scraped it>, "...")
    held.release()                                  # every held trainer starts training
"""

from __future__ import annotations

import fcntl
import sysconfig
from pathlib import Path


class HeldStart:
    """The lock of a data cache that trainers started with `trainer_args` wait for; held from here to
    `release()`. Cost: the trainers copy their corpus (at most data.max_bytes) into the cache once."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.cache_dir / ".lock", "w")  # staging's lock file (watchtower.trainer.staging)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        # the built-in corpus (the standard library's sources), named as a source so that it is staged
        corpus = f"{sysconfig.get_paths()['stdlib']}/*.py"
        self.trainer_args = ("--data.source", corpus, "--data.stage", "always", "--data.cache_dir", str(self.cache_dir))

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
