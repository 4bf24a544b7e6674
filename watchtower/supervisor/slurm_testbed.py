"""A real Slurm of a few nodes on this one machine: for tests, `bench/recovery.py --launcher slurm`
and trying `watchtower sbatch` without a cluster.

Debian's Slurm (22.05: `apt-get install slurmctld slurmd slurm-client munge`) runs several slurmd
daemons on one host, each as its own node (`slurmd -N nK`), so the Slurm launcher is tested against
Slurm itself, not a mock. Everything is private: a slurm.conf in `workdir` (point `SLURM_CONF` at it;
`env` does), ports the kernel picked, a job-id range of its own, state and logs in `workdir`. The
daemons run in the foreground as our children and are stopped by their pids; munged is started
only if none answers, and then stopped too. The nodes share this machine's filesystem and cores.

    with SlurmTestbed(tmp_path) as slurm:      # ~3 s until every node is idle
        subprocess.run(["sinfo"], env={**os.environ, **slurm.env})
        slurm.kill_node("n2")                  # SIGKILL its slurmd, its steps' slurmstepd and tasks

Needs root (slurmd launches tasks, munged runs as the munge user); `unavailable()` says why not.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from watchtower.launch import free_ports
from watchtower.supervisor.slurm_commands import parse_records, steps

BINARIES = ("slurmctld", "slurmd", "srun", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munge", "munged")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
MUNGE_SOCKET_DIR = Path("/run/munge")


def unavailable() -> str | None:
    """Why a testbed cannot start here (a missing binary, not root), or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                "slurm-client munge")
    if os.geteuid() != 0:
        return "a private Slurm needs root here (slurmd launches tasks; munged runs as the munge user)"
    return None


def node_address(index: int) -> str:
    """Node `index`'s own loopback address (127.0.0.11, .12, ...: all of 127/8 reaches this host on
    Linux), so a 127.0.0.1 left anywhere on the Slurm path shows as the wrong node's address.

    >>> [node_address(i) for i in range(3)]
    ['127.0.0.11', '127.0.0.12', '127.0.0.13']
    """
    return f"127.0.0.{11 + index}"


def slurm_conf(workdir: Path, nodes: list[str], ctld_port: int, node_ports: list[int], first_job_id: int,
               cpus: int) -> str:
    """The private slurm.conf (every path under `workdir`), as checked in shared OPS-NOTES."""
    lines = [f"ClusterName=wt{first_job_id}", "SlurmctldHost=localhost", f"SlurmctldPort={ctld_port}",
             f"SlurmdPort={node_ports[0]}", "AuthType=auth/munge", "SlurmUser=root",
             f"SlurmdSpoolDir={workdir}/spool/%n", f"SlurmdPidFile={workdir}/slurmd-%n.pid",
             f"SlurmdLogFile={workdir}/log/slurmd-%n.log", f"SlurmctldLogFile={workdir}/log/slurmctld.log",
             f"SlurmctldPidFile={workdir}/slurmctld.pid", f"StateSaveLocation={workdir}/state",
             "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
             "SelectTypeParameters=CR_Core", "ReturnToService=2", "SlurmdTimeout=10", "MpiDefault=none",
             "KillWait=10", f"FirstJobId={first_job_id}"]
    lines += [f"NodeName={n} NodeHostname=localhost NodeAddr={node_address(i)} Port={p} CPUs={cpus} RealMemory=1000"
              for i, (n, p) in enumerate(zip(nodes, node_ports))]
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP "
                 f"OverSubscribe=FORCE:4")
    return "\n".join(lines) + "\n"


