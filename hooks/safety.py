"""The monitor's promise to the trainer: a failure inside a hook is counted and logged, never raised.

Every public entry point of the monitor runs under `HookErrors.guard(name)`. The first failure of
each hook is logged with its traceback; later ones only count (`watchtower_hook_errors_total`), so a
hook that fails every step does not flood the log of a week-long run.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("watchtower.hooks")

# Every guarded entry point. Their counters start at 0, so `increase()` over them is defined from the
# first scrape on (a counter that appears only with its first error hides that first error from rate()).
HOOKS = ("start", "wrap", "step", "step_enter", "step_exit", "should_step", "record", "set_gauge",
         "check_parallel", "scrape", "close")


class HookErrors:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({hook: 0 for hook in HOOKS})
        self._lock = threading.Lock()

    def record(self, hook: str, err: BaseException) -> None:
        with self._lock:
            self.counts[hook] += 1
            first = self.counts[hook] == 1
        if first:
            log.warning("watchtower hook %r failed; training goes on, further failures are only counted",
                        hook, exc_info=err)

    @contextmanager
    def guard(self, hook: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - the whole point: nothing escapes into the trainer
            self.record(hook, err)
