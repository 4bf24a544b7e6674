"""The graceful stop on SIGUSR1 (Slurm's time-limit warning): every group saves at one agreed step
and exits before the rest is killed, so the next run resumes from that step, not an older one.

Its own module, beside the loop (shell.py), because it is one protocol with its own state: agree a
step ahead of every group (a fresh scrape of each), write the stop request (contract.py), wait while
a group holding state still runs (`stop_grace_s` at most, or until a second stop signal), delete the
request, and check that the checkpoint of that step was committed. The loop decides whether to stop
gracefully at all, re-arms its signal flag between `request` and `wait`, and kills whatever is left.

Why only SIGUSR1: `stop_grace_s` (45 s by default) fits inside Slurm's 60 s `--signal=B:USR1@60`
warning with 10 s left to kill the rest. SIGTERM / SIGINT / SIGHUP stop at once (every group and the
Lighthouse gone within 15 s), by choice: on Slurm, scancel and the time limit send SIGTERM to every job
step as well as to us, so the groups die within Slurm's KillWait whatever we ask and a save promised
on SIGTERM would be one only the local launcher keeps; a person stopping within seconds means it.
A second stop signal during the wait kills at once.
"""

from __future__ import annotations

import time
from typing import Callable

import fsspec

from watchtower.supervisor.contract import EXIT_STOPPED, stop_request_file, stop_step, write_stop_request
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.observe import Group, Observer
from watchtower.supervisor.supervisor_section import SupervisorSection


class GracefulStop:
    """Ask the job's groups (the loop's own `groups` dict, read live) to save and exit. Costs one
    scrape per group to agree the step, then a waitpid per group every `slice_s` while waiting."""

    def __init__(self, out, cfg: SupervisorSection, groups: dict[str, Group], observer: Observer,
                 errors: StageErrors, events: EventLog, stats: JobStats, checkpoint_url: str, slice_s: float):
        self.out, self.cfg, self.groups, self.observer = out, cfg, groups, observer
        self.errors, self.events, self.stats = errors, events, stats
        self.checkpoint_url, self.slice_s = checkpoint_url, slice_s

    def request(self, name: str) -> int:
        """Agree the step, write the stop request, record `stop_requested`; the step. The wait's deadline
        is the caller's, taken when the signal was handled (before `holding_state`'s scrapes)."""
        step, step_s = self._agreed_stop_step()
        with self.errors.guard("stop"):
            write_stop_request(self.out, step)
        self.events.emit("stop_requested", f"{name}: every group saves after step {step} and exits; what still "
                         f"runs in {self.cfg.stop_grace_s:g} s is killed", stop_after_step=step,
                         step_seconds=None if step_s is None else round(step_s, 4), grace_s=self.cfg.stop_grace_s)
        return step

    def wait(self, step: int, deadline: float, interrupted: Callable[[], bool]) -> dict:
        """Wait until each group holding state (one that has finished a step) has exited, the
        deadline, or `interrupted()` (a second stop signal); then withdraw the request. Returns what
        the job_stopped event records."""
        while self.holding_state() and time.monotonic() < deadline and not interrupted():
            time.sleep(self.slice_s)
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

    def holding_state(self) -> bool:
        """A group that has finished a step still runs (one that never did holds nothing to save, and
        would wait in a quorum the others have left). Before saying no, the groups left are scraped
        once more: one may have finished its first step since the last scrape. The loop asks first:
        with none, there is nothing to request (a signal during the first health gate)."""
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


def checkpoint_saved(url: str, step: int) -> bool:
    """A committed checkpoint of `step` (its manifest, written last) under `url`, any fsspec URL
    (names from watchtower/trainer/checkpoint.py, not imported: the supervisor imports no trainer module,
    tests/test_supervisor_shell.py). One glob."""
    fs, root = fsspec.core.url_to_fs(url)
    return bool(fs.glob(f"{root.rstrip('/')}/step-{step:08d}*/manifest.json"))
