"""The supervisor's own alerts, posted straight to Alertmanager's v2 API (`POST /api/v2/alerts`).

Off the loop: `fire` and `resolve` only queue; one daemon thread posts, through a proxy-free opener
(`direct_http`), with a POST_TIMEOUT_S timeout. An Alertmanager that is down or slow costs the loop
nothing; each failed post is counted in `watchtower_supervisor_errors_total{stage="alertmanager"}`
(logged the first time) and the alert is posted again RETRY_S later, until its end.

Each alert carries the labels and annotations of the Prometheus rule that raises the same alert
(`alert_contract.py`), so Alertmanager merges the two paths into one page. Ends:
  - an alert for an event (a group failed) ends when the rule's window would: `ends_at` is given,
    posted once (again only on a failed post), and left to expire there by itself. Never posted
    resolved at that end: the rule still fires for a scrape and an evaluation after it, and
    Alertmanager's merge takes a younger resolved update's end, so the page resolved and, at
    Prometheus's next resend, fired again (a second notification);
  - an alert for a condition (spares exhausted, crash loop) is posted with endsAt TTL_S ahead and
    again every RESEND_S while it holds; `resolve` posts it ended now. If the supervisor dies, the
    alert ends by itself TTL_S later (as Prometheus's do).
Cost: one small JSON POST per change and per RESEND_S per ongoing alert.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from datetime import datetime, timezone
from typing import Callable

from watchtower.direct_http import open_direct
from watchtower.supervisor.alert_contract import (CRASH_LOOP, GROUP_FAILED, GROUP_FAILED_WINDOW_S, PAGED_REASONS,
                                                  REWIND_FAILED, REWIND_WINDOW_S, REWOUND, SPARES_EXHAUSTED, AlertSpec)
from watchtower.supervisor.policy_types import Failure

log = logging.getLogger("watchtower.supervisor")

POST_TIMEOUT_S = 2.0
RESEND_S = 30.0
TTL_S = 120.0
RETRY_S = 5.0


def rfc3339(t: float) -> str:
    """Alertmanager's time format, UTC, milliseconds.

    >>> rfc3339(0.0)
    '1970-01-01T00:00:00.000Z'
    """
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class NoAlerts:
    """The stand-in when no alertmanager_url is set: every call does nothing."""

    def fire(self, spec: AlertSpec, now: float, labels: dict[str, str], description: str = "",
             ends_at: float | None = None) -> None:
        pass

    def resolve(self, spec: AlertSpec, now: float, labels: dict[str, str]) -> None:
        pass

    def active(self, spec: AlertSpec, labels: dict[str, str]) -> bool:
        return False

    def poll(self, now: float) -> None:
        pass

    def close(self, timeout_s: float = POST_TIMEOUT_S) -> None:
        pass


class DirectAlerts(NoAlerts):
    """Posts to `url` (Alertmanager's base URL); `on_error(stage, err)` counts a failed post.

    `generator_url` is what the page links back to (the supervisor's /metrics, or empty)."""

    def __init__(self, url: str, on_error: Callable[[str, BaseException], None], generator_url: str = ""):
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.on_error, self.generator_url = on_error, generator_url
        self._alerts: dict[tuple, dict] = {}  # by label set: the JSON body, its next post, ongoing or not
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[dict] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._post_forever, name="alertmanager", daemon=True)
        self._thread.start()

    def fire(self, spec: AlertSpec, now: float, labels: dict[str, str], description: str = "",
             ends_at: float | None = None) -> None:
        """Raise (or refresh) an alert; `ends_at` None: it holds until `resolve`."""
        full = spec.labels(**labels)
        key = tuple(sorted(full.items()))
        with self._lock:
            old = self._alerts.get(key)
            ongoing = old is not None and (old["ends_at"] is None or old["ends_at"] > now)
            starts = old["alert"]["startsAt"] if ongoing else rfc3339(now)
            annotations = {**spec.annotations(full), **({"description": description} if description else {})}
            self._alerts[key] = {"alert": {"labels": full, "annotations": annotations, "startsAt": starts,
                                           "generatorURL": self.generator_url}, "ends_at": ends_at, "next": 0.0,
                                 "expires": ends_at is not None}  # ends by itself: never posted resolved
        self.poll(now)

    def resolve(self, spec: AlertSpec, now: float, labels: dict[str, str]) -> None:
        key = tuple(sorted(spec.labels(**labels).items()))
        with self._lock:
            if key in self._alerts:
                self._alerts[key].update(ends_at=now, next=0.0, expires=False)
        self.poll(now)

    def active(self, spec: AlertSpec, labels: dict[str, str]) -> bool:
        with self._lock:
            entry = self._alerts.get(tuple(sorted(spec.labels(**labels).items())))
            return entry is not None and (entry["ends_at"] is None or entry["ends_at"] > time.time())

    def poll(self, now: float) -> None:
        """Queue every alert due for a post (new, changed, ongoing past RESEND_S, failed past RETRY_S);
        forget ended ones once their end was posted."""
        due = []
        with self._lock:
            for key, entry in list(self._alerts.items()):
                if entry["expires"] and entry["ends_at"] <= now:
                    del self._alerts[key]  # Alertmanager ends it at the endsAt it was posted with
                    continue
                if now < entry["next"]:
                    continue
                ends = entry["ends_at"] if entry["ends_at"] is not None else now + TTL_S
                due.append({**entry["alert"], "endsAt": rfc3339(ends)})
                entry["next"] = now + RESEND_S
                if entry["ends_at"] is not None and entry["ends_at"] <= now:
                    del self._alerts[key]  # its end is in this post
                elif entry["ends_at"] is not None:
                    entry["next"] = entry["ends_at"]  # nothing to refresh until it ends
        if due:
            self._queue.put(due)

    def close(self, timeout_s: float = POST_TIMEOUT_S) -> None:
        """Let queued posts go out (at most `timeout_s`, so a crash-loop page leaves before we exit)."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _post_forever(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                request = urllib.request.Request(self.endpoint, data=json.dumps(batch).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                with open_direct(request, timeout=POST_TIMEOUT_S) as response:
                    response.read()
            except Exception as err:  # noqa: BLE001 - counted; the alert is posted again
                self.on_error("alertmanager", err)
                self._retry(batch)

    def _retry(self, batch: list[dict]) -> None:
        with self._lock:
            for alert in batch:
                entry = self._alerts.get(tuple(sorted(alert["labels"].items())))
                if entry is not None:
                    entry["next"] = min(entry["next"], time.time() + RETRY_S)


def direct_alerts(url: str, on_error: Callable[[str, BaseException], None], generator_url: str = "") -> NoAlerts:
    """DirectAlerts for a URL, the do-nothing stand-in for none."""
    return DirectAlerts(url, on_error, generator_url) if url else NoAlerts()


class SupervisorPages:
    """Which of the supervisor's moments page, with which labels (`alert_contract.py`); the executor
    calls it beside each event, the loop calls `poll` once per poll. `alerts`: where they go."""

    def __init__(self, run: str, spare_groups: int, alerts: NoAlerts):
        self.run, self.spare_groups, self.alerts = run, spare_groups, alerts

    def group_failed(self, failure: Failure, message: str) -> None:
        """A death, hang or node loss: firing for the rule's window, the event as description. Every
        failure of a paged reason, as the rule pages it from watchtower_supervisor_failures_total (which
        counts them all): one excused by a Lighthouse outage is not counted toward the failure budget,
        but the rule pages it all the same, so a direct path that skipped it only made that page late."""
        if failure.kind.value in PAGED_REASONS:
            self.alerts.fire(GROUP_FAILED, failure.at, {"run": self.run, "reason": failure.kind.value}, message,
                             ends_at=failure.at + GROUP_FAILED_WINDOW_S)

    def spares_exhausted(self, now: float, message: str) -> None:
        if self.spare_groups > 0:  # as the rule: a job without spares is not short of them
            self.alerts.fire(SPARES_EXHAUSTED, now, {"run": self.run}, message)

    def crash_loop(self, now: float, message: str) -> None:
        self.alerts.fire(CRASH_LOOP, now, {"run": self.run}, message)

    def rewound(self, now: float, message: str) -> None:
        """A loss-spike rewind: every group restarted from an earlier checkpoint, data skipped (the
        `rewind` event as description); firing for the rule's window, as a group failure."""
        self.alerts.fire(REWOUND, now, {"run": self.run}, message, ends_at=now + REWIND_WINDOW_S)

    def rewind_failed(self, now: float, message: str) -> None:
        """A rewind that failed: the job stops (exit 6); the `rewind_failed` event as description."""
        self.alerts.fire(REWIND_FAILED, now, {"run": self.run}, message, ends_at=now + REWIND_WINDOW_S)

    def poll(self, now: float, short_of_nodes: bool) -> None:
        """Resolve spares exhausted once the pool is full again; post what is due."""
        if not short_of_nodes and self.alerts.active(SPARES_EXHAUSTED, {"run": self.run}):
            self.alerts.resolve(SPARES_EXHAUSTED, now, {"run": self.run})
        self.alerts.poll(now)
