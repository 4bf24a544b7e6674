"""The supervisor's JSONL event log: one line per fault-tolerance transition, read by the TUI.

Each event is appended with one `write` on a file opened for it (O_APPEND), so a full disk or a
vanished directory loses that line only: the error goes to `on_error` (the loop counts it as stage
"events"), the event stays in memory (`events`, printed by `watchtower demo`) and the next event is
tried again. Events are rare (a few per failure); an open per event costs microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("watchtower.supervisor")


class EventLog:
    def __init__(self, path: Path, on_error: Callable[[str, BaseException], None] | None = None):
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._on_error = on_error

    def emit(self, event: str, message: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "event": event, "message": message, **fields}
        self.events.append(record)
        log.info("%s: %s", event, message)
        try:
            self._append((json.dumps(record) + "\n").encode())
        except OSError as err:
            if self._on_error is None:
                raise
            self._on_error("events", err)
        return record

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)
