"""Execute: the policy's actions, in order, each on its own, and the events they leave.

An action that raises (a Lighthouse that cannot rebind, a kill that fails) is counted under its
stage and skipped; the policy sees the result at the next poll (the Lighthouse still down) and
orders it again. A launch that raises (a launcher that cannot fork, a full disk under the group's
launch config) is a fact instead: kept in `launch_failures` for the next poll's `View`, where the
policy blames the node and spends the failure budget (a retry on the same node every poll would
spin forever). Records (`GroupFailed`, `SparesExhausted`, ...) become events and counters only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.contract import ReplicaConfig, group_config, write_group_config
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.launcher import GroupSpec, Launcher
from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.observe import Group
from watchtower.supervisor.policy_types import (
    EXIT_CRASH_LOOP, EXIT_DONE, Action, DrainNode, DrainRejected, Failure, FailureKind, GroupFailed, GroupFinished,
    Kill, Launch, LaunchFailure, LaunchReason, NodeUnhealthy, RestartFromCheckpoint, RestartLighthouse, SparesExhausted, Stop)

LOG_TAIL_LINES = 5


def one_line(err: BaseException) -> str:
    """An error as one line for an event: its type and the first line of its message.

    >>> one_line(OSError(28, "No space left on device"))
    'OSError: [Errno 28] No space left on device'
    """
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def failure_onset(f: Failure, group: Group | None) -> float | None:
    """When a loss began: a hung group's last sign of life (step, progress report or launch); None for
    the others (an exit, a node down, a drain), which the loop saw within one poll interval."""
    if group is None or f.kind not in (FailureKind.HANG, FailureKind.DEADLOCK):
        return None
    return max(t for t in (group.launched_at, group.heartbeat, group.progress_at) if t is not None)


def first_free_seq(groups_dir: Path) -> int:
    """The next group number: after every `gNNNN` directory already there, so a supervisor resuming
    a job after a dead one never reuses a group's directory (its logs, endpoint files)."""
    taken = [int(p.name[1:]) for p in groups_dir.glob("g*") if p.name[1:].isdigit()] if groups_dir.is_dir() else []
    return max(taken, default=-1) + 1


