"""Recovery: what a SIGKILLed replica group costs with a hot spare, against a stop-everything restart.

Two supervised CPU jobs of the tiny trainer, one after the other in this run, each with a real
SIGKILL once the active groups (read from their rows: which one is the spare is a start-up race)
have finished step `--kill-at`:
  hot spare  — 2 active groups + 1 hot spare on 4 nodes; one active group is killed. The other must
               keep stepping; the spare takes the dead group's place; a new spare is started.
  checkpoint — 2 active groups, no spare; every group is killed, as if the job had no fault tolerance:
               the supervisor restarts it from the last durable checkpoint.
Figures (from the groups' train_log.jsonl rows and the supervisor's events.jsonl, wall clock):
  healthy_steps_lost:            steps the healthy group missed or repeated (goal 0);
  healthy_stall_seconds:         its longest step gap after the kill, less its median step (goal <= 1.1 s);
  kill_to_quorum_seconds:        kill -> the promoted spare's first step with a full quorum (goal <= 1.5 s);
  spare_refill_seconds:          kill -> a new spare is in sync again (goal <= 6 s);
  checkpoint_steps_lost:         steps a stop-everything restart had to redo (kill step - checkpoint step);
  checkpoint_seconds_to_regain:  kill -> the restarted job is back at the step it had reached;
  hot_spare_seconds_to_regain:   the same for the hot-spare job (the job's next step after the kill).

    python bench/recovery.py [--steps 260 --kill-at 120 --checkpoint-interval 50] [--launcher slurm]

--launcher slurm: the same two jobs submitted with `watchtower sbatch`, each group a Slurm job step.
The kill is a SIGKILL of the victims' step tasks: sent here, at once, on the private testbed (its
nodes' tasks run on this machine), through the controller (`scancel --signal=KILL`) on a real cluster,
where it lands some 0.1-0.3 s after the kill time the figures count from.
With SLURM_CONF unset it starts the private 4-node Slurm the tests use (`slurm_testbed`) and stops it
after; there the nodes share this machine's cores, so each rank gets one thread, as a local slot does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil

from watchtower.launch import free_port
from watchtower.supervisor.jobfile import job_toml
from watchtower.supervisor.slurm_commands import step_name, steps
from watchtower.supervisor.slurm_testbed import SlurmTestbed

REPO = Path(__file__).resolve().parents[1]


def job_file(out: Path, name: str, steps: int, interval: int, active: int, spares: int, nodes: int,
             slurm: bool) -> Path:
    overrides = [f"train.steps={steps}", f"checkpoint.interval_steps={interval}", "train.log_interval=1",
                 "monitor.system_interval_s=2.0"]
    cluster = {"active_groups": active, "spare_groups": spares}
    cluster |= {"launcher": "slurm"} if slurm else {"nodes": [f"node-{i}" for i in range(nodes)]}
    path = out / f"{name}.toml"
    path.write_text(job_toml(
        {"name": name, "trainer_config": "tiny", "output_dir": str(out / name), "train_overrides": overrides},
        cluster, {"base_port": free_port(), "metrics_port": 0},
        {"reserve_nodes": nodes - active - spares} if slurm else None))
    return path


def rows(job_dir: Path, replica_id: str) -> list[dict]:
    path = job_dir / "groups" / replica_id / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class LocalRun:
    """`watchtower supervise` here; a victim is SIGKILLed as a process group."""

    def __init__(self, path: Path, job_dir: Path):
        self.path, self.job_dir = path, job_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "watchtower.cli", "supervise", str(path)], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self, victims: list[str]) -> float:
        """SIGKILL each victim's process group; returns the time the first signal was sent."""
        pids = {e["replica_id"]: e["pid"] for e in events(self.job_dir) if e["event"] == "group_started"}
        killed_at = time.time()
        for victim in victims:
            os.killpg(pids[victim], signal.SIGKILL)
        return killed_at

    def finish(self) -> None:
        try:
            _, err = self.proc.communicate(timeout=600)
            if self.proc.returncode != 0:
                raise RuntimeError(f"{self.path.name}: supervise exited {self.proc.returncode}: {err[-2000:]}")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


