"""Alert latency: seconds from an injected fault to the page, through real Prometheus and Alertmanager.

Two tiny trainers on loopback, scraped and evaluated every 5 s (`--interval`), the repo's rules, a
webhook pager, then a supervised job. Measures, in one run:
  spike_to_page_seconds: the step with `--inject loss_spike@N` finished → the page arrived;
  kill_to_page_seconds:  SIGKILL of the other trainer → its WatchtowerRankDown page arrived;
  kill_to_page_seconds_direct: SIGKILL of a supervised group → its WatchtowerGroupFailed page,
                         posted by the supervisor itself ([supervisor] alertmanager_url), arrived.
Goal: <= 30 s each with 5 s intervals; <= 2 s for the direct page (routed as in the shipped
alerts/alertmanager.yml: group_wait 0 s for the supervisor's own alerts). Also reported:
kill_to_decision_seconds, the supervisor's share (the kill until its group_failed event).

    python bench/alert_latency.py [--interval 5s] [--direct-only]
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
from watchtower.supervisor.alert_contract import DIRECT_ALERTS
from watchtower.supervisor.jobfile import job_toml

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


def supervised_kill_to_page(out: Path, stack: AlertingStack) -> tuple[float, float]:
    """A supervised tiny job posting to the stack's Alertmanager: SIGKILL its group after its first
    step; the seconds until the pager has its WatchtowerGroupFailed page, and until the decision."""
    job_dir = out / "supervised"
    path = out / "supervised.toml"
    path.write_text(job_toml({"name": "supervised", "trainer_config": "tiny", "output_dir": str(job_dir),
                              "train_overrides": ["train.steps=100000", "train.log_interval=1"]},
                             {"nodes": ["node-a", "node-b"], "active_groups": 1, "spare_groups": 0},
                             {"base_port": free_port(), "metrics_port": 0, "alertmanager_url": stack.alertmanager_url}))
    sup = subprocess.Popen([sys.executable, "-m", "watchtower.cli", "supervise", str(path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        step_time(job_dir / "groups", "g0000", 1, timeout=300)
        started = next(json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()
                       if json.loads(line)["event"] == "group_started")
        killed_at = time.time()
        os.killpg(started["pid"], signal.SIGKILL)
        paged_at = stack.pager.wait_for("WatchtowerGroupFailed", 60, run="supervised")["received_at"]
        decided_at = next(e["time"] for e in map(json.loads, (job_dir / "events.jsonl").read_text().splitlines())
                          if e["event"] == "group_failed")
        return paged_at - killed_at, decided_at - killed_at
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", default="5s")
    ap.add_argument("--direct-only", action="store_true",
                    help="measure only kill_to_page_seconds_direct (no Prometheus path: seconds, not minutes)")
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = []
        try:
            stack = AlertingStack(out / "stack", interval=args.interval, group_wait="1s")
            stack.alertmanager_config = shipped_routing(stack.pager.url)
            with stack:
                if not args.direct_only:
                    result.update(through_prometheus(out, stack, procs))
                paged, decided = supervised_kill_to_page(out, stack)
                result.update(kill_to_page_seconds_direct=round(paged, 2), kill_to_decision_seconds=round(decided, 2))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    result["scrape_and_eval_interval"] = args.interval
    print("  ".join(f"{key}: {value}" for key, value in result.items()))
    print(json.dumps(result))


def shipped_routing(pager_url: str) -> dict:
    """The stack's Alertmanager routing (1 s group_wait: pages from rules) with the shipped route of
    the supervisor's own alerts (group_wait 0 s), every receiver the stack's pager."""
    direct = "|".join(spec.alertname for spec in DIRECT_ALERTS)
    return {"route": {"receiver": "pager", "group_by": ["run", "alertname"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h",
                      "routes": [{"matchers": [f'alertname=~"{direct}"'], "group_wait": "0s"}]},
            "receivers": [{"name": "pager", "webhook_configs": [{"url": pager_url}]}]}


def through_prometheus(out: Path, stack: AlertingStack, procs: list[subprocess.Popen]) -> dict[str, float]:
    """The spike and the dead rank, paged by the rules a scrape and an evaluation after the fact."""
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
    return {"spike_to_page_seconds": round(spike_page["received_at"] - spike_at, 2),
            "kill_to_page_seconds": round(down_page["received_at"] - killed_at, 2)}


if __name__ == "__main__":
    main()
