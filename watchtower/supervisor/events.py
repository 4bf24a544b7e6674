"""The supervisor's JSONL event log: one line per fault-tolerance transition, read by the TUI."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("watchtower.supervisor")


class EventLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, message: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "event": event, "message": message, **fields}
        self.events.append(record)
        self._file.write(json.dumps(record) + "\n")
        log.info("%s: %s", event, message)
        return record

    def close(self) -> None:
        self._file.close()
