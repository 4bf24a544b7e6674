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

Graceful stop (SIGUSR1 only): first every group is asked to save at one agreed step and exit
(`_stop_gracefully`, the request file in contract.py), for at most `stop_grace_s` (45 s by default,
inside Slurm's 60 s `--signal=B:USR1@60` warning with 10 s left to kill the rest); then whatever still
runs is killed as on the other signals, and the next run resumes from that step. SIGTERM / SIGINT /
SIGHUP stop at once (every group and the Lighthouse gone within 15 s), by choice: on Slurm, scancel and
the time limit send SIGTERM to every job step as well as to us, so the groups die within Slurm's
KillWait whatever we ask and a save promised on SIGTERM would be one only the local launcher keeps;
a person stopping within seconds means it. To stop with a checkpoint: `scancel --batch --signal=USR1
JOBID` on Slurm, `kill -USR1 <supervisor pid>` here. A second stop signal during the wait kills at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import fsspec
from prometheus_client import CollectorRegistry

from watchtower.exposition import serve_metrics
from watchtower.supervisor.actions import Executor
from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.contract import EXIT_STOPPED, stop_request_file, stop_step, write_stop_request
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.health import HealthCheck, HealthGate, gated_decision
from watchtower.supervisor.launcher import Launcher, LocalLauncher
from watchtower.supervisor.lighthouse import Lighthouse, bind_and_advertise
from watchtower.supervisor.lock import JobDirLock
from watchtower.supervisor.metrics import (JobStats, Snapshot, SupervisorCollector, write_rank_targets,
                                           write_supervisor_target)
from watchtower.supervisor.observe import Group, Observer
from watchtower.supervisor.policy import node_states
from watchtower.supervisor.policy_types import PolicyState, View
from watchtower.validation import ConfigError

if TYPE_CHECKING:  # the trainer's config imports torch; the supervisor only reads it
    from watchtower.config import TrainConfig

log = logging.getLogger("watchtower.supervisor")

# SIGUSR1: Slurm's warning before the time limit (`sbatch --signal=B:USR1@N`); SIGTERM: scancel;
# SIGHUP: the terminal or ssh session of a foreground `supervise` closed (its default, a silent death,
# left no job_stopped event and file_sd targets of dead ranks that paged as down)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
SLEEP_SLICE_S = 0.1  # a stop signal is noticed within this, even while lingering


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
        self.policy_cfg = job.policy()
        self.state = PolicyState.initial(self.policy_cfg)
        self.errors = StageErrors()
        self.events = EventLog(self.out / "events.jsonl", self.errors.record)
        self.stats = JobStats(time.time(), job.cluster.active_groups, trainer.train.steps)
        self.launcher = launcher or LocalLauncher(self.out / "nodes")
        self.health = HealthGate(HealthCheck.for_job(job, trainer), self.launcher, self.errors)
        self.groups: dict[str, Group] = {}
        self.lighthouse: Lighthouse | None = None
        self.observer = Observer(self.out, trainer.train.tp, trainer.train.steps, self.errors)
        self.checkpoint_url = trainer.checkpoint_url
        self.executor = Executor(job, trainer.to_dict(), trainer.checkpoint_url, self.launcher,
                                 lambda: self.lighthouse, self.groups, self.events, self.stats, self.errors)
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
            self.lighthouse = Lighthouse(bind, c.active_groups, s.lighthouse_heartbeat_timeout_ms, advertise)
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
            if code is not None:
                return self._stopped_by_policy(code)
            self._sleep(self.cfg.poll_interval_s)
        return self._stopped_by_signal()

    def poll_once(self) -> int | None:
        """observe → decide → execute → emit; the exit code of a `Stop`, else None."""
        now = time.time()
        view = self.observer.observe(list(self.groups.values()), self.lighthouse, self.launcher, now)
        view = replace(view, launch_failures=tuple(self.executor.launch_failures))
        actions = []
        with self.errors.guard("decide"):
            self.state, actions = gated_decision(self.state, view, self.policy_cfg, self.health)
            for g in self.groups.values():  # the policy has now seen each exit once
                g.reported = g.reported or not g.running
            del self.executor.launch_failures[:len(view.launch_failures)]  # and each failed launch
        self.stats.job_step = max(self.stats.job_step, self.state.job_step)
        code = self.executor.run(actions, now)
        with self.errors.guard("alertmanager"):  # only queues: the posts go out on their own thread
            self.executor.pages.poll(time.time(), self.state.short_of_nodes)
        with self.errors.guard("metrics"):
            self.stats.track(time.time(), self.groups, self.stats.job_step, self.events)
        self._emit(view)
        return code

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
        roles = {"active": sum(1 for g in live if g.participating),
                 "spare": sum(1 for g in live if g.participating is False),
                 "starting": sum(1 for g in live if g.participating is None)}
        nodes = {state: 0 for state in ("busy", "free", "draining", "drained", "down")}
        for state in node_states(self.state, view, self.policy_cfg).values():
            nodes[state.value] += 1
        now = time.time()
        return Snapshot(self.run_name, now, roles, nodes, dict(self.stats.failures), dict(self.stats.restarts),
                        self.errors.snapshot(), self.stats.recovery_s,
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
        saved = self._stop_gracefully(name) if signum == signal.SIGUSR1 and self.cfg.stop_grace_s > 0 else {}
        self._stop_groups()
        code = 128 + signum
        said = (f"checkpoint of step {saved['stop_after_step']} {'saved' if saved['checkpoint_saved'] else 'NOT saved'}"
                f", {len(saved['groups_stopped'])} groups stopped on request, {len(saved['groups_killed'])} killed; "
                if saved else "")
        self.events.emit("job_stopped", f"stopped by {name}: {said}every group and the Lighthouse stopped",
                         exit_code=code, signal=name, **saved)
        return code

    def _stop_gracefully(self, name: str) -> dict:
        """Ask every group to save after one agreed step and exit (contract.py); wait until each group
        holding state (one that has finished a step) has exited, `stop_grace_s` at most, or a second
        stop signal. Costs one scrape per group and a waitpid per group every SLEEP_SLICE_S.
        Returns what the job_stopped event records."""
        deadline = time.monotonic() + self.cfg.stop_grace_s
        step, step_s = self._agreed_stop_step()
        with self.errors.guard("stop"):
            write_stop_request(self.out, step)
        self.events.emit("stop_requested", f"{name}: every group saves after step {step} and exits; what still "
                         f"runs in {self.cfg.stop_grace_s:g} s is killed", stop_after_step=step,
                         step_seconds=None if step_s is None else round(step_s, 4), grace_s=self.cfg.stop_grace_s)
        self._signal = None  # a second stop signal ends the wait
        while self._holding_state() and time.monotonic() < deadline and self._signal is None:
            time.sleep(SLEEP_SLICE_S)
        stop_request_file(self.out).unlink(missing_ok=True)
        saved = False
        with self.errors.guard("stop"):
            saved = checkpoint_saved(self.checkpoint_url, step)
        return {"stop_after_step": step, "checkpoint_saved": saved,
                "groups_stopped": sorted(g.replica_id for g in self.groups.values() if g.exit_code == EXIT_STOPPED),
                "groups_killed": sorted(g.replica_id for g in self.groups.values() if g.running)}

    def _agreed_stop_step(self) -> tuple[int, float | None]:
        """(the step to stop after, the fastest group's step time or None), from a fresh scrape of each
        group: ahead of every group by stop_lead_s plus the time these scrapes took (contract.stop_step)."""
        began, job_step, step_s = time.monotonic(), self.stats.job_step, None
        for g in (g for g in self.groups.values() if g.running):
            before, at = g.step, g.last_metrics_at
            with self.errors.guard("scrape"):
                self.observer.scrape(g)
            if at and g.last_metrics_at > at:  # seconds per step between the scrapes; none: at least that long
                estimate = (g.last_metrics_at - at) / max(g.step - before, 1)
                step_s = estimate if step_s is None else min(step_s, estimate)
            job_step = max(job_step, g.step)
        return stop_step(job_step, step_s, self.cfg.stop_lead_s + time.monotonic() - began), step_s

    def _holding_state(self) -> bool:
        """A group that has finished a step still runs (one that never did holds nothing to save, and
        would wait in a quorum the others have left). Before saying no, the groups left are scraped
        once more: one may have finished its first step since the last scrape."""
        if self._state_holder_running():
            return True
        for g in (g for g in self.groups.values() if g.running):
            with self.errors.guard("scrape"):
                self.observer.scrape(g)
        return self._state_holder_running()

    def _state_holder_running(self) -> bool:
        for g in (g for g in self.groups.values() if g.running):
            with self.errors.guard("exits"):
                g.exit_code = g.process.poll()
        return any(g.running and g.heartbeat is not None for g in self.groups.values())

    def _stop_groups(self) -> None:
        for g in self.groups.values():
            if g.running:
                with self.errors.guard("kill"):
                    g.process.kill()
                    g.exit_code = g.process.poll()
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
        self.lock.release()

    # ---- reporting --------------------------------------------------------------------------------

    def summary(self) -> dict:
        """failures: those the budget counts (a planned drain or a quorum timeout the Lighthouse's
        outage excused is not one); planned drains apart."""
        return {"steps": self.stats.job_step, "failures": self.stats.counted,
                "planned_drains": self.stats.planned_drains, "restarts": dict(self.stats.restarts),
                "recovery_seconds": None if self.stats.recovery_s is None else round(self.stats.recovery_s, 2),
                "goodput_ratio": round(self.stats.goodput(), 3), "crash_loop": self.stats.crash_loop,
                "wall_seconds": round(self.stats.timeline.ledger.wall_s, 2),
                "breakdown_seconds": {c: round(s, 2) for c, s in self.stats.timeline.breakdown().items()}}


def checkpoint_saved(url: str, step: int) -> bool:
    """A committed checkpoint of `step` (its manifest, written last) under `url`, any fsspec URL
    (names from watchtower/trainer/checkpoint.py, which imports torch). One glob."""
    fs, root = fsspec.core.url_to_fs(url)
    return bool(fs.glob(f"{root.rstrip('/')}/step-{step:08d}*/manifest.json"))
