"""Where the TUI's numbers come from: the ranks' own /metrics, or a Prometheus that scrapes them.

Both are polled from a worker thread and must never raise into the app: a target that does not answer
becomes a row marked down (with the labels it last had, or those its file_sd entry gives), and a
Prometheus or Alertmanager that does not answer becomes `Snapshot.error`.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from watchtower.direct_http import get_direct
from watchtower.tui.model import GOODPUT, GPU_GAUGES, RANK_GAUGES, RANK_KEY, Alert, Goodput, RankRow, Snapshot

HTTP_TIMEOUT_S = 2.0
EVENTS_SHOWN = 200


def _get(url: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class RankRows:
    """Per-rank rows from (metric name, labels, value) samples, whichever source they came from."""

    def __init__(self) -> None:
        self._rows: dict[tuple, tuple[RankRow, dict[str, list[float]]]] = {}

    def _entry(self, labels: dict[str, str], target: str):
        key = tuple(labels.get(k, "?") for k in RANK_KEY)
        if key not in self._rows:
            self._rows[key] = (RankRow(*key, target=target), {})
        return self._rows[key]

    def add(self, name: str, labels: dict[str, str], value: float, target: str) -> bool:
        """Fill a rank's column from one sample; False for a sample without the rank labels."""
        if not all(k in labels for k in RANK_KEY):
            return False
        row, gpu = self._entry(labels, target)
        if name in RANK_GAUGES:
            setattr(row, RANK_GAUGES[name], value)
        elif name in GPU_GAUGES:
            gpu.setdefault(name, []).append(value)
        return True

    def mark_down(self, labels: dict[str, str], target: str) -> None:
        self._entry(labels, target)[0].up = False

    def rows(self) -> list[RankRow]:
        out = []
        for row, gpu in self._rows.values():
            for name, values in gpu.items():
                column, reduce = GPU_GAUGES[name]
                setattr(row, column, reduce(values))
            out.append(row)
        return out


def read_events(path: Path | None) -> list[dict]:
    """The supervisor's events.jsonl, newest last; a torn last line (being written) is skipped."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines()[-EVENTS_SHOWN:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_targets(path: Path | None) -> dict[str, dict[str, str]]:
    """A file_sd file's targets and their labels; none while it is missing or being rewritten."""
    out: dict[str, dict[str, str]] = {}
    if path is not None and path.exists():
        try:
            for group in json.loads(path.read_text()):
                for t in group.get("targets", []):
                    out[t] = dict(group.get("labels", {}))
        except ValueError:
            pass  # being rewritten; the next poll reads it
    return out


def add_goodput(snap: Snapshot, name: str, labels: dict[str, str], value: float) -> None:
    if name in GOODPUT and "run" in labels:
        snap.goodput.setdefault(labels["run"], Goodput()).add(name, labels, value)