class SlurmTestbed:
    """`nodes` nodes named n1..nN with `cpus` CPUs each, on this machine."""

    def __init__(self, workdir: Path, nodes: int = 4, cpus: int = 2):
        self.workdir = Path(workdir)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.conf = self.workdir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.first_job_id = random.randrange(100_000, 900_000, 1000)  # no clash with another Slurm's slurmstepd
        self.ctld: subprocess.Popen | None = None
        self.slurmd: dict[str, subprocess.Popen] = {}
        self.munged: subprocess.Popen | None = None

    def __enter__(self) -> SlurmTestbed:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- start / stop ----------------------------------------------------------------------------

    def start(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        for sub in ("spool", "state", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._munge()
        ctld_port, *node_ports = free_ports(len(self.nodes) + 1)
        self.conf.write_text(slurm_conf(self.workdir, self.nodes, ctld_port, node_ports, self.first_job_id, self.cpus))
        log = open(self.workdir / "log" / "daemons.out", "ab")
        self.ctld = subprocess.Popen(["slurmctld", "-D", "-f", str(self.conf)], stdout=log, stderr=log)
        for node in self.nodes:
            self.start_node(node)
        self._wait_idle()

    def start_node(self, node: str) -> None:
        log = open(self.workdir / "log" / "daemons.out", "ab")
        self.slurmd[node] = subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", node], stdout=log, stderr=log)

    def _munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged answers already: use it, leave it running
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "-c"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        self.munged = subprocess.Popen(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._until(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                    "munged to answer")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            states = self.node_states()
            return len(states) == len(self.nodes) and all(s == "IDLE" for s in states.values())

        self._until(idle, f"{len(self.nodes)} idle nodes")

    def _until(self, check, what: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in [self.ctld, *self.slurmd.values()]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args}); see {self.workdir / 'log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout:.0f}s for {what}; see {self.workdir / 'log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started (SIGTERM, then SIGKILL) and any
        slurmstepd left of our jobs (their ids are ours alone)."""
        if self.ctld is not None and self.ctld.poll() is None:
            try:
                self.run("scancel", "--full", f"--user={os.getuid()}")
                self._until(lambda: not self.run("squeue", "-h", "-o", "%i").strip(), "every job to end",
                            STOP_TIMEOUT_S)
            except (RuntimeError, OSError):
                pass  # stopping anyway
        for proc in self.step_daemons():
            kill_tree(proc)
        for proc in [*self.slurmd.values(), self.ctld, self.munged]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.slurmd.values(), self.ctld, self.munged]:
            if proc is not None:
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.ctld, self.slurmd, self.munged = None, {}, None

    # ---- what tests do ---------------------------------------------------------------------------

    def run(self, *argv: str) -> str:
        """A Slurm client command against this cluster; its stdout."""
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**os.environ, **self.env})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def node_states(self) -> dict[str, str]:
        return {r["NodeName"]: r.get("State", "") for r in parse_records(self.run("scontrol", "-o", "show", "node"))
                if "NodeName" in r}

    def step_daemons(self, step_ids: set[str] | None = None) -> list[psutil.Process]:
        """The slurmstepd processes of our jobs (`slurmstepd: [JOB.STEP]`), or of these step ids only."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith("slurmstepd: [") and cmd.endswith("]"):
                step = cmd[len("slurmstepd: ["):-1]
                job = step.split(".")[0]
                if job.isdigit() and self.first_job_id <= int(job) < self.first_job_id + 1000 \
                        and (step_ids is None or step in step_ids):
                    found.append(proc)
        return found

    def kill_node(self, node: str) -> None:
        """A node dies: SIGKILL its slurmd, then the slurmstepd of every step on it and their tasks."""
        on_node = {step for step, _, where in steps(self.run("squeue", "-h", "-s", "-o", "%i %j %N")) if where == node}
        self.slurmd[node].send_signal(signal.SIGKILL)
        self.slurmd[node].wait()
        for proc in self.step_daemons(on_node):
            kill_tree(proc)


    def revive(self, node: str) -> None:
        """Bring a killed or drained node back: its slurmd again, `state=resume`, until it is idle."""
        if node not in self.slurmd or self.slurmd[node].poll() is not None:
            self.start_node(node)
        self._until(lambda: not self.node_states()[node].endswith("*"), f"{node} responding")
        try:
            self.run("scontrol", "update", f"nodename={node}", "state=resume")
        except RuntimeError:
            pass  # not drained or down: nothing to resume
        self._until(lambda: self.node_states()[node] == "IDLE", f"{node} idle")


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL a process and every descendant (the tasks of a slurmstepd)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
