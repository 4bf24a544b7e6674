"""Alert latency: seconds from an injected fault to the page, through real Prometheus and Alertmanager.

Two tiny trainers on loopback, scraped and evaluated every 5 s (`--interval`), the repo's rules, a
webhook pager. Measures, in one run:
  spike_to_page_seconds: the step with `--inject loss_spike@N` finished → the page arrived;
  kill_to_page_seconds:  SIGKILL of the other trainer → its WatchtowerRankDown page arrived.
Goal: <= 30 s each with 5 s intervals.

    python bench/alert_latency.py [--interval 5s]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from watchtower.alerting_stack import AlertingStack
from watchtower.launch import free_port
from watchtower.prometheus_config import Target

SPIKE_STEP = 150




def trainer(out: Path, run: str, port: int, steps: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "watchtower.cli", "train", "--config", "tiny", "--steps", str(steps), "--run", run,
           "--port", str(port), "--output-dir", str(out / run), "--monitor.bind", "127.0.0.1",
           "--monitor.linger_s", "300", "--train.log_interval", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def step_time(out: Path, run: str, step: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / run / "train_log.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] == step:
                    return row["time"]
        time.sleep(0.2)
    raise TimeoutError(f"{run} never logged step {step}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", default="5s")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = []
        try:
            with AlertingStack(out / "stack", interval=args.interval, group_wait="1s") as stack:
                spiky_port, victim_port = free_port(), free_port()
                procs.append(trainer(out, "spiky", spiky_port, 400, "--inject", f"loss_spike@{SPIKE_STEP}"))
                procs.append(trainer(out, "victim", victim_port, 1_000_000))
                stack.set_targets([Target(f"127.0.0.1:{spiky_port}", "spiky", 0, 0, "node-a"),
                                   Target(f"127.0.0.1:{victim_port}", "victim", 0, 0, "node-b")])
                spike_at = step_time(out, "spiky", SPIKE_STEP)
                spike_page = stack.pager.wait_for("WatchtowerLossSpike", 120, run="spiky")
                step_time(out, "victim", 20)
                urllib.request.urlopen(f"http://127.0.0.1:{victim_port}/metrics", timeout=5).read()
                killed_at = time.time()
                procs[1].send_signal(signal.SIGKILL)
                down_page = stack.pager.wait_for("WatchtowerRankDown", 120, run="victim")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    result = {"spike_to_page_seconds": round(spike_page["received_at"] - spike_at, 2),
              "kill_to_page_seconds": round(down_page["received_at"] - killed_at, 2),
              "scrape_and_eval_interval": args.interval}
    print(f"loss spike -> page: {result['spike_to_page_seconds']:.1f} s;  kill -> page: "
          f"{result['kill_to_page_seconds']:.1f} s  (intervals {args.interval})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
