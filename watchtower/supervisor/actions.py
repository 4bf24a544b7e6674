"""Execute: the policy's actions, in order, each on its own, and the events they leave.

An action that raises (a Lighthouse that cannot rebind, a kill that fails) is counted under its
stage and skipped; the policy sees the result at the next poll (the Lighthouse still down) and
orders it again. A launch that fails is a fact instead, kept in `launch_failures` for the next
poll's `View`, with its owner: the launcher failing on the node (cannot fork, srun refused) blames
the node and spends the failure budget (a retry on the same node every poll would spin forever);
the head failing to prepare it (a full disk under the group's launch config) is the supervisor's
own error, counted under stage "launch" and retried at the next poll on the same node, no node
blamed. Records (`GroupFailed`, `SparesExhausted`, ...) become events and counters only.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.contract import ReplicaConfig, group_config, write_group_config
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.direct_alerts import SupervisorPages, direct_alerts
from watchtower.supervisor.forensics import Forensics, Incident
from watchtower.supervisor.launcher import GroupSpec, Launcher
from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.observe import Group
from watchtower.supervisor.policy_types import (
    EXIT_CRASH_LOOP, EXIT_DONE, EXIT_LIGHTHOUSE, Action, Capture, DrainNode, DrainRejected, Failure, FailureKind,
    GroupFailed, GroupFinished, Kill, Launch, LaunchFailure, LaunchReason, NodeUnhealthy, RestartFromCheckpoint,
    RestartLighthouse, SparesExhausted, Stop)

log = logging.getLogger("watchtower.supervisor")

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


def incident_fields(incident: Incident | None) -> dict[str, Any]:
    """What a group_failed event says of its incident: where it is, the culprit rank and frame."""
    if incident is None:
        return {}
    return {"incident": str(incident.path), "culprit_rank": incident.rank, "stuck_in": incident.frame,
            "capture_seconds": incident.seconds}


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
        self._head_errors: set[object] = set()  # the distinct errors preparing a launch, each reported once
        self.lighthouse_error = ""  # the last failed Lighthouse restart's, for a stop that gives up on it
        self.forensics = Forensics(self.out, int(trainer["train"]["tp"]), job.supervisor.capture_timeout_s)
        self.incidents: dict[str, Incident] = {}  # replica_id → its incident, until its group_failed event
        self._captures: list[Capture] = []
        self.pages = SupervisorPages(job.job.name, job.cluster.spare_groups,
                                     direct_alerts(job.supervisor.alertmanager_url, errors.record))
        self._do = {Launch: ("launch", self.launch), Capture: ("capture", self.capture), Kill: ("kill", self.kill),
                    RestartLighthouse: ("lighthouse", self.restart_lighthouse), DrainNode: ("events", self.drained),
                    RestartFromCheckpoint: ("events", self.restart_from_checkpoint),
                    GroupFailed: ("events", self.failed), GroupFinished: ("events", self.finished),
                    SparesExhausted: ("events", self.spares_exhausted),
                    DrainRejected: ("events", self.drain_rejected),
                    NodeUnhealthy: ("events", self.node_unhealthy)}

    def run(self, actions: list[Action], now: float) -> int | None:
        """Execute in order; returns the exit code of a `Stop`, else None."""
        self._captures = [a for a in actions if isinstance(a, Capture)]
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
        """Prepare the group on the head (its directory and launch config), then have the launcher
        start it on the node. Only the launcher failing is the node's fault; a failed preparation
        (ENOSPC on the supervisor's disk) leaves nothing behind and keeps its id for the retry, so
        a full disk retried every poll costs a mkdir and an rmtree, not a directory per poll."""
        while (self.out / "groups" / f"g{self.seq:04d}").exists():  # not ours (ours advance seq): never reuse
            self.seq += 1
        seq, replica_id = self.seq, f"g{self.seq:04d}"  # torchft ranks groups by id: later ones start as spares
        group_dir = self.out / "groups" / replica_id
        try:
            config = self._prepare(a, seq, replica_id, group_dir)
        except Exception as err:  # noqa: BLE001 - the head's own I/O: no node to blame
            shutil.rmtree(group_dir, ignore_errors=True)
            self._head_failed(a, replica_id, err)
            return
        self.seq += 1  # taken: the group's directory now holds its config (and will hold its log)
        try:
            process = self.launcher.launch(GroupSpec(replica_id, seq, a.node, config, group_dir / "group.log"))
        except Exception as err:  # noqa: BLE001 - whatever stopped it, the policy must see the node fail
            self.launch_failures.append(LaunchFailure(replica_id, a.node, time.time(), one_line(err)))
            return
        # the real start time, after the poll's `now`: a group launched in the poll that saw a failure
        # started after it (the failure budget's "same failure on fresh nodes" chain relies on it)
        launched_at = time.time()
        self.groups[replica_id] = Group(process, launched_at)
        if a.reason is LaunchReason.SPARE:
            self.stats.refilling(replica_id, launched_at)
        self.events.emit("group_started", f"{replica_id} started on {a.node} as {a.role.value} ({a.reason.value})",
                         replica_id=replica_id, node=a.node, reason=a.reason.value, role=a.role.value,
                         replica_group=seq, pid=process.pid, config=str(config))

    def _prepare(self, a: Launch, seq: int, replica_id: str, group_dir: Path) -> Path:
        """Write the group's launch config on the head; its path."""
        s = self.job.supervisor
        replica = ReplicaConfig(lighthouse=self.lighthouse().url, replica_id=replica_id, replica_group=seq,
                                active_groups=self.job.cluster.active_groups, node=a.node,
                                cache_dir=str(self.launcher.node_cache_dir(a.node)), ft_timeout_s=s.ft_timeout_s)
        port = s.base_port + 10 * self.node_index[a.node]
        return write_group_config(group_dir, group_config(self.trainer, replica, group_dir, port, self.checkpoint_url))

    def _head_failed(self, a: Launch, replica_id: str, err: Exception) -> None:
        """Counted under stage "launch" each time (errors_total shows the rate); reported as an event
        once per distinct error, so a disk full for an hour is one line, not one per poll."""
        self.errors.record("launch", err)
        self.launch_failures.append(LaunchFailure(replica_id, a.node, time.time(), one_line(err), on_node=False))
        distinct = (type(err).__name__, err.errno) if isinstance(err, OSError) and err.errno else one_line(err)
        if distinct not in self._head_errors:  # an OSError's text names a path that changes with each try
            self._head_errors.add(distinct)
            self.events.emit("launch_deferred", f"{replica_id} could not be prepared on the supervisor's side "
                             f"({one_line(err)}); retried every poll, no node blamed", replica_id=replica_id,
                             node=a.node, error=one_line(err))

    def capture(self, a: Capture, now: float) -> None:
        """The first Capture of a poll reads every ordered group at once (a deadlock orders several),
        so all their ranks share one deadline; the later ones find the work done."""
        orders, self._captures = [(c, self.groups[c.replica_id]) for c in self._captures], []
        self.incidents.update(self.forensics.capture(orders, now))

    def kill(self, a: Kill, now: float) -> None:
        self.groups[a.replica_id].process.kill()
        self.stats.timeline.killed(a.replica_id, time.time())

    def restart_lighthouse(self, a: RestartLighthouse, now: float) -> None:
        """The outage's first attempt counts its one failure; a restart that raises is counted under
        stage "lighthouse" and its error kept for the stop message if the policy gives up."""
        lighthouse = self.lighthouse()
        if a.attempt == 1:
            self.stats.lighthouse_outage()
        try:
            lighthouse.restart()
        except Exception as err:
            self.lighthouse_error = one_line(err)
            raise
        self.stats.restarts["lighthouse"] += 1
        self.events.emit("lighthouse_restarted", f"the Lighthouse stopped answering; restarted on {lighthouse.url}; "
                         f"group failures in the next {self.job.supervisor.lighthouse_grace_s:g}s blame no node",
                         url=lighthouse.url)

    def stop(self, a: Stop) -> None:
        if a.code == EXIT_DONE:
            self.events.emit("job_finished", a.message, step=self.stats.job_step)
            return
        self.stats.crash_loop = a.code == EXIT_CRASH_LOOP
        last = f"; last error: {self.lighthouse_error}" if a.code == EXIT_LIGHTHOUSE and self.lighthouse_error else ""
        self.events.emit("job_stopped", a.message + last, exit_code=a.code)
        if self.stats.crash_loop:
            self.pages.crash_loop(time.time(), a.message)

    # ---- records: events and counters ---------------------------------------------------------

    def failed(self, a: GroupFailed, now: float) -> None:
        f = a.failure
        group = self.groups.get(f.replica_id)
        self.stats.failed(f, self.stats.job_step, failure_onset(f, group), self.groups)
        code = "" if f.exit_code is None else f", exit code {f.exit_code}"
        code += f": {f.detail}" if f.detail else ""
        verdict = "node drained" if f.blamed else "node kept" + ("" if f.counted else ", not counted")
        incident = self.incidents.pop(f.replica_id, None)
        stuck = f"; {incident.verdict}" if incident else ""
        record = self.events.emit("group_failed", f"{f.replica_id} on {f.node} failed ({f.kind.value}{code}) at step {f.step}"
                         f"{stuck}; {verdict}", replica_id=f.replica_id, node=f.node, reason=f.kind.value,
                         exit_code=f.exit_code, step=f.step, drained=f.blamed, counted=f.counted,
                         log_tail=group.process.log_tail(LOG_TAIL_LINES) if group else [],
                         **({"error": f.detail} if f.detail else {}), **(incident_fields(incident)))
        self.pages.group_failed(f, record["message"])

    def drained(self, a: DrainNode, now: float) -> None:
        self.events.emit("node_drained", f"{a.node} drained ({a.reason}): no new group starts there",
                         node=a.node, reason=a.reason)
        refused = self.launcher.node_failed(a.node, a.reason, self.stats.job_step)
        if refused:  # excluded by the policy all the same: a warning, never a crash
            log.warning("%s: the launcher could not drain it: %s", a.node, refused)
            self.events.emit("node_drain_refused", f"{a.node} stays excluded, but the launcher could not drain "
                             f"it: {refused}", node=a.node, error=refused)

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
        record = self.events.emit("spares_exhausted", f"no free node to start {a.missing} more group(s) "
                                  f"({a.reason.value})", reason=a.reason.value, missing=a.missing)
        self.pages.spares_exhausted(now, record["message"])

    def drain_rejected(self, a: DrainRejected, now: float) -> None:
        self.events.emit("drain_rejected", f"drain request {a.name!r} ignored: the name {a.why}", name=a.name,
                         why=a.why)

    def node_unhealthy(self, a: NodeUnhealthy, now: float) -> None:
        """Not a failure: no counter, no budget (health.py). `output`: the verdict, then the check's tail."""
        lines = a.output.splitlines() or ["no output"]
        self.events.emit("node_unhealthy", f"{a.node} failed its health check ({lines[0]}: {lines[-1]}): "
                         "no group starts there for the rest of the job", node=a.node, output=a.output)
