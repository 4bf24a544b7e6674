"""Execute: the policy's actions, in order, each on its own, and the events they leave.

An action that raises (a Lighthouse that cannot rebind, a kill that fails) is counted under its
stage and skipped; the policy sees the result at the next poll (the Lighthouse still down) and
orders it again. A launch that fails is a fact instead, kept in `launch_failures` for the next
poll's `View` with its owner, the node or the head (see launches.py). Records (`GroupFailed`,
`SparesExhausted`, ...) become events and counters only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.direct_alerts import SupervisorPages, direct_alerts
from watchtower.supervisor.forensics import Forensics, Incident
from watchtower.supervisor.launcher import Launcher
from watchtower.supervisor.launches import GroupStarter, one_line
from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.observe import Group
from watchtower.supervisor.policy_types import (
    EXIT_CRASH_LOOP, EXIT_DONE, EXIT_LIGHTHOUSE, EXIT_REWIND_FAILED, Action, Capture, DrainNode, DrainRejected,
    Failure, FailureKind, GroupFailed, GroupFinished, Kill, Launch, LaunchReason, NodeUnhealthy, RestartFromCheckpoint,
    RestartLighthouse, Rewind, RewindDeclined, SparesExhausted, Stop)
from watchtower.supervisor.rewind import (RECORD_FILE, Pending, RewindRecord, committed_steps, kept_words,
                                         pending_fix, restore_checkpoints, retire_checkpoints)

log = logging.getLogger("watchtower.supervisor")

LOG_TAIL_LINES = 5


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
        self.starter = GroupStarter(job, trainer, checkpoint_url, launcher, lighthouse, events, errors)
        self.launch_failures = self.starter.failures  # for the next View; the loop takes them
        self.lighthouse_error = ""  # the last failed Lighthouse restart's, for a stop that gives up on it
        self.forensics = Forensics(self.out, int(trainer["train"]["tp"]), job.supervisor.capture_timeout_s,
                                   local=job.cluster.launcher == "local")
        self.incidents: dict[str, Incident] = {}  # replica_id → its incident, until its group_failed event
        self._captures: list[Capture] = []
        # the rewinds of earlier supervisors of this run (rewind.py): their skips go on with every launch
        self.rewound = RewindRecord.load(self.out, job.job.name, checkpoint_url)
        self._carry_rewinds()
        self._halt: Stop | None = None  # a rewind that failed after its kills: the rest of the poll is not run
        self._recorded: Rewind | None = None  # the rewind `record_rewind` wrote to remediation.json
        self.pages = SupervisorPages(job.job.name, job.cluster.spare_groups,
                                     direct_alerts(job.supervisor.alertmanager_url, errors.record))
        self._do = {Launch: ("launch", self.launch), Capture: ("capture", self.capture), Kill: ("kill", self.kill),
                    RestartLighthouse: ("lighthouse", self.restart_lighthouse), DrainNode: ("events", self.drained),
                    RestartFromCheckpoint: ("events", self.restart_from_checkpoint),
                    GroupFailed: ("events", self.failed), GroupFinished: ("events", self.finished),
                    SparesExhausted: ("events", self.spares_exhausted),
                    DrainRejected: ("events", self.drain_rejected),
                    NodeUnhealthy: ("events", self.node_unhealthy), Rewind: ("rewind", self.rewind),
                    RewindDeclined: ("events", self.rewind_declined)}

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
            if self._halt is not None:  # no launch may follow a rewind that did not happen
                halt, self._halt = self._halt, None
                self.stop(halt)
                return halt.code
        return None

    def _carry_rewinds(self) -> None:
        """Apply the record's skips to every launch, said in an event (a person must be able to see
        why data is skipped); a window also in the config's own skip_steps is warned about, not merged
        (two equal windows from two rewinds are legitimate, and are both applied)."""
        if not self.rewound.rewinds:
            return
        own = list(self.trainer["data"].get("skip_steps", []))
        self.trainer["data"]["skip_steps"] = [*own, *self.rewound.skip_steps]
        twice = sorted(set(own) & set(self.rewound.skip_steps))
        also = (f"; {', '.join(twice)} is also in the config's data.skip_steps, so it is skipped twice: drop it "
                "from job.train_overrides" if twice else "")
        if twice:
            log.warning("remediation.json skip(s) %s also in data.skip_steps: skipped twice", twice)
        self.events.emit("rewinds_carried", f"{self.rewound.rewinds} rewind(s) of this run carried from "
                         f"{self.out / RECORD_FILE}: every launch skips {', '.join(self.rewound.skip_steps)}{also}",
                         rewinds=self.rewound.rewinds, skip_steps=list(self.rewound.skip_steps), duplicated=twice)

    # ---- actions --------------------------------------------------------------------------------

    def launch(self, a: Launch, now: float) -> None:
        """Start a group (launches.py: a failure is kept for the policy with its owner)."""
        started = self.starter.start(a)
        if started is None:
            return
        replica_id, seq, process, config = started
        # the real start time, after the poll's `now`: a group launched in the poll that saw a failure
        # started after it (the failure budget's "same failure on fresh nodes" chain relies on it)
        launched_at = time.time()
        self.groups[replica_id] = Group(process, launched_at)
        if a.reason is LaunchReason.SPARE:
            self.stats.refilling(replica_id, launched_at)
        warm = " from its standby" if process.warm else ""
        self.events.emit("group_started", f"{replica_id} started on {a.node}{warm} as {a.role.value} ({a.reason.value})",
                         replica_id=replica_id, node=a.node, reason=a.reason.value, role=a.role.value,
                         replica_group=seq, pid=process.pid, config=str(config), warm=process.warm,
                         standby_ready=process.standby_ready)

    def capture(self, a: Capture, now: float) -> None:
        """The first Capture of a poll reads every ordered group at once (a deadlock orders several),
        so all their ranks share one deadline; the later ones find the work done."""
        orders, self._captures = [(c, self.groups[c.replica_id]) for c in self._captures], []
        self.incidents.update(self.forensics.capture(orders, now))

    def kill(self, a: Kill, now: float) -> None:
        """The kill time is recorded even when the kill raises: a Slurm step's srun is dead by then
        (slurm.py: only the cancel's squeue failed), and the incident needs it."""
        try:
            self.groups[a.replica_id].process.kill()
        finally:
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
        left = self.launcher.node_failed(a.node, a.reason, self.stats.job_step)
        # excluded by the policy all the same: each part the launcher could not do is a warning, never a crash
        if left.cancel_error:
            log.warning("%s: our steps there could not be cancelled: %s", a.node, left.cancel_error)
            self.events.emit("node_steps_not_cancelled", f"{a.node}: steps of this job there may still run (they "
                             f"end with the job, or at their next quorum): {left.cancel_error}", node=a.node,
                             error=left.cancel_error)
        if left.drain_error:  # only a drain asked for ([slurm] drain_failed_nodes) and refused
            log.warning("%s: the launcher could not drain it: %s", a.node, left.drain_error)
            self.events.emit("node_drain_refused", f"{a.node} stays excluded, but the launcher could not drain "
                             f"it: {left.drain_error}", node=a.node, error=left.drain_error)

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

    # ---- loss-spike remediation (remediation.py) -------------------------------------------------------

    def record_rewind(self, actions: list[Action]) -> str:
        """Before any action of a poll that rewinds: write the rewind to remediation.json (durably), as
        pending (`rewind` marks it done), so a supervisor restarted at any later point neither forgets
        its skip nor resumes past a rewind half done (rewind.py). "" when written (or no rewind);
        else why not, and the shell has the policy decide again with the rewind refused (a declined
        rewind: it pages, no group is killed, no rewind spent). Cost: one small write, two fsyncs."""
        a = next((x for x in actions if isinstance(x, Rewind)), None)
        if a is None:
            return ""
        try:
            self.rewound.add(*self._window(a)).save(self.out)
        except Exception as err:
            self.errors.record("rewind", err)
            return (f"{self.out / RECORD_FILE} could not be written ({one_line(err)}), so it was not rewound: "
                    "free space or fix the permissions of the job's output_dir")
        self._recorded = a
        return ""

    @staticmethod
    def _window(a: Rewind) -> tuple[str, Pending]:
        """The skip range of `a` and its pending marker (rewind.py), as remediation.json holds them."""
        window = f"{a.skip_first}-{a.skip_last}"
        return window, Pending(a.spike_step, a.to_step, window)

    def unrecord_rewind(self) -> None:
        """Put remediation.json back as it was before `record_rewind` (nothing if none is pending), for a
        poll that stops by a signal after recording. A write that fails is counted (stage "rewind") and
        said in a `rewind_unrecord_failed` event naming the entry to remove: else the next start would
        hold a rewind that never happened (refused as pending, or its skip and count carried)."""
        if self._recorded is None:
            return
        try:
            if self.rewound.rewinds:
                self.rewound.save(self.out)
            else:
                (self.out / RECORD_FILE).unlink(missing_ok=True)
        except Exception as err:
            self.errors.record("rewind", err)
            a = self._recorded
            fix = (f"remove its \"pending\" entry, the skip \"{a.skip_first}-{a.skip_last}\" and one from "
                   "\"rewinds\"" if self.rewound.rewinds else "delete the file")
            self.events.emit("rewind_unrecord_failed", f"a rewind decided in a poll a stop signal ended (nothing "
                             f"carried out) is still in {self.out / RECORD_FILE} ({one_line(err)}): {fix} before "
                             f"the next start (it names the skip \"{a.skip_first}-{a.skip_last}\")",
                             error=one_line(err))
        self._recorded = None

    def rewind(self, a: Rewind, now: float) -> None:
        """After the kills (remediation.json already written by `record_rewind`): set aside every
        checkpoint after the one to load (rewind.py), then make every later launch skip the data
        window; the pool's restart, ordered in this same poll, loads that checkpoint. All or nothing,
        from the restart's point of view: the checkpoints are listed again now (a save may have
        committed or pruned since the poll listed them), and after the move the one loaded must be
        the newest committed (a late save, Slurm's kill being asynchronous, is set aside too). If that
        cannot be had, the moves are undone and the job stops (exit EXIT_REWIND_FAILED, paged): a
        restart now would load the spiked weights with no skip due. remediation.json marks the rewind
        done only once the moves and the check succeeded; until then it is pending, and a start refuses
        it until the later checkpoints are set aside (rewind.py)."""
        window, pending = self._window(a)
        try:
            if self._recorded is not a:  # an executor driven without the shell's `record_rewind`
                self.rewound.add(window, pending).save(self.out)
                self._recorded = a
            step, folder, moved = self._set_aside(a)
        except Exception as err:
            self._recorded = None
            self._rewind_failed(a, window, err)
            return
        try:  # done: the next start carries the skip instead of refusing a pending rewind
            self.rewound.add(window).save(self.out)
        except Exception as err:
            self._recorded = None
            self._rewind_failed(a, window, err, set_aside=True)
            return
        # appended, never merged: each range counts the steps of the run as it went when that spike
        # was seen (after the earlier skips), and the trainer applies them in this order (data.py)
        self.trainer["data"]["skip_steps"] = [*self.trainer["data"].get("skip_steps", []), window]
        self.rewound, self._recorded = self.rewound.add(window), None
        self.stats.remediations["rewind"] += 1
        record = self.events.emit("rewind", f"critical loss spike at step {a.spike_step} in every contributing group: "
                                  f"restarting from the checkpoint of step {step} (the last at or before step "
                                  f"{a.to_step}) and skipping the data of steps {window} "
                                  f"({a.skip_last - a.skip_first + 1} global batches); {len(moved)} later checkpoint "
                                  f"entries set aside in {folder}", spike_step=a.spike_step, to_step=a.to_step,
                                  checkpoint_step=step, skip_steps=[a.skip_first, a.skip_last],
                                  batches=a.skip_last - a.skip_first + 1, set_aside=moved)
        self.pages.rewound(time.time(), record["message"])

    def _set_aside(self, a: Rewind) -> tuple[int, str, list[str]]:
        """(the checkpoint step loaded, the folder(s), the entries moved). Listed again after the kills:
        the newest committed at or before `a.to_step` (the policy's pick, or an older one if a save
        pruned it since; older only replays more steps, the skip still lies after it). Two rounds of
        moves at most (the second catches a save that committed during the first), then a last
        listing must show the loaded checkpoint as the newest committed; else every move is undone."""
        url, rounds = self.checkpoint_url, []
        try:
            for attempt in range(3):
                steps = committed_steps(url)
                old_enough = [s for s in steps if s <= a.to_step]
                if not old_enough:
                    raise RuntimeError(f"no committed checkpoint at or before step {a.to_step} is left "
                                       f"(after the kills: {list(steps) or 'none'})")
                if steps[-1] == old_enough[-1]:
                    return steps[-1], ", ".join(f for f, _ in rounds), [n for _, names in rounds for n in names]
                if attempt < 2:
                    rounds.append(retire_checkpoints(url, old_enough[-1]))
            raise RuntimeError(f"checkpoints after step {old_enough[-1]} kept committing while being set aside "
                               f"(newest: {steps[-1]})")
        except Exception as err:
            self._undo(rounds, err)
            raise

    def _undo(self, rounds: list[tuple[str, list[str]]], err: Exception) -> None:
        """Put back every entry moved (last round first); an entry kept in its folder (its name
        re-created by a late save) and an undo that fails are added to `err`'s words."""
        kept = []
        try:
            for folder, names in reversed(rounds):
                if left := restore_checkpoints(self.checkpoint_url, folder, names):
                    kept.append(kept_words(folder, left))
        except Exception as undo:
            kept.append(f"putting the moved checkpoints back FAILED too ({one_line(undo)})")
        if kept:
            err.args = ("; ".join([one_line(err), *kept]),)

    def _rewind_failed(self, a: Rewind, window: str, err: BaseException, set_aside: bool = False) -> None:
        """The groups are dead and no checkpoint before the spike can be loaded (or, `set_aside`, the
        checkpoints were set aside but remediation.json could not mark the rewind done): the job stops
        (exit 6), paged as WatchtowerRewindFailed and counted as remediations{action="rewind_failed"},
        instead of restarting from the spiked weights. remediation.json keeps the rewind pending, so the
        next start refuses it until the checkpoints after its target are set aside (rewind.py); the
        message names them."""
        try:
            fix = pending_fix(self.checkpoint_url, self._window(a)[1])
        except Exception as listing:  # noqa: BLE001 - the message still names the rule
            fix = (f"move every step-* entry after step {a.to_step} out of {self.checkpoint_url} (its listing "
                   f"failed: {one_line(listing)}), then start again (the skip {window} is kept)")
        what = ("the checkpoints after it were set aside, but marking the rewind done in remediation.json "
                f"FAILED ({one_line(err)}); start again once it can be written: the start finishes it"
                if set_aside else
                f"the rewind to the checkpoint of step {a.checkpoint_step} FAILED ({one_line(err)}); every group "
                f"was stopped and the job stops rather than restart from the spiked weights. {self.out / RECORD_FILE} "
                f"keeps the rewind pending, so a start is refused until it is dealt with: {fix}")
        message = f"critical loss spike at step {a.spike_step} in every contributing group: {what}"
        log.error("rewind failed, stopping (exit %d): %s", EXIT_REWIND_FAILED, message)
        self.stats.remediations["rewind_failed"] += 1
        self.events.emit("rewind_failed", message, spike_step=a.spike_step, to_step=a.to_step,
                         checkpoint_step=a.checkpoint_step, skip_steps=[a.skip_first, a.skip_last],
                         error=one_line(err), set_aside=set_aside)
        self.pages.rewind_failed(time.time(), message)
        self._halt = Stop(EXIT_REWIND_FAILED, message)

    def rewind_declined(self, a: RewindDeclined, now: float) -> None:
        self.stats.remediations["page"] += 1
        self.events.emit("rewind_declined", f"critical loss spike at step {a.spike_step} in every contributing "
                         f"group, not rewound: {a.why}", spike_step=a.spike_step, why=a.why)
