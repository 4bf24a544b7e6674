"""What the supervisor survives: an exception in one stage of its loop is counted, never fatal.

A failed scrape (an HTML page on a rank's port), a full disk under `events.jsonl` or `targets.json`,
a Lighthouse that cannot rebind: each is caught around the one observation or action that raised it,
logged the first time for its stage (with the traceback) and counted in
`watchtower_supervisor_errors_total{stage}` after that. Only a policy decision kills a group. The
counters start at zero for every stage, so `increase()` sees the first error. A launch the launcher
fails on its node is not an error here but a failure of its node, shown to the policy; one the
supervisor cannot prepare on its own disk is (stage "launch"), retried at the next poll (actions.py).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("watchtower.supervisor")

STAGES = ("exits", "scrape", "drain", "lighthouse", "decide", "health", "launch", "kill", "events", "file_sd",
          "metrics", "capture", "alertmanager", "stop", "rewind")  # stop: the graceful stop's request file and check


class CommandError(RuntimeError):
    """An external command (a Slurm client) failed; its message holds the command line and its error
    output, so it is logged as one line, without a traceback."""


class StageErrors:
    """Counts per stage; `guard(stage)` swallows and counts an Exception (not a BaseException:
    KeyboardInterrupt and SystemExit still end the loop).

    >>> errors = StageErrors()
    >>> with errors.guard("scrape"):
    ...     raise ValueError("an HTML page, not /metrics")
    >>> errors.snapshot()["scrape"], errors.snapshot()["events"]
    (1, 0)
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter({stage: 0 for stage in STAGES})
        self._lock = threading.Lock()

    def record(self, stage: str, err: BaseException) -> None:
        if stage not in STAGES:
            raise KeyError(f"undeclared supervisor stage {stage!r}; declared: {', '.join(STAGES)}")
        with self._lock:
            self._counts[stage] += 1
            first = self._counts[stage] == 1
        if first:  # an OSError (a refused scrape, a full disk) or a failed command says it all; else a traceback
            log.warning("supervisor stage %r failed (%s: %s); the job goes on, further failures are only counted",
                        stage, type(err).__name__, err, exc_info=None if isinstance(err, (OSError, CommandError)) else err)

    @contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - the point: one stage's failure never ends the job
            self.record(stage, err)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
