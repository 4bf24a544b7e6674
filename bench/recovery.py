"""Recovery: what a SIGKILLed replica group costs with a hot spare, against a stop-everything restart.

Two supervised CPU jobs of the tiny trainer, one after the other in this run, each with a real
SIGKILL once the healthy group has finished step `--kill-at`:
  hot spare  — 2 active groups + 1 hot spare on 4 nodes; one active group is killed. The other must
               keep stepping; the spare takes the dead group's place; a new spare is started.
  checkpoint — 2 active groups, no spare; every group is killed, as if the job had no fault tolerance:
               the supervisor restarts it from the last durable checkpoint.
Figures (from the groups' train_log.jsonl rows and the supervisor's events.jsonl, wall clock):
  healthy_steps_lost:            steps the healthy group missed or repeated (goal 0);
  healthy_stall_seconds:         its longest step gap after the kill, less its median step (goal <= 2 s);
  kill_to_quorum_seconds:        kill -> the promoted spare's first step with a full quorum (goal <= 5 s);
  spare_refill_seconds:          kill -> a new spare is in sync again;
  checkpoint_steps_lost:         steps a stop-everything restart had to redo (kill step - checkpoint step);
  checkpoint_seconds_to_regain:  kill -> the restarted job is back at the step it had reached;
  hot_spare_seconds_to_regain:   the same for the hot-spare job (the job's next step after the kill).

    python bench/recovery.py [--steps 260 --kill-at 120 --checkpoint-interval 50]
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
from pathlib import Path

from watchtower.launch import free_port
from watchtower.supervisor.jobfile import job_toml

REPO = Path(__file__).resolve().parents[1]


def job_file(out: Path, name: str, steps: int, interval: int, active: int, spares: int, nodes: int) -> Path:
    overrides = [f"train.steps={steps}", f"checkpoint.interval_steps={interval}", "train.log_interval=1",
                 "monitor.system_interval_s=2.0"]
    path = out / f"{name}.toml"
    path.write_text(job_toml(
        {"name": name, "trainer_config": "tiny", "output_dir": str(out / name), "train_overrides": overrides},
        {"nodes": [f"node-{i}" for i in range(nodes)], "active_groups": active, "spare_groups": spares},
        {"base_port": free_port(), "metrics_port": 0}))
    return path


def rows(job_dir: Path, replica_id: str) -> list[dict]:
    path = job_dir / "groups" / replica_id / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_job(path: Path, job_dir: Path, watch: str, kill_at: int, victims: list[str]) -> float:
    """Run the job; SIGKILL `victims` (replica ids) once `watch` logged step `kill_at`. Returns the kill time."""
    proc = subprocess.Popen([sys.executable, "-m", "watchtower.cli", "supervise", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 400
        while killed_at is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{path.name}: {watch} never reached step {kill_at}")
            if any(r["step"] >= kill_at for r in rows(job_dir, watch)):
                pids = {e["replica_id"]: e["pid"] for e in events(job_dir) if e["event"] == "group_started"}
                killed_at = time.time()
                for victim in victims:
                    os.killpg(pids[victim], signal.SIGKILL)
            time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{path.name}: supervise exited {proc.returncode}: {err[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed_at


def first_time_at_or_after(job_dir: Path, step: int, after: float) -> float:
    times = [r["time"] for d in (job_dir / "groups").iterdir() for r in rows(job_dir, d.name)
             if r["step"] >= step and r["time"] > after]
    return min(times)


def hot_spare(out: Path, steps: int, kill_at: int, interval: int) -> dict:
    job_dir = out / "hot-spare"
    killed_at = run_job(job_file(out, "hot-spare", steps, interval, 2, 1, 4), job_dir, "g0001", kill_at, ["g0000"])
    healthy = rows(job_dir, "g0001")
    steps_seen = [r["step"] for r in healthy]
    expected = list(range(steps_seen[0], steps + 1))
    lost = len(set(expected) - set(steps_seen)) + (len(steps_seen) - len(set(steps_seen)))
    gaps = [b["time"] - a["time"] for a, b in zip(healthy, healthy[1:])]
    after = [b["time"] - a["time"] for a, b in zip(healthy, healthy[1:]) if b["time"] > killed_at]
    median = statistics.median(gaps)
    ev = events(job_dir)
    promoted = next(e["replica_id"] for e in ev if e["event"] == "group_started" and e["replica_id"] == "g0002")
    full = [r["time"] for r in rows(job_dir, promoted) if r["time"] > killed_at and r["participants"] >= 2]
    refilled = [e["time"] for e in ev if e["event"] == "spares_refilled" and e["time"] > killed_at]
    kill_step = max(r["step"] for r in healthy if r["time"] <= killed_at)
    return {"healthy_steps_lost": lost,
            "healthy_stall_seconds": round(max(after[:50]) - median, 2),
            "median_step_seconds": round(median, 3),
            "kill_to_quorum_seconds": round(min(full) - killed_at, 2),
            "spare_refill_seconds": round(min(refilled) - killed_at, 2) if refilled else None,
            "hot_spare_seconds_to_regain": round(first_time_at_or_after(job_dir, kill_step + 1, killed_at)
                                                 - killed_at, 2)}


def stop_everything(out: Path, steps: int, kill_at: int, interval: int) -> dict:
    job_dir = out / "checkpoint"
    killed_at = run_job(job_file(out, "checkpoint", steps, interval, 2, 0, 2), job_dir, "g0001", kill_at,
                        ["g0000", "g0001"])
    kill_step = max(r["step"] for d in ("g0000", "g0001") for r in rows(job_dir, d) if r["time"] <= killed_at)
    restarted = [d.name for d in (job_dir / "groups").iterdir() if d.name not in ("g0000", "g0001")]
    resumed_from = min(r["step"] for d in restarted for r in rows(job_dir, d)) - 1
    return {"checkpoint_steps_lost": kill_step - resumed_from,
            "checkpoint_seconds_to_regain": round(first_time_at_or_after(job_dir, kill_step + 1, killed_at)
                                                  - killed_at, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=260)
    ap.add_argument("--kill-at", type=int, default=120)
    ap.add_argument("--checkpoint-interval", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result = {**hot_spare(out, args.steps, args.kill_at, args.checkpoint_interval),
                  **stop_everything(out, args.steps, args.kill_at, args.checkpoint_interval),
                  "kill_at_step": args.kill_at, "checkpoint_interval_steps": args.checkpoint_interval}
    print(f"hot spare:  healthy group lost {result['healthy_steps_lost']} steps, stalled "
          f"{result['healthy_stall_seconds']:.2f} s; full quorum {result['kill_to_quorum_seconds']:.2f} s after "
          f"the kill; spare pool refilled after {result['spare_refill_seconds']} s")
    print(f"checkpoint: {result['checkpoint_steps_lost']} steps redone; back at the kill step after "
          f"{result['checkpoint_seconds_to_regain']:.1f} s (hot spare: {result['hot_spare_seconds_to_regain']:.2f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
