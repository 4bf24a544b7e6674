"""Emit: the supervisor's /metrics (a snapshot taken by the loop) and its Prometheus file_sd targets.

The loop builds an immutable `Snapshot` at the end of every poll and swaps it in with one reference
assignment; `SupervisorCollector.collect()` (prometheus-client's HTTP thread) reads that reference
once, so a scrape never iterates groups the loop is mutating. `JobStats` keeps the running figures
(failures by kind, restarts, recovery time, goodput) that only the loop updates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from watchtower.exposition import Families
from watchtower.prometheus_config import Target, write_file_sd
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.observe import SCRAPE_INTERVAL_S, Group
from watchtower.supervisor.policy_types import Failure, FailureKind, NodeState

RESTART_KINDS = ("spare", "checkpoint", "lighthouse")


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics shows, as of the loop's last poll (`at`)."""

    run: str
    at: float
    groups: dict[str, int] = field(default_factory=dict)  # active / spare / starting
    nodes: dict[str, int] = field(default_factory=dict)  # NodeState value -> count
    failures: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    participants: int = 0
    active_target: int = 0
    spare_target: int = 0
    job_step: int = 0
    goodput: float = 0.0
    crash_loop: bool = False
    lighthouse_up: bool = True


class SupervisorCollector:
    """prometheus-client Collector: the latest snapshot, read once per scrape."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot  # replaced whole by the loop; never mutated

    def collect(self):
        s = self.snapshot
        f = Families((s.run,))
        for state, n in s.groups.items():
            f.add("watchtower_supervisor_groups", n, state)
        for state, n in s.nodes.items():
            f.add("watchtower_supervisor_nodes", n, state)
        f.add("watchtower_supervisor_spares_available", s.groups.get("spare", 0))
        f.add("watchtower_supervisor_free_nodes", s.nodes.get(NodeState.FREE.value, 0))
        for reason, n in s.failures.items():
            f.add("watchtower_supervisor_failures_total", n, reason)
        for kind, n in s.restarts.items():
            f.add("watchtower_supervisor_restarts_total", n, kind)
        for stage, n in s.errors.items():
            f.add("watchtower_supervisor_errors_total", n, stage)
        f.add("watchtower_supervisor_recovery_seconds", s.recovery_s)
        f.add("watchtower_supervisor_quorum_participants", s.participants)
        f.add("watchtower_supervisor_active_groups_target", s.active_target)
        f.add("watchtower_supervisor_spare_groups_target", s.spare_target)
        f.add("watchtower_supervisor_job_step", s.job_step)
        f.add("watchtower_supervisor_goodput_ratio", s.goodput)
        f.add("watchtower_supervisor_crash_loop", int(s.crash_loop))
        f.add("watchtower_supervisor_lighthouse_up", int(s.lighthouse_up))
        f.add("watchtower_supervisor_heartbeat_timestamp_seconds", s.at)
        return list(f.families.values())


class JobStats:
    """Running figures of the job, updated by the loop: failures, restarts, recovery, goodput.

    recovery: from a failure until every active seat is filled again by a group that participates
    with a full quorum and the job's step has moved on; spares refilled: until the newest spare has
    finished a step (it joined the quorum and healed).
    """

    def __init__(self, started: float, active_target: int):
        self.started, self.active_target = started, active_target
        self.failures: Counter[str] = Counter({kind.value: 0 for kind in FailureKind})
        self.restarts: Counter[str] = Counter({kind: 0 for kind in RESTART_KINDS})
        self.recovery_s: float | None = None
        self.productive_s = 0.0
        self.crash_loop = False
        self.job_step = 0  # highest step any group finished (the last step once a group finishes)
        self._recovering_since: float | None = None
        self._step_at_failure = 0
        self._refill_since: float | None = None
        self._refill_group: str | None = None
        self._last_step, self._last_step_at = 0, started

    def failed(self, failure: Failure, job_step: int) -> None:
        """Count it; a lost group starts the recovery clock (a failed launch lost nothing that ran)."""
        self.failures[failure.kind.value] += 1
        if self._recovering_since is None and failure.kind is not FailureKind.LAUNCH:
            self._recovering_since, self._step_at_failure = failure.at, job_step

    def refilling(self, replica_id: str, now: float) -> None:
        self.restarts["spare"] += 1
        self._refill_since = self._refill_since or now
        self._refill_group = replica_id

    def track(self, now: float, groups: dict[str, Group], job_step: int, events: EventLog) -> None:
        if job_step > self._last_step > 0:  # the job moved since the last poll
            self.productive_s += min(now - self._last_step_at, 2 * SCRAPE_INTERVAL_S)
        if job_step != self._last_step:
            self._last_step, self._last_step_at = job_step, now
        active = [g for g in groups.values() if g.running and g.participating]
        if self._recovering_since is not None and len(active) >= self.active_target \
                and all(g.participants >= self.active_target for g in active) and job_step > self._step_at_failure:
            self.recovery_s = now - self._recovering_since
            self._recovering_since = None
            events.emit("recovered", f"quorum back at {self.active_target} groups after {self.recovery_s:.1f}s",
                        seconds=round(self.recovery_s, 3), step=job_step)
        newest = groups.get(self._refill_group or "")
        if self._refill_since is not None and newest is not None and newest.running \
                and newest.heartbeat is not None and newest.heartbeat > newest.launched_at:
            events.emit("spares_refilled", f"spare pool full again after {now - self._refill_since:.1f}s",
                        seconds=round(now - self._refill_since, 3))
            self._refill_since = self._refill_group = None

    def goodput(self, now: float) -> float:
        return min(self.productive_s / max(now - self.started, 1e-9), 1.0)


def write_rank_targets(out: Path, run: str, groups: dict[str, Group]) -> None:
    """Rewrite the ranks' file_sd file (atomic, 0644): every rank of every running group."""
    write_file_sd(out / "targets.json", [Target(f"127.0.0.1:{port}", run, g.replica_group, rank, g.node)
                                         for g in groups.values() if g.running for rank, port in enumerate(g.ports)])


def write_supervisor_target(out: Path, run: str, port: int | None) -> None:
    """The supervisor's own file_sd file; empty (port None) once it stops, so a finished job does not
    page as "supervisor down"."""
    write_file_sd(out / "supervisor_targets.json",
                  [Target(f"127.0.0.1:{port}", run, -1, -1, "supervisor")] if port else [])