class Executor:
    """Carries out actions against the launcher, the Lighthouse and the group table it shares with
    the loop. `trainer` is the resolved trainer config (`TrainConfig.to_dict()`)."""

    def __init__(self, job: JobConfig, trainer: dict[str, Any], checkpoint_url: str, launcher: Launcher,
                 lighthouse: Callable[[], Lighthouse], groups: dict[str, Group], events: EventLog, stats: JobStats,
                 errors: StageErrors):
        self.job, self.trainer, self.checkpoint_url = job, trainer, checkpoint_url
        self.launcher, self.lighthouse, self.groups = launcher, lighthouse, groups
        self.events, self.stats, self.errors = events, stats, errors
        self.out = job.job.output_path
        self.seq = first_free_seq(self.out / "groups")
        self.node_index = {n: i for i, n in enumerate(job.cluster.nodes)}
        self.launch_failures: list[LaunchFailure] = []  # for the next View; the loop takes them
        self._do = {Launch: ("launch", self.launch), Kill: ("kill", self.kill),
                    RestartLighthouse: ("lighthouse", self.restart_lighthouse), DrainNode: ("events", self.drained),
                    RestartFromCheckpoint: ("events", self.restart_from_checkpoint),
                    GroupFailed: ("events", self.failed), GroupFinished: ("events", self.finished),
                    SparesExhausted: ("events", self.spares_exhausted),
                    DrainRejected: ("events", self.drain_rejected),
                    NodeUnhealthy: ("events", self.node_unhealthy)}

    def run(self, actions: list[Action], now: float) -> int | None:
        """Execute in order; returns the exit code of a `Stop`, else None."""
        for action in actions:
            if isinstance(action, Stop):
                self.stop(action)
                return action.code
            stage, do = self._do[type(action)]
            with self.errors.guard(stage):
                do(action, now)
        return None

    # ---- actions --------------------------------------------------------------------------------

    def launch(self, a: Launch, now: float) -> None:
        seq = self.seq
        self.seq += 1  # taken even if this launch fails half-way: a directory may already exist
        replica_id = f"g{seq:04d}"  # torchft ranks groups by id: later groups sort last and start as spares
        try:
            self._start(a, seq, replica_id)
        except Exception as err:  # noqa: BLE001 - whatever stopped it, the policy must see the node fail
            self.launch_failures.append(LaunchFailure(replica_id, a.node, time.time(), one_line(err)))

    def _start(self, a: Launch, seq: int, replica_id: str) -> None:
        group_dir = self.out / "groups" / replica_id
        s = self.job.supervisor
        replica = ReplicaConfig(lighthouse=self.lighthouse().url, replica_id=replica_id, replica_group=seq,
                                active_groups=self.job.cluster.active_groups, node=a.node,
                                cache_dir=str(self.launcher.node_cache_dir(a.node)), ft_timeout_s=s.ft_timeout_s)
        port = s.base_port + 10 * self.node_index[a.node]
        config = write_group_config(group_dir,
                                    group_config(self.trainer, replica, group_dir, port, self.checkpoint_url))
        process = self.launcher.launch(GroupSpec(replica_id, seq, a.node, config, group_dir / "group.log"))
        # the real start time, after the poll's `now`: a group launched in the poll that saw a failure
        # started after it (the failure budget's "same failure on fresh nodes" chain relies on it)
        launched_at = time.time()
        self.groups[replica_id] = Group(process, launched_at)
        if a.reason is LaunchReason.SPARE:
            self.stats.refilling(replica_id, launched_at)
        self.events.emit("group_started", f"{replica_id} started on {a.node} as {a.role.value} ({a.reason.value})",
                         replica_id=replica_id, node=a.node, reason=a.reason.value, role=a.role.value,
                         replica_group=seq, pid=process.pid, config=str(config))

    def kill(self, a: Kill, now: float) -> None:
        self.groups[a.replica_id].process.kill()
        self.stats.timeline.killed(a.replica_id, time.time())

    def restart_lighthouse(self, a: RestartLighthouse, now: float) -> None:
        lighthouse = self.lighthouse()
        self.stats.failures[FailureKind.LIGHTHOUSE.value] += 1
        lighthouse.restart()
        self.stats.restarts["lighthouse"] += 1
        self.events.emit("lighthouse_restarted", f"the Lighthouse stopped answering; restarted on {lighthouse.url}; "
                         f"group failures in the next {self.job.supervisor.lighthouse_grace_s:g}s blame no node",
                         url=lighthouse.url)

    def stop(self, a: Stop) -> None:
        if a.code == EXIT_DONE:
            self.events.emit("job_finished", a.message, step=self.stats.job_step)
            return
        self.stats.crash_loop = a.code == EXIT_CRASH_LOOP
        self.events.emit("job_stopped", a.message, exit_code=a.code)

    # ---- records: events and counters ---------------------------------------------------------

    def failed(self, a: GroupFailed, now: float) -> None:
        f = a.failure
        group = self.groups.get(f.replica_id)
        self.stats.failed(f, self.stats.job_step, failure_onset(f, group), self.groups)
        code = "" if f.exit_code is None else f", exit code {f.exit_code}"
        code += f": {f.detail}" if f.detail else ""
        verdict = "node drained" if f.blamed else "node kept" + ("" if f.counted else ", not counted")
        self.events.emit("group_failed", f"{f.replica_id} on {f.node} failed ({f.kind.value}{code}) at step {f.step}; "
                         f"{verdict}", replica_id=f.replica_id, node=f.node, reason=f.kind.value,
                         exit_code=f.exit_code, step=f.step, drained=f.blamed, counted=f.counted,
                         log_tail=group.process.log_tail(LOG_TAIL_LINES) if group else [],
                         **({"error": f.detail} if f.detail else {}))

    def drained(self, a: DrainNode, now: float) -> None:
        self.events.emit("node_drained", f"{a.node} drained ({a.reason}): no new group starts there",
                         node=a.node, reason=a.reason)

    def restart_from_checkpoint(self, a: RestartFromCheckpoint, now: float) -> None:
        self.stats.restarts["checkpoint"] += 1
        self.stats.timeline.restarted(a.step)  # steps up to a.step are run again: recompute
        returned = f"; nodes given back: {', '.join(a.nodes_returned)}" if a.nodes_returned else ""
        self.events.emit("restart_from_checkpoint", f"every group holding the run's progress is lost at step {a.step}; restarting from the "
                         f"last checkpoint in {self.checkpoint_url}{returned}", step=a.step,
                         nodes_returned=list(a.nodes_returned))

    def finished(self, a: GroupFinished, now: float) -> None:
        self.events.emit("group_finished", f"{a.replica_id} on {a.node} reached the last step",
                         replica_id=a.replica_id, node=a.node)

    def spares_exhausted(self, a: SparesExhausted, now: float) -> None:
        self.events.emit("spares_exhausted", f"no free node to start {a.missing} more group(s) ({a.reason.value})",
                         reason=a.reason.value, missing=a.missing)

    def drain_rejected(self, a: DrainRejected, now: float) -> None:
        self.events.emit("drain_rejected", f"drain request {a.name!r} ignored: the name {a.why}", name=a.name,
                         why=a.why)

    def node_unhealthy(self, a: NodeUnhealthy, now: float) -> None:
        """Not a failure: no counter, no budget (health.py). `output`: the verdict, then the check's tail."""
        lines = a.output.splitlines() or ["no output"]
        self.events.emit("node_unhealthy", f"{a.node} failed its health check ({lines[0]}: {lines[-1]}): "
                         "no group starts there for the rest of the job", node=a.node, output=a.output)