class SlurmRun:
    """`watchtower sbatch`; a victim's step tasks are SIGKILLed (see `kill`). testbed: the private
    cluster this bench started, or None on a real one."""

    def __init__(self, path: Path, job_dir: Path, env: dict[str, str], testbed: SlurmTestbed | None):
        self.path, self.job_dir, self.env, self.testbed = path, job_dir, env, testbed
        out = subprocess.run([sys.executable, "-m", "watchtower.cli", "sbatch", str(path)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True).stdout
        self.job_id = out.split()[3].rstrip(":")  # "submitted Slurm job 123: ..."

    def slurm(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=True).stdout

    def running(self) -> bool:
        return bool(self.slurm("squeue", "-h", "-j", self.job_id, "-o", "%i").strip())

    def kill(self, victims: list[str]) -> float:
        """Returns the kill time the figures count from. On the private testbed (its nodes' tasks run
        here) the victims' tasks are found first, then SIGKILLed directly, as a crash kills them: at
        once, at the time returned. On a real cluster the kill goes through the controller
        (`scancel --signal=KILL`), which delivers it some 0.1-0.3 s after the time returned (taken
        before scancel): that delay is counted in kill_to_quorum, spare_refill and the regain figures,
        though no recovery has begun (the stall, a step gap, does not depend on it)."""
        listing = self.slurm("squeue", "-h", "-s", "-j", self.job_id, "-o", "%i %j %N")
        names = {step_name(v) for v in victims}
        victim_steps = [step for step, name, _ in steps(listing) if name in names]
        if self.testbed is None:
            killed_at = time.time()
            self.slurm("scancel", "--signal=KILL", *victim_steps)
            return killed_at
        # the tasks under the steps' slurmstepd (not the daemon itself: a crash, not a node's death)
        tasks = [t for daemon in self.testbed.step_daemons(set(victim_steps)) for t in daemon.children(recursive=True)]
        if not tasks:
            raise RuntimeError(f"no task of steps {victim_steps} found on this machine")
        killed_at = time.time()
        for task in tasks:
            with suppress(psutil.NoSuchProcess):
                task.send_signal(signal.SIGKILL)
        return killed_at

    def finish(self) -> None:
        deadline = time.monotonic() + 600
        while self.running():
            if time.monotonic() > deadline:
                self.slurm("scancel", self.job_id)
                raise RuntimeError(f"{self.path.name}: Slurm job {self.job_id} still running after 600 s")
            time.sleep(0.5)
        last = events(self.job_dir)[-1]
        if last["event"] != "job_finished":
            raise RuntimeError(f"{self.path.name}: Slurm job {self.job_id} ended with {last}")


def groups_at(job_dir: Path, step: int) -> list[str]:
    """The groups that logged `step`: those taking part in the quorum. A spare logs no rows, and which
    group torchft makes the spare is a start-up race, so roles are read here, never assumed from ids."""
    groups = job_dir / "groups"
    return sorted(d.name for d in groups.iterdir() if any(r["step"] >= step for r in rows(job_dir, d.name))) \
        if groups.exists() else []


def run_job(run: LocalRun | SlurmRun, kill_at: int, active: int, victims: int) -> tuple[float, list[str]]:
    """Run the job; once `active` groups have logged step `kill_at`, SIGKILL the first `victims` of them.
    Returns the kill time and the active groups, victims first."""
    killed_at, actives = None, []
    try:
        deadline = time.monotonic() + 400
        while killed_at is None:
            if time.monotonic() > deadline or not run.running():
                raise RuntimeError(f"{run.path.name}: {active} groups never reached step {kill_at}")
            actives = groups_at(run.job_dir, kill_at)
            if len(actives) >= active:
                killed_at = run.kill(actives[:victims])
            time.sleep(0.02)
    finally:
        run.finish()
    return killed_at, actives


def first_time_at_or_after(job_dir: Path, step: int, after: float, victims: list[str]) -> float:
    """When a group other than the victims (a step they finished between the kill time and the
    signal's arrival is not a recovery) first logged `step` or later after `after`."""
    times = [r["time"] for d in (job_dir / "groups").iterdir() if d.name not in victims
             for r in rows(job_dir, d.name) if r["step"] >= step and r["time"] > after]
    return min(times)


def start(path: Path, job_dir: Path, slurm_env: dict[str, str] | None,
          testbed: SlurmTestbed | None) -> LocalRun | SlurmRun:
    return LocalRun(path, job_dir) if slurm_env is None else SlurmRun(path, job_dir, slurm_env, testbed)


def hot_spare(out: Path, steps: int, kill_at: int, interval: int, slurm_env: dict[str, str] | None,
              testbed: SlurmTestbed | None) -> dict:
    job_dir = out / "hot-spare"
    run = start(job_file(out, "hot-spare", steps, interval, 2, 1, 4, slurm_env is not None), job_dir, slurm_env,
                testbed)
    killed_at, (victim, survivor) = run_job(run, kill_at, active=2, victims=1)
    healthy = rows(job_dir, survivor)
    steps_seen = [r["step"] for r in healthy]
    expected = list(range(steps_seen[0], steps + 1))
    lost = len(set(expected) - set(steps_seen)) + (len(steps_seen) - len(set(steps_seen)))
    gaps = [b["time"] - a["time"] for a, b in zip(healthy, healthy[1:])]
    after = [b["time"] - a["time"] for a, b in zip(healthy, healthy[1:]) if b["time"] > killed_at]
    median = statistics.median(gaps)
    ev = events(job_dir)
    spare = next(e["replica_id"] for e in ev if e["event"] == "group_started" and e["replica_id"] not in
                 (victim, survivor))  # the first group started besides the two active ones: the hot spare
    full = [r["time"] for r in rows(job_dir, spare) if r["time"] > killed_at and r["participants"] >= 2]
    refilled = [e["time"] for e in ev if e["event"] == "spares_refilled" and e["time"] > killed_at]
    kill_step = max(r["step"] for r in healthy if r["time"] <= killed_at)
    return {"healthy_steps_lost": lost,
            "healthy_stall_seconds": round(max(after[:50]) - median, 2),
            "median_step_seconds": round(median, 3),
            "kill_to_quorum_seconds": round(min(full) - killed_at, 2),
            "spare_refill_seconds": round(min(refilled) - killed_at, 2) if refilled else None,
            "hot_spare_seconds_to_regain": round(first_time_at_or_after(job_dir, kill_step + 1, killed_at,
                                                                        [victim]) - killed_at, 2)}


def stop_everything(out: Path, steps: int, kill_at: int, interval: int, slurm_env: dict[str, str] | None,
                    testbed: SlurmTestbed | None) -> dict:
    """Two free nodes beside the two groups: the two deaths may be seen one poll apart (on Slurm each
    srun learns of its tasks' deaths on its own), and a group lost while its peer still runs is
    replaced as a spare would be; with no free node the job would stop short of a quorum instead of
    restarting. The second death then finds no group holding the run's state: checkpoint restart."""
    job_dir = out / "checkpoint"
    run = start(job_file(out, "checkpoint", steps, interval, 2, 0, 4, slurm_env is not None), job_dir, slurm_env,
                testbed)
    killed_at, first = run_job(run, kill_at, active=2, victims=2)
    kill_step = max(r["step"] for d in first for r in rows(job_dir, d) if r["time"] <= killed_at)
    restarted = [d.name for d in (job_dir / "groups").iterdir() if d.name not in first]
    resumed_from = min(r["step"] for d in restarted for r in rows(job_dir, d)) - 1
    return {"checkpoint_steps_lost": kill_step - resumed_from,
            "checkpoint_seconds_to_regain": round(first_time_at_or_after(job_dir, kill_step + 1, killed_at, first)
                                                  - killed_at, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=260)
    ap.add_argument("--kill-at", type=int, default=120)
    ap.add_argument("--checkpoint-interval", type=int, default=50)
    ap.add_argument("--launcher", choices=("local", "slurm"), default="local")
    ap.add_argument("--keep", type=Path, help="a new directory to write the jobs in and keep (default: a "
                    "temporary one, deleted after)")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep = args.keep.resolve()  # the supervisor runs from the repository root
        if args.keep.exists():
            ap.error(f"--keep {args.keep}: already exists; name a new directory")
    with ExitStack() as stack:
        if args.keep is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            out = args.keep
            out.mkdir(parents=True)
        slurm_env, testbed = None, None
        if args.launcher == "slurm":
            slurm_env = {**os.environ}
            if "SLURM_CONF" not in os.environ:  # the private test cluster: 4 nodes sharing this machine's cores
                testbed = stack.enter_context(SlurmTestbed(out / "slurm"))
                slurm_env |= {**testbed.env, "OMP_NUM_THREADS": "1"}
        result = {**hot_spare(out, args.steps, args.kill_at, args.checkpoint_interval, slurm_env, testbed),
                  **stop_everything(out, args.steps, args.kill_at, args.checkpoint_interval, slurm_env, testbed),
                  "kill_at_step": args.kill_at, "checkpoint_interval_steps": args.checkpoint_interval}
    print(f"hot spare:  healthy group lost {result['healthy_steps_lost']} steps, stalled "
          f"{result['healthy_stall_seconds']:.2f} s; full quorum {result['kill_to_quorum_seconds']:.2f} s after "
          f"the kill; spare pool refilled after {result['spare_refill_seconds']} s")
    print(f"checkpoint: {result['checkpoint_steps_lost']} steps redone; back at the kill step after "
          f"{result['checkpoint_seconds_to_regain']:.1f} s (hot spare: {result['hot_spare_seconds_to_regain']:.2f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
