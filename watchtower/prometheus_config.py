"""A ready Prometheus config for a Watchtower job, and the file_sd target file it reads.

Prometheus reads YAML; JSON is valid YAML, so both files are written with the standard library.
Ranks are found through file_sd (the supervisor rewrites the file as groups come and go; Prometheus
picks it up at once through inotify), so the config itself never changes during a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from watchtower import shipped
from watchtower.atomic_write import write_atomic

RANK_JOB = "watchtower-ranks"
SUPERVISOR_JOB = "watchtower-supervisor"


@dataclass(frozen=True)
class Target:
    address: str  # host:port of a /metrics endpoint
    run: str
    replica_group: int
    rank: int
    node: str


def write_file_sd(path: str | Path, targets: list[Target]) -> None:
    """Write the target file atomically (temp file + rename) so Prometheus never reads half of it,
    mode 0644 so a Prometheus running as its own user can read it."""
    entries = [{"targets": [t.address], "labels": {"run": t.run, "replica_group": str(t.replica_group),
                                                    "rank": str(t.rank), "node": t.node}} for t in targets]
    write_atomic(path, json.dumps(entries, indent=1))


def render_prometheus_config(targets_file: str, alertmanager: str | None, rule_files: list[str] | None = None,
                             scrape_interval: str = "15s", evaluation_interval: str = "15s",
                             supervisor_targets_file: str | None = None) -> str:
    rule_files = rule_files if rule_files is not None else [str(shipped.rules_file())]
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": rule_files,
        "scrape_configs": [{"job_name": job, "file_sd_configs": [{"files": [path]}],
                            "scrape_timeout": min_duration(scrape_interval, "10s")}  # must not exceed the interval
                           for job, path in ((RANK_JOB, targets_file), (SUPERVISOR_JOB, supervisor_targets_file))
                           if path],
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return json.dumps(config, indent=2) + "\n"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(f"not a Prometheus duration: {duration!r} (e.g. 15s, 1m)")


def min_duration(a: str, b: str) -> str:
    return a if _seconds(a) <= _seconds(b) else b
