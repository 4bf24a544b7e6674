"""Emit: the supervisor's /metrics (a snapshot taken by the loop) and its Prometheus file_sd targets.

The loop builds an immutable `Snapshot` at the end of every poll and swaps it in with one reference
assignment; `SupervisorCollector.collect()` (prometheus-client's HTTP thread) reads that reference
once, so a scrape never iterates groups the loop is mutating. `JobStats` keeps the running figures
(failures by kind, restarts, recovery time, goodput and badput by cause) that only the loop updates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from watchtower.exposition import Families
from watchtower.prometheus_config import Target, write_file_sd
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.goodput import BADPUT
from watchtower.supervisor.observe import Group
from watchtower.supervisor.policy_types import Failure, FailureKind, NodeState
from watchtower.supervisor.timeline import Timeline

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
    badput: dict[str, float] = field(default_factory=dict)  # cause -> seconds
    remediations: dict[str, int] = field(default_factory=dict)  # action (rewind, page) -> count


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
        f.add("watchtower_goodput_ratio", s.goodput)
        for cause, seconds in s.badput.items():
            f.add("watchtower_badput_seconds_total", seconds, cause)
        for action, n in s.remediations.items():
            f.add("watchtower_remediations_total", n, action)
        f.add("watchtower_supervisor_crash_loop", int(s.crash_loop))
        f.add("watchtower_supervisor_lighthouse_up", int(s.lighthouse_up))
        f.add("watchtower_supervisor_heartbeat_timestamp_seconds", s.at)
        return list(f.families.values())


def group_roles(live: list[Group]) -> dict[str, int]:
    """Running groups by role, for `watchtower_supervisor_groups` (every role, 0 included)."""
    return {"active": sum(1 for g in live if g.participating),
            "spare": sum(1 for g in live if g.participating is False),
            "starting": sum(1 for g in live if g.participating is None)}


def node_counts(states: Iterable[NodeState]) -> dict[str, int]:
    """Nodes by NodeState value, for `watchtower_supervisor_nodes` (every state, 0 included)."""
    nodes = {state: 0 for state in ("busy", "free", "draining", "drained", "down")}
    for state in states:
        nodes[state.value] += 1
    return nodes


class JobStats:
    """Running figures of the job, updated by the loop: failures, restarts, and (in `timeline`, see
    timeline.py) recovery, refills, incidents and the goodput ledger.

    recovery: from a failure until every active seat is filled again by a group that participates
    with a full quorum and has committed a step since; spares refilled: until the newest spare has
    finished a step (it joined the quorum and healed).
    """

    def __init__(self, started: float, active_target: int, last_step: int):
        self.started, self.active_target = started, active_target
        self.failures: Counter[str] = Counter({kind.value: 0 for kind in FailureKind})  # every loss, by kind
        self.counted = 0  # the failures the budget counts: what the summary calls failures
        self.planned_drains = 0  # operators' drains: losses, never failures
        self.restarts: Counter[str] = Counter({kind: 0 for kind in RESTART_KINDS})
        self.remediations: Counter[str] = Counter({"rewind": 0, "page": 0, "rewind_failed": 0})  # loss spikes agreed on
        self.timeline = Timeline(started, active_target, last_step)
        self.crash_loop = False
        self.job_step = 0  # highest step any group finished (the last step once a group finishes)

    @property
    def recovery_s(self) -> float | None:
        return self.timeline.recovery_s

    def summary(self) -> dict:
        """failures: those the budget counts (a planned drain or a quorum timeout the Lighthouse's
        outage excused is not one); planned drains apart."""
        return {"steps": self.job_step, "failures": self.counted,
                "planned_drains": self.planned_drains, "restarts": dict(self.restarts),
                "recovery_seconds": None if self.recovery_s is None else round(self.recovery_s, 2),
                "goodput_ratio": round(self.goodput(), 3), "crash_loop": self.crash_loop,
                "wall_seconds": round(self.timeline.ledger.wall_s, 2),
                "breakdown_seconds": {c: round(s, 2) for c, s in self.timeline.breakdown().items()}}

    def failed(self, failure: Failure, job_step: int, onset: float | None = None,
               groups: dict[str, Group] | None = None) -> None:
        """Count it; a lost group opens or joins an incident (a failed launch lost nothing that ran).
        `onset`: when it began (a hang: its last sign of life); None: since the previous poll."""
        self.failures[failure.kind.value] += 1
        self.counted += failure.counted
        self.planned_drains += failure.kind is FailureKind.DRAINED
        if failure.kind is not FailureKind.LAUNCH:
            self.timeline.failed(failure, onset, groups or {})

    def lighthouse_outage(self) -> None:
        """One counted failure per outage (the policy's own record of it has no group to report)."""
        self.failures[FailureKind.LIGHTHOUSE.value] += 1
        self.counted += 1

    def refilling(self, replica_id: str, now: float) -> None:
        self.restarts["spare"] += 1
        self.timeline.refilling(replica_id, now)

    def track(self, now: float, groups: dict[str, Group], job_step: int, events: EventLog) -> None:
        self.timeline.track(now, groups, events)

    def goodput(self) -> float:
        return self.timeline.ledger.goodput_ratio()

    def badput(self) -> dict[str, float]:
        return {c.value: self.timeline.ledger.seconds[c] for c in BADPUT}


def write_rank_targets(out: Path, run: str, groups: dict[str, Group]) -> None:
    """Rewrite the ranks' file_sd file (atomic, 0644): every rank of every running group."""
    write_file_sd(out / "targets.json", [Target(f"{g.process.address}:{port}", run, g.replica_group, rank, g.node)
                                         for g in groups.values() if g.running for rank, port in enumerate(g.ports)])


def write_supervisor_target(out: Path, run: str, port: int | None, host: str = "127.0.0.1") -> None:
    """The supervisor's own file_sd file (`host`: where Prometheus reaches this process); empty (port
    None) once it stops, so a finished job does not page as "supervisor down"."""
    write_file_sd(out / "supervisor_targets.json",
                  [Target(f"{host}:{port}", run, -1, -1, "supervisor")] if port else [])
