"""Replica groups as Slurm job steps inside one allocation (`cluster.launcher = "slurm"`).

The supervisor runs inside an allocation taken with `--no-kill` (`watchtower sbatch` writes it; a
user in `salloc` runs `watchtower supervise` directly), so a dead node shrinks the allocation but
does not end it, and a spare costs no wait in the queue. Each replica group is one job step:

    srun --jobid=$SLURM_JOB_ID -N1 -w NODE --ntasks=TP --overlap --kill-on-bad-exit=1 -J watchtower-g0003 \
         python -m watchtower.supervisor.slurm_task --master-addr NODE_ADDR .../groups/g0003/trainer.toml

Each task becomes TP rank `SLURM_PROCID` (`slurm_task.py`) and runs `watchtower train --config` with
the group's launch contract, unchanged. Every address on this path is Slurm's `NodeAddr` of the node
(ranks' /metrics, `MASTER_ADDR`) or of the node the supervisor runs on (the Lighthouse, the
supervisor's /metrics), so Prometheus, the TUI and the supervisor's scrapes work from another host.

Killing a group cancels its step (`scancel JOB.STEP`): a SIGKILLed `srun` would leave the step's
tasks running. A node whose group failed is excluded by the policy (drained); with
`[slurm] drain_failed_nodes = true` it is drained in Slurm too, and a refusal (no admin rights) is an
event and a warning. A node Slurm reports DOWN, or that left the allocation, is reported down for good.

No orphans: a SIGKILLed supervisor takes its `srun`s with it (orphan guard), but a step's tasks
outlive their srun; they stop by themselves at their next quorum, which needs the supervisor's
Lighthouse (inside salloc, measured on the test cluster: no step left 3 s after the supervisor's
SIGKILL); in a batch job the batch step's end cancels every step as well.

The pure helpers (command lines, `scontrol` records, node selection, the cache path) live in
slurm_commands.py, tested as tables, and `[slurm]` in slurm_section.py; this module is the I/O edge.
Costs: one `srun` per launch; every DOWN_CHECK_INTERVAL_S three `scontrol` calls (~10 ms each); a
kill adds one `squeue` and one `scancel`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from watchtower.orphan_guard import guarded
from watchtower.supervisor.contract import EXIT_STOPPED
from watchtower.supervisor.errors import CommandError
from watchtower.supervisor.launcher import (GroupProcess, GroupSpec, NodeCleanup, Standby, Standbys, direct_peers,
                                            node_env, run_bounded)
from watchtower.supervisor.slurm_commands import (STEP_PREFIX, allocated_cluster, drain_argv, expand_cache_dir, is_down,
                                                  parse_records, select_nodes, srun_argv, standby_task_argv, step_name,
                                                  steps, task_argv)
from watchtower.supervisor.slurm_section import SlurmSection
from watchtower.supervisor.slurm_task import exit_status
from watchtower.validation import ConfigError, require

if TYPE_CHECKING:
    from watchtower.supervisor.config import JobConfig

log = logging.getLogger("watchtower.supervisor")

DOWN_CHECK_INTERVAL_S = 3.0  # how often Slurm is asked which nodes are down or gone (the rest is cached)
EXIT_STEP_LOST = 255  # srun ended "successfully" but a rank never reported its exit: its node was lost


class SlurmError(CommandError):
    """A Slurm command failed or timed out; the message holds its command line and error output."""


# ---- I/O: Slurm commands ------------------------------------------------------------------------


def slurm(argv: list[str], timeout_s: float) -> str:
    """Run a Slurm client command; its stdout, or a SlurmError with its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)}: no answer in {timeout_s:g}s") from None
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]}: not installed here (Slurm's client commands are needed)") from None
    except OSError as err:  # on PATH but not runnable (not executable, a bad interpreter line)
        raise SlurmError(f"{argv[0]}: cannot be run: {err}") from None
    if done.returncode != 0:
        said = " | ".join(line.strip() for line in done.stderr.strip()[-500:].splitlines())  # one line, as errors are
        raise SlurmError(f"{' '.join(argv)}: exit {done.returncode}: {said}")
    return done.stdout


def hostnames(expression: str, timeout_s: float) -> list[str]:
    """A Slurm hostlist (`n[1-3],gpu07`) expanded by Slurm itself."""
    return slurm(["scontrol", "show", "hostnames", expression], timeout_s).split()


def node_records(nodes: list[str], timeout_s: float) -> dict[str, dict[str, str]]:
    text = slurm(["scontrol", "-o", "show", "node", ",".join(nodes)], timeout_s)
    return {r["NodeName"]: r for r in parse_records(text) if "NodeName" in r}


class SlurmStep(GroupProcess):
    """A group's `srun`; killing it cancels the step, so no task is left on the node."""

    def __init__(self, spec: GroupSpec, proc: subprocess.Popen, address: str, launcher: "SlurmLauncher",
                 step: str | None = None, warm: bool = False, standby_ready: bool = False):
        super().__init__(spec, proc, address, warm, standby_ready)
        self.launcher = launcher
        self.step = step or step_name(spec.replica_id)  # a standby's step keeps its own name

    def poll(self) -> int | None:
        """srun's exit code, except a 0, which is read from every rank's own exit (`slurm_task`):
        all 0 is the last step finished, all EXIT_STOPPED a stop on request (told to Slurm as 0, so
        --kill-on-bad-exit spares the peers), anything else EXIT_STEP_LOST (srun exits 0 when the
        node dies under the step, which must not read as "finished")."""
        code = self.proc.poll()
        if code != 0:
            return code
        ranks = exit_status(self.spec.config_path.parent, self.launcher.tp)
        for both in (0, EXIT_STOPPED):
            if ranks == [both] * self.launcher.tp:
                return both
        return EXIT_STEP_LOST

    def kill(self) -> None:
        """Cancel the step, and kill the srun whatever Slurm answered: a controller that does not
        answer (restarting, timed out) must not leave the group running; its SlurmError is raised after."""
        try:
            self.launcher.cancel_step(self.step)
        finally:
            super().kill()


class SlurmLauncher:
    """Groups as job steps of allocation `job_id` on `nodes` (`from_allocation` builds it)."""

    def __init__(self, job_id: str, nodes: list[str], addresses: dict[str, str], head_address: str,
                 cfg: SlurmSection, tp: int, cache_template: str, nodes_dir: Path, peers: list[str] = ()):
        self.job_id, self.nodes, self.addresses = job_id, list(nodes), dict(addresses)
        self.peers = sorted({*peers, *self.addresses.values()})
        self.head_address = head_address
        self.cfg, self.tp, self.cache_template, self.nodes_dir = cfg, tp, cache_template, Path(nodes_dir)
        self._down: set[str] = set()
        self._checked_at = 0.0
        self._cancels: list[threading.Thread] = []  # cut health checks' step cancels, joined by `finish`
        self.standbys = Standbys(self._start_standby)

    @classmethod
    def from_allocation(cls, job: JobConfig, tp: int, cache_template: str,
                        env: Mapping[str, str] = os.environ) -> SlurmLauncher:
        """The allocation this process runs in, its nodes (checked against the job) and their
        addresses; a ConfigError (exit 2) before any step when they do not fit."""
        c, timeout = job.cluster, job.slurm.command_timeout_s
        job_id = env.get("SLURM_JOB_ID", "")
        require(bool(job_id) and bool(env.get("SLURM_JOB_NODELIST")), "cluster.launcher", c.launcher,
                "needs a Slurm allocation: submit with `watchtower sbatch JOB.toml`, or run inside salloc")
        try:
            allocation = hostnames(env["SLURM_JOB_NODELIST"], timeout)
            nodes = select_nodes(allocation, c.nodes, c.active_groups + c.spare_groups, job_id, c.exclude)
            records = node_records(sorted({*nodes, *([env["SLURMD_NODENAME"]] if "SLURMD_NODENAME" in env else [])}),
                                   timeout)
        except SlurmError as err:
            raise ConfigError("cluster.launcher", c.launcher, f"cannot read allocation {job_id}: {err}") from None
        addresses = {n: records.get(n, {}).get("NodeAddr") or n for n in nodes}
        # torchft heals over urllib from the peer's host name: every name of every node goes direct
        hosts = [r["NodeHostName"] for r in records.values() if "NodeHostName" in r]
        peers = sorted({*nodes, *addresses.values(), *hosts})
        head = records.get(env.get("SLURMD_NODENAME", ""), {}).get("NodeAddr") or socket.getfqdn()
        if cache_template:
            expand_cache_dir(cache_template, nodes[0], env)  # a missing variable is refused now, not per launch
        return cls(job_id, nodes, addresses, head, job.slurm, tp, cache_template, job.job.output_path / "nodes", peers)

    # ---- the Launcher interface --------------------------------------------------------------

    def node_cache_dir(self, node: str) -> Path:
        if self.cache_template:
            return Path(expand_cache_dir(self.cache_template, node, os.environ))
        return self.nodes_dir / node / "cache"  # no data.cache_dir: a per-node directory beside the job

    def launch(self, spec: GroupSpec) -> GroupProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        address = self.addresses[spec.node]
        standby = self.standbys.take(spec.node)
        if standby is not None:
            return SlurmStep(spec, standby.proc, address, self, step=standby.name, warm=True,
                             standby_ready=standby.give(spec))
        argv = srun_argv(self.job_id, spec.node, self.tp, step_name(spec.replica_id), self.cfg.srun_args,
                         task_argv(spec.config_path, address))
        env = {**os.environ, **direct_peers(os.environ, self.peers)}
        with open(spec.log_path, "ab") as out:
            proc = subprocess.Popen(guarded(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return SlurmStep(spec, proc, address, self)

    def keep_warm(self, nodes: Iterable[str], start_new: bool = True) -> None:
        self.standbys.keep(nodes, start_new)

    def _start_standby(self, node: str, name: str) -> Standby:
        """A standby step on `node` (`slurm_task --standby`), TP tasks like a group's; its srun's
        output goes to the node's standby.log (the trainer's, once ordered, to the group's log)."""
        where = self.nodes_dir / node
        where.mkdir(parents=True, exist_ok=True)
        order, name = where / f"standby-{name}.order", f"{STEP_PREFIX}standby-{node}-{name}"
        argv = srun_argv(self.job_id, node, self.tp, name, self.cfg.srun_args,
                         standby_task_argv(order, self.addresses[node]))
        with open(where / "standby.log", "ab") as out:
            proc = subprocess.Popen(guarded(argv), env={**os.environ, **direct_peers(os.environ, self.peers)},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return Standby(node, proc, order, name, cancel=lambda: self.cancel_step(name), tasks=self.tp)

    def down_nodes(self) -> frozenset[str]:
        """Nodes Slurm reports DOWN / FAIL or that left the allocation; once down, down for good.
        Asks Slurm at most every DOWN_CHECK_INTERVAL_S; a failed query raises (the loop counts it, and
        its observer keeps the last answer, so a DOWN node never reads free for a poll)."""
        now = time.monotonic()
        if now - self._checked_at >= DOWN_CHECK_INTERVAL_S:
            self._checked_at = now
            timeout = self.cfg.command_timeout_s
            jobs = parse_records(slurm(["scontrol", "-o", "show", "job", self.job_id], timeout))
            if not jobs or jobs[0].get("NodeList", "(null)") == "(null)":  # never read as "every node left"
                raise SlurmError(f"scontrol show job {self.job_id}: no node list (the job is ending?)")
            held = set(hostnames(jobs[0]["NodeList"], timeout))
            states = node_records(self.nodes, timeout)
            self._down |= {n for n in self.nodes
                           if n not in held or is_down(states.get(n, {}).get("State", "DOWN"))}
        return frozenset(self._down)

    def run_on_node(self, node: str, argv: list[str], timeout_s: float,
                    cancel: threading.Event | None = None) -> tuple[int | None, str]:
        """`argv` as a one-task step on `node`; on a timeout or a cancel the step is cancelled as well.
        After a cancel (a stop signal) that runs on its own thread: its squeue and scancel may take
        2 x command_timeout_s on a slow controller, time the stop must not lose. `finish` (the
        supervisor's shutdown) joins it, so the process does not exit under it (which left its squeue
        an orphan and never ran the scancel; inside `salloc` the allocation outlives us)."""
        name = f"{STEP_PREFIX}check-{node}"
        code, out = run_bounded(srun_argv(self.job_id, node, 1, name, [], argv),
                                {**os.environ, **node_env(node, self.node_cache_dir(node))}, timeout_s, cancel)
        if code is None and cancel is not None and cancel.is_set():
            thread = threading.Thread(target=self._cancel_quietly, args=(name,), name=f"cancel-{name}", daemon=True)
            self._cancels.append(thread)
            thread.start()
        elif code is None:
            self.cancel_step(name)
        return code, out

    def _cancel_quietly(self, name: str) -> None:
        try:
            self.cancel_step(name)
        except SlurmError as err:  # the step ends with its dead srun all the same: one line, no traceback
            log.warning("cancelling the cut health check's step %s: %s", name, err)

    def finish(self) -> None:
        """Wait for the cut checks' step cancels, all together at most command_timeout_s (the stop's
        last act, after job_stopped: it delays only the exit); one still running is logged, as its
        step may outlive us."""
        self.standbys.stop_all()
        deadline = time.monotonic() + self.cfg.command_timeout_s
        for thread in self._cancels:
            thread.join(max(deadline - time.monotonic(), 0))
        left = [t.name for t in self._cancels if t.is_alive()]
        if left:
            log.warning("exiting with %d health-check step cancel(s) unfinished after %g s (%s): the step may run "
                        "until Slurm ends it", len(left), self.cfg.command_timeout_s, ", ".join(left))

    def node_failed(self, node: str, cause: str, step: int) -> NodeCleanup:
        """A node the policy drained: cancel every step of ours still there (a group whose `srun`
        died may have left its tasks) and, with `drain_failed_nodes`, drain it in Slurm. Returns why
        Slurm refused each, apart (a failed cancel does not skip the drain, nor reads as its refusal)."""
        cancel_error = drain_error = None
        try:
            self._cancel(lambda name, where: where == node and name.startswith(STEP_PREFIX))
        except SlurmError as err:
            cancel_error = str(err)
        if self.cfg.drain_failed_nodes:
            try:
                slurm(drain_argv(node, cause, step), self.cfg.command_timeout_s)
            except SlurmError as err:
                drain_error = str(err)
        return NodeCleanup(cancel_error, drain_error)

    def cancel_step(self, name: str) -> None:
        """Cancel every step of ours named `name` (one squeue, one scancel; nothing if none runs)."""
        self._cancel(lambda step, where: step == name)

    def _cancel(self, pick: Callable[[str, str], bool]) -> None:
        timeout = self.cfg.command_timeout_s
        listing = slurm(["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i %j %N"], timeout)
        ids = [step_id for step_id, name, node in steps(listing) if pick(name, node)]
        if ids:
            slurm(["scancel", "--quiet", *ids], timeout)



def attach_to_allocation(job: JobConfig, tp: int, cache_template: str,
                         env: Mapping[str, str] = os.environ) -> tuple[JobConfig, SlurmLauncher]:
    """The job with `cluster.nodes` set to the nodes it runs on (`cluster.exclude` already left out
    of them; validated again), and the launcher for them. Raises ConfigError (exit 2) before any step."""
    launcher = SlurmLauncher.from_allocation(job, tp, cache_template, env)
    return replace(job, cluster=allocated_cluster(job.cluster, launcher.nodes)), launcher