class ScrapeSource:
    """Scrapes each rank's /metrics directly: `targets` (host:port) and/or a file_sd `targets_file`
    re-read every poll, so ranks the supervisor adds or removes appear and go."""

    def __init__(self, targets: list[str] = (), targets_file: Path | None = None, events_file: Path | None = None):
        self.static = list(targets)
        self.targets_file = targets_file
        self.events_file = events_file
        self.known: dict[str, dict[str, str]] = {}  # target -> last labels seen, so a dead rank keeps its name
        self.pool = ThreadPoolExecutor(max_workers=8)
        parts = ([f"{len(self.static)} targets"] if self.static else []) + ([targets_file.name] if targets_file else [])
        self.describe = " + ".join(parts)

    def _targets(self) -> dict[str, dict[str, str]]:
        return {**{t: {} for t in self.static}, **read_targets(self.targets_file)}

    def _goodput(self, snap: Snapshot) -> None:
        """Each run's goodput from its supervisor's /metrics (supervisor_targets.json beside the
        ranks' file); a supervisor that does not answer leaves its run's line out."""
        if self.targets_file is None:
            return
        for target in read_targets(self.targets_file.parent / "supervisor_targets.json"):
            text = self._scrape(target)
            try:
                for family in text_string_to_metric_families(text or ""):
                    for sample in family.samples:
                        add_goodput(snap, sample.name, sample.labels, sample.value)
            except ValueError:
                continue  # not a Prometheus exposition

    def _scrape(self, target: str) -> str | None:
        try:
            return get_direct(f"http://{target}/metrics", HTTP_TIMEOUT_S).decode()  # our own endpoint: no proxy
        except Exception:  # noqa: BLE001 - refused, timeout, reset: all mean "down"
            return None

    @staticmethod
    def _down(target: str, labels: dict[str, str]) -> RankRow:
        """A rank that does not answer: its last labels, or (never seen) its address as the node."""
        defaults = {"run": "unreachable", "replica_group": "?", "rank": "?", "node": target}
        return RankRow(*(labels.get(k, defaults[k]) for k in RANK_KEY), target=target, up=False)

    def poll(self) -> Snapshot:
        now = time.time()
        targets = self._targets()
        snap = Snapshot(source=f"scrape {self.describe}")
        for target, text in zip(targets, self.pool.map(self._scrape, targets)):
            labels = {**self.known.get(target, {}), **targets[target]}
            if text is None:
                snap.rows.append(self._down(target, labels))
                continue
            rows = RankRows()
            try:
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if rows.add(sample.name, sample.labels, sample.value, target) and \
                                sample.name == "watchtower_detector_events_total" and sample.value > 0:
                            snap.alerts.append(Alert(
                                f"detector {sample.labels['detector']}", sample.labels.get("severity", ""),
                                f"{int(sample.value)} events on rank {sample.labels['rank']} of group "
                                f"{sample.labels['replica_group']}", dict(sample.labels)))
            except ValueError:  # not a Prometheus exposition: something else listens there
                snap.rows.append(self._down(target, labels))
                continue
            for row in rows.rows():
                snap.rows.append(row)
                self.known[target] = dict(zip(RANK_KEY, row.key))
        snap.events = read_events(self.events_file)
        self._goodput(snap)
        return snap.finish(now)


class PrometheusSource:
    """Reads the same numbers from Prometheus (instant queries), `up` for dead ranks, and the alerts
    from Alertmanager when given (what pages) or else from Prometheus's rule state."""

    def __init__(self, url: str, alertmanager: str | None = None, events_file: Path | None = None,
                 job: str = "watchtower-ranks"):
        self.url = url.rstrip("/")
        self.alertmanager = alertmanager.rstrip("/") if alertmanager else None
        self.events_file = events_file
        self.job = job
        self.describe = self.url

    def _query(self, promql: str) -> list[dict]:
        body = json.loads(_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
        if body.get("status") != "success":
            raise RuntimeError(body.get("error", "query failed"))
        return body["data"]["result"]

    def _alerts(self) -> list[Alert]:
        if self.alertmanager:
            raw = json.loads(_get(f"{self.alertmanager}/api/v2/alerts?active=true&silenced=false&inhibited=false"))
            return [Alert(a["labels"].get("alertname", "?"), a["labels"].get("severity", ""),
                          a.get("annotations", {}).get("summary", ""), a["labels"]) for a in raw]
        raw = json.loads(_get(f"{self.url}/api/v1/alerts"))["data"]["alerts"]
        return [Alert(a["labels"].get("alertname", "?"), a["labels"].get("severity", ""),
                      a.get("annotations", {}).get("summary", ""), a["labels"])
                for a in raw if a.get("state") == "firing"]

    def poll(self) -> Snapshot:
        now = time.time()
        snap = Snapshot(source=f"prometheus {self.url}")
        try:
            names = "|".join(list(RANK_GAUGES) + list(GPU_GAUGES))
            rows = RankRows()
            for series in self._query(f'{{__name__=~"{names}"}}'):
                labels = series["metric"]
                rows.add(labels["__name__"], labels, float(series["value"][1]), labels.get("instance", ""))
            for series in self._query(f'up{{job="{self.job}"}}'):
                if float(series["value"][1]) == 0:
                    rows.mark_down(series["metric"], series["metric"].get("instance", ""))
            snap.rows.extend(rows.rows())
            for series in self._query(f'{{__name__=~"{"|".join(GOODPUT)}"}}'):
                labels = series["metric"]
                add_goodput(snap, labels["__name__"], labels, float(series["value"][1]))
            snap.alerts = self._alerts()
        except Exception as err:  # noqa: BLE001 - shown in the status line, never raised into the app
            snap.error = f"{self.describe}: {err}"
        snap.events = read_events(self.events_file)
        return snap.finish(now)
