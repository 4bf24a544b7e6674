"""The supervisor (`watchtower supervise job.toml`): keeps N replica groups training through node
failures, with hot spares, around a pure policy.

Every `poll_interval_s`:
  observe  exits, each group's rank-0 /metrics, drain requests, the Lighthouse's health (`observe.py`)
  decide   `policy.decide(state, view, cfg)`: pure, every rule is a table row in tests/test_policy.py;
           through the node health gate (`health.py`): the nodes a launch names are checked first
  execute  launch, kill, drain, restart from checkpoint, restart the Lighthouse (`actions.py`)
  emit     events.jsonl, file_sd targets, the /metrics snapshot (`metrics.py`)
Each observation and action runs on its own: an exception is logged once and counted in
`watchtower_supervisor_errors_total{stage}`; only a policy decision kills a group.

No orphans: groups start through `watchtower.orphan_guard` (the kernel kills them if this process
dies, SIGKILL and OOM included; on Slurm that is the group's `srun`, and the batch step's end takes
the job's steps); SIGTERM / SIGINT / SIGHUP / SIGUSR1 (scancel, Ctrl-C, a closed terminal or ssh
session, Slurm's time-limit warning) stop every group and the Lighthouse, write a `job_stopped` event,
empty the file_sd targets and exit 143 / 130 / 129 / 138; a lock on the output directory refuses a
second supervisor.

Graceful stop (SIGUSR1 only, `graceful_stop.py`): every group saves at one agreed step and exits
within `stop_grace_s`, then whatever still runs is killed as on the other signals. To stop with a
checkpoint: `scancel --batch --signal=USR1 JOBID` on Slurm, `kill -USR1 <supervisor pid>` here.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from watchtower.exposition import serve_metrics
from watchtower.supervisor.actions import Executor
from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.contract import stop_request_file
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.graceful_stop import GracefulStop
from watchtower.supervisor.health import HealthCheck, HealthGate, gated_decision
from watchtower.supervisor.launcher import Launcher, LocalLauncher
from watchtower.supervisor.lighthouse import Lighthouse, bind_and_advertise, import_lighthouse
from watchtower.supervisor.lock import JobDirLock
from watchtower.supervisor.metrics import (JobStats, Snapshot, SupervisorCollector, group_roles, node_counts,
                                           write_rank_targets, write_supervisor_target)
from watchtower.supervisor.observe import Group, Observer
from watchtower.supervisor.policy import decide, node_states, spike_undecided
from watchtower.supervisor.pool import free_nodes, standby_plan
from watchtower.supervisor.policy_types import Action, GroupFailed, PolicyState, View
from watchtower.supervisor.rewind import committed_steps
from watchtower.validation import ConfigError

if TYPE_CHECKING:  # the supervisor only reads the trainer's config
    from watchtower.config import TrainConfig

log = logging.getLogger("watchtower.supervisor")

# SIGUSR1: Slurm's warning before the time limit (`sbatch --signal=B:USR1@N`); SIGTERM: scancel;
# SIGHUP: the terminal or ssh session of a foreground `supervise` closed (its default, a silent death,
# left no job_stopped event and file_sd targets of dead ranks that paged as down)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
SLEEP_SLICE_S = 0.1  # a stop signal is noticed within this, even while lingering


def failures_only(actions: list[Action]) -> list[GroupFailed]:
    """The group failures of a poll a stop signal ends, as records only (event, count, page): the
    failure happened and its exit code and log tail must not be lost, but nothing acts on it. Its node
    is not drained (Slurm signals the steps with us, so this very stop may have killed the group) and
    no group is launched. Costs nothing beyond the events."""
    return [GroupFailed(replace(a.failure, blamed=False)) for a in actions if isinstance(a, GroupFailed)]


class Supervisor:
    """One job. `Supervisor(job, trainer).run()` returns the exit code; the constructor claims the
    output directory (a ConfigError if a live supervisor holds it)."""

    def __init__(self, job: JobConfig, trainer: TrainConfig, launcher: Launcher | None = None,
                 lock: JobDirLock | None = None):
        self.job, self.cfg = job, job.supervisor
        self.out = job.job.output_path
        self.lock = lock or JobDirLock(self.out)  # `lock`: already held on `out` (the demo empties it first)
        stop_request_file(self.out).unlink(missing_ok=True)  # a stop request of an earlier run stops no group of ours
        (self.out / "drain").mkdir(exist_ok=True)
        self.run_name = job.job.name
        self.policy_cfg = replace(job.policy(), spike_patience=trainer.monitor.loss_spike.patience)
        self.state = PolicyState.initial(self.policy_cfg)
        self.errors = StageErrors()
        self.events = EventLog(self.out / "events.jsonl", self.errors.record)
        # torchft (and torch) for the Lighthouse, imported before the job's clock starts: the summary's
        # wall time and events.jsonl's (from job_started, once the Lighthouse is up) then agree; the
        # 2-4 s import is the supervisor's start, not the job's
        import_lighthouse()
        self.stats = JobStats(time.time(), job.cluster.active_groups, trainer.train.steps)
        self.launcher = launcher or LocalLauncher(self.out / "nodes")
        # warm standbys where the group's trainers would start from one: a local TP > 1 group's ranks are
        # new interpreters its launcher starts (a standby would save only the launcher's imports)
        self.warm_standby = job.cluster.warm_standby and (job.cluster.launcher == "slurm" or trainer.train.tp == 1)
        self.health = HealthGate(HealthCheck.for_job(job, trainer), self.launcher, self.errors)
        self.groups: dict[str, Group] = {}
        self.lighthouse: Lighthouse | None = None
        self.observer = Observer(self.out, trainer.train.tp, trainer.train.steps, self.errors)
        self.graceful = GracefulStop(self.out, self.cfg, self.groups, self.observer, self.errors, self.events,
                                     self.stats, trainer.checkpoint_url, SLEEP_SLICE_S)
        try:  # a remediation.json refused: an in-process caller (the demo, a test) must be able to start again
            self.executor = Executor(job, trainer.to_dict(), trainer.checkpoint_url, self.launcher,
                                     lambda: self.lighthouse, self.groups, self.events, self.stats, self.errors)
        except BaseException:
            if lock is None:
                self.lock.release()
            raise
        self.state = replace(self.state, rewinds=self.executor.rewound.rewinds)  # max_rewinds is per run
        self.collector = SupervisorCollector(Snapshot(self.run_name, time.time()))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.metrics_port: int | None = None
        self._server = None
        self._signal: int | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """STOP_SIGNALS end the job cleanly at the next slice of the loop (main thread only)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum  # the loop notices within SLEEP_SLICE_S; nothing else happens in a handler

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """What a stop signal does, for a caller that runs the loop in a thread."""
        self._signal = signum

    def run(self) -> int:
        try:
            self.start()
            return self._loop()
        finally:
            self.shutdown()

    def start(self) -> None:
        """Start the Lighthouse and /metrics (a bind that fails is a ConfigError naming its key)."""
        c, s = self.job.cluster, self.cfg
        try:
            bind, advertise = bind_and_advertise(s.lighthouse_bind, self.launcher.head_address)
            self.lighthouse = Lighthouse(bind, c.active_groups, s.lighthouse_heartbeat_timeout_ms,
                                         s.join_timeout_ms(), advertise=advertise)
        except (OSError, RuntimeError) as err:
            raise ConfigError("supervisor.lighthouse_bind", s.lighthouse_bind, f"the Lighthouse cannot listen "
                              f"there: {err}") from None
        if s.metrics_port:
            try:
                self._server, self.metrics_port = serve_metrics(self.registry, s.metrics_port, s.metrics_bind)
            except OSError as err:
                raise ConfigError("supervisor.metrics_bind", f"{s.metrics_bind}:{s.metrics_port}",
                                  f"cannot serve /metrics there: {err}") from None
        self.events.emit("job_started", f"{c.active_groups} active + {c.spare_groups} spare groups on "
                         f"{len(c.nodes)} nodes; lighthouse {self.lighthouse.url}", lighthouse=self.lighthouse.url,
                         supervisor_pid=os.getpid())

    def _loop(self) -> int:
        while self._signal is None:
            code = self.poll_once()
            if code is not None:  # a Stop carried out (its job_stopped written): a signal after it changes nothing
                return self._stopped_by_policy(code)
            self._sleep(self.cfg.poll_interval_s)
        return self._stopped_by_signal()

    def poll_once(self) -> int | None:
        """observe → decide → execute → emit; the exit code of a `Stop`, else None."""
        now = time.time()
        view = self.observer.observe(list(self.groups.values()), self.lighthouse, self.launcher, now)
        view = replace(view, launch_failures=tuple(self.executor.launch_failures))
        if spike_undecided(self.state, view, self.policy_cfg):  # a rewind picks among the committed checkpoints
            with self.errors.guard("rewind"):
                view = replace(view, checkpoints=committed_steps(self.executor.checkpoint_url))
        actions = []
        with self.errors.guard("decide"):
            decided = self._decide(view)
            # a stop signal cut the health gate short, or came while deciding: the loop stops by it now and
            # nothing decided is carried out (one stop, one job_stopped: the first decided), but a group
            # failure this poll saw is still recorded
            if decided is None or self._signal is not None:
                self.executor.unrecord_rewind()  # a rewind written to remediation.json did not happen
                seen = decided[1] if decided is not None else decide(self.state, view, self.policy_cfg)[1]
                self.executor.run(failures_only(seen), now)
                return None
            self.state, actions = decided
            for g in self.groups.values():  # the policy has now seen each exit once
                g.reported = g.reported or not g.running
            del self.executor.launch_failures[:len(view.launch_failures)]  # and each failed launch
        self.stats.job_step = max(self.stats.job_step, self.state.job_step)
        code = self.executor.run(actions, now)
        if code is None and self.warm_standby:
            with self.errors.guard("launch"):
                running = [g for g in self.groups.values() if g.running]
                finishing = any(g.exit_code == 0 for g in self.groups.values())
                self.launcher.keep_warm(*standby_plan(free_nodes(self.state, view, self.policy_cfg),
                                                      {g.process.spec.node for g in running},
                                                      [g.step for g in running], finishing,
                                                      self.job.cluster.spare_groups))
        with self.errors.guard("alertmanager"):  # only queues: the posts go out on their own thread
            self.executor.pages.poll(time.time(), self.state.short_of_nodes)
        with self.errors.guard("metrics"):
            self.stats.track(time.time(), self.groups, self.stats.job_step, self.events)
        self._emit(view)
        return code

    def _decide(self, view: View):
        """`gated_decision`; a rewind decided is written to remediation.json before anything is carried
        out, and if that fails the policy decides again with the rewind refused (it declines: pages,
        kills nothing, spends no rewind). None: a stop signal cut the health gate short."""
        stopping = lambda: self._signal is not None  # noqa: E731
        decided = gated_decision(self.state, view, self.policy_cfg, self.health, stopping)
        if decided is None or stopping():
            return decided
        refused = self.executor.record_rewind(decided[1])
        if refused:
            decided = gated_decision(self.state, replace(view, rewind_refused=refused), self.policy_cfg,
                                     self.health, stopping)
        return decided

    def _emit(self, view: View) -> None:
        with self.errors.guard("file_sd"):
            write_rank_targets(self.out, self.run_name, self.groups)
            if self._server is not None:
                write_supervisor_target(self.out, self.run_name, self.metrics_port,
                                        self.launcher.head_address or "127.0.0.1")
        with self.errors.guard("metrics"):
            self.collector.snapshot = self.snapshot(view)  # one reference swap: a scrape sees all or none

    def snapshot(self, view: View) -> Snapshot:
        live = [g for g in self.groups.values() if g.running]
        nodes = node_counts(node_states(self.state, view, self.policy_cfg).values())
        return Snapshot(self.run_name, time.time(), group_roles(live), nodes, dict(self.stats.failures),
                        dict(self.stats.restarts), self.errors.snapshot(), self.stats.recovery_s,
                        max((g.participants for g in live if g.participating), default=0),
                        self.job.cluster.active_groups, self.job.cluster.spare_groups, self.stats.job_step,
                        self.stats.goodput(), self.stats.crash_loop, self.observer.lighthouse_up,
                        self.stats.badput(), dict(self.stats.remediations))

    def _sleep(self, seconds: float) -> bool:
        """Sleep in slices; True (at once) when a stop signal has arrived."""
        deadline = time.monotonic() + seconds
        while self._signal is None and time.monotonic() < deadline:
            time.sleep(min(SLEEP_SLICE_S, max(deadline - time.monotonic(), 0)))
        return self._signal is not None

    def _stopped_by_policy(self, code: int) -> int:
        """A stop that needs a person (crash loop, no nodes) keeps /metrics up for linger_s, groups
        stopped, so Prometheus scrapes the reason and the page goes out before the process is gone."""
        if code != 0 and self._server is not None:
            self._stop_groups()
            self._emit(View(time.time()))
            if self._sleep(self.cfg.linger_s):
                log.info("stop signal while lingering: exiting now")
        return code

    def _stopped_by_signal(self) -> int:
        signum = self._signal
        name = signal.Signals(signum).name
        graceful = signum == signal.SIGUSR1 and self.cfg.stop_grace_s > 0
        deadline = time.monotonic() + self.cfg.stop_grace_s  # from the signal: holding_state's scrapes count
        saved = self._stop_gracefully(name, deadline) if graceful and self.graceful.holding_state() else {}
        self._stop_groups()
        code = 128 + signum
        said = (f"checkpoint of step {saved['stop_after_step']} {'saved' if saved['checkpoint_saved'] else 'NOT saved'}"
                f", {len(saved['groups_stopped'])} groups stopped on request, {len(saved['groups_killed'])} killed; "
                if saved else f"{self._nothing_to_save()}; " if graceful else "")
        self.events.emit("job_stopped", f"stopped by {name}: {said}every group and the Lighthouse stopped",
                         exit_code=code, signal=name, **saved)
        return code

    def _nothing_to_save(self) -> str:
        """Why SIGUSR1 saved nothing, as the supervisor knows it: no running group has finished a step
        since its launch. The job may be far along (its groups relaunched from its checkpoint): that
        checkpoint is where it resumes."""
        step = self.stats.job_step
        resumes = f" (the job is at step {step} and resumes from its last checkpoint)" if step else ""
        return f"no running group has finished a step since its launch{resumes}, nothing to save"

    def _stop_gracefully(self, name: str, deadline: float) -> dict:
        """graceful_stop.py's protocol until the monotonic `deadline`; a second stop signal after the
        request ends the wait."""
        step = self.graceful.request(name)
        self._signal = None  # a second stop signal ends the wait
        return self.graceful.wait(step, deadline, lambda: self._signal is not None)

    def _stop_groups(self) -> None:
        for g in self.groups.values():
            if g.running:
                with self.errors.guard("kill"):
                    try:
                        g.process.kill()
                    finally:  # a kill that raises has still killed the group (a Slurm step: its srun), so
                        g.exit_code = g.process.poll()  # it is not killed again nor left in targets.json
        with self.errors.guard("launch"):  # the unused standbys after the groups (on Slurm a cancel each)
            self.launcher.keep_warm((), start_new=False)
        if self.lighthouse is not None:
            with self.errors.guard("lighthouse"):
                self.lighthouse.stop()

    def shutdown(self) -> None:
        """Close the goodput ledger; stop every group and the Lighthouse, empty our file_sd target,
        stop /metrics, unlock."""
        with self.errors.guard("metrics"):
            self.stats.timeline.finish(time.time())
        self._stop_groups()
        with self.errors.guard("file_sd"):
            write_rank_targets(self.out, self.run_name, self.groups)
            if self._server is not None:
                write_supervisor_target(self.out, self.run_name, None)  # a stopped supervisor is not "down"
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.executor.pages.alerts.close()  # the last pages (a crash loop) leave first, within a bound
        self.launcher.finish()  # a cut health check's step cancel (Slurm), within command_timeout_s
        self.lock.release()

    # ---- reporting --------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The job's figures for `supervise`'s last line (`JobStats.summary`)."""
        return self.stats.summary()
