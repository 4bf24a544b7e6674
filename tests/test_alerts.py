"""Alert rules and routing: promtool/amtool offline, then a fire drill through real servers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, free_port, wait_for_metrics, value, watchtower_cmd
from watchtower.metric_catalog import declared_series
from watchtower.prometheus_config import Target, render_prometheus_config, write_file_sd

ALERTS = REPO / "alerts"
PROMTOOL, AMTOOL = shutil.which("promtool"), shutil.which("amtool")
PROMETHEUS, ALERTMANAGER = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")


def tool(*cmd: str) -> subprocess.CompletedProcess:
    assert shutil.which(cmd[0]), f"{cmd[0]} is missing: .ci/run installs Debian's prometheus packages"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_and_unit_tests_the_rules():
    checked = tool("promtool", "check", "rules", str(ALERTS / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for test_file in sorted((ALERTS / "tests").glob("*.yml")):
        result = tool("promtool", "test", "rules", str(test_file))
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_unit_test_severity_and_runbook():
    rules = (ALERTS / "rules.yml").read_text()
    tests = "".join(p.read_text() for p in (ALERTS / "tests").glob("*.yml"))
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    names = re.findall(r"- alert: (\w+)", rules)
    assert len(names) >= 15
    for name in names:
        assert f"alertname: {name}" in tests, f"{name} has no promtool test"
    anchors = set(re.findall(r"runbook_url: docs/runbooks.md#([\w-]+)", rules))
    assert len(re.findall(r"labels: \{severity: (?:page|ticket)\}", rules)) == len(names)
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
             for h in re.findall(r"^## (.+)$", runbooks, re.M)}
    assert anchors <= slugs, f"runbook sections missing: {anchors - slugs}"


def test_rules_use_only_declared_metric_names():
    used = set(re.findall(r"\b(watchtower_[a-z_]+)\b", (ALERTS / "rules.yml").read_text()))
    assert used and used <= declared_series(), used - declared_series()


def test_alertmanager_config_and_routes():
    config = str(ALERTS / "alertmanager.yml")
    assert tool("amtool", "check-config", config).returncode == 0
    for labels, receiver in ((["severity=page", "run=x"], "pager"), (["severity=ticket"], "ticket-queue")):
        result = tool("amtool", "config", "routes", "test", f"--config.file={config}",
                      f"--verify.receivers={receiver}", *labels)
        assert result.returncode == 0, result.stdout + result.stderr


# ---- the fire drill ---------------------------------------------------------------------------

class Pager:
    """A webhook receiver on loopback that records every notification Alertmanager sends."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pager.alerts.extend(a for a in body["alerts"] if a["status"] == "firing")
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, alertname: str, timeout: float, **labels: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for a in self.alerts:
                if a["labels"]["alertname"] == alertname and labels.items() <= a["labels"].items():
                    return a
            time.sleep(0.2)
        raise AssertionError(f"no page {alertname} {labels} in {timeout}s; got {[a['labels'] for a in self.alerts]}")


def one_thread_env() -> dict[str, str]:
    """Two trainers beside Prometheus on a 2-core machine: one OpenMP thread each, or spinning
    threads starve each other (measured: 10x slower)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def pager():
    p = Pager()
    yield p
    p.server.shutdown()


@pytest.fixture
def alerting_stack(tmp_path, processes, pager):
    """Real Alertmanager (webhook → pager) and Prometheus (1 s scrape/eval) on loopback."""
    for binary in (PROMETHEUS, ALERTMANAGER):
        assert binary, ".ci/run installs Debian's prometheus and prometheus-alertmanager"
    am_port, prom_port = free_port(), free_port()
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(json.dumps({
        "route": {"receiver": "pager", "group_by": ["run", "alertname"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "pager", "webhook_configs": [{"url": f"http://127.0.0.1:{pager.port}/page"}]}]}))
    processes.start([ALERTMANAGER, f"--config.file={am_config}", f"--web.listen-address=127.0.0.1:{am_port}",
                     "--cluster.listen-address=", f"--storage.path={tmp_path / 'am-data'}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    targets = tmp_path / "targets.json"
    write_file_sd(targets, [])
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(render_prometheus_config(str(targets), f"127.0.0.1:{am_port}", None, "1s", "1s"))
    processes.start([PROMETHEUS, f"--config.file={prom_config}", f"--web.listen-address=127.0.0.1:{prom_port}",
                     f"--storage.tsdb.path={tmp_path / 'prom-data'}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{am_port}/-/ready")
    wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
    return targets, prom_port


def test_fire_drill_pages_spike_and_dead_rank_not_clean_run(tmp_path, processes, pager, alerting_stack):
    targets, prom_port = alerting_stack
    runs = {}
    for run, inject in (("spiky", ["--inject", "loss_spike@80"]), ("clean", [])):
        port = free_port()
        proc = processes.start(watchtower_cmd(
            "train", "--config", "tiny", "--steps", "120", "--run", run, "--port", str(port),
            "--output-dir", str(tmp_path / run), "--monitor.bind", "127.0.0.1", "--monitor.linger_s", "120",
            *inject), stderr=subprocess.DEVNULL, env=one_thread_env())
        runs[run] = (port, proc)
    write_file_sd(targets, [Target(f"127.0.0.1:{port}", run, 0, 0, f"node-{run}") for run, (port, _) in runs.items()])
    for run, (port, proc) in runs.items():
        wait_for_metrics(port, lambda s: value(s, "watchtower_train_step") == 120, proc=proc)
    page = pager.wait_for("WatchtowerLossSpike", 30, run="spiky")
    assert {"severity": "page", "rank": "0", "node": "node-spiky", "replica_group": "0"}.items() <= page["labels"].items()
    assert page["annotations"]["summary"].endswith("at step 80")
    assert page["annotations"]["runbook_url"] == "docs/runbooks.md#loss-spike"
    time.sleep(3)  # a few more evaluations: the clean run must still have paged nothing
    assert all(a["labels"]["run"] == "spiky" for a in pager.alerts), [a["labels"] for a in pager.alerts]
    runs["clean"][1].send_signal(signal.SIGKILL)
    down = pager.wait_for("WatchtowerRankDown", 40, run="clean")
    assert {"severity": "page", "rank": "0", "node": "node-clean", "job": "watchtower-ranks"}.items() <= down["labels"].items()
