"""Alert rules and routing: promtool/amtool offline, then a fire drill through real servers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from conftest import REPO, free_port, run_watchtower, wait_for_metrics, value, watchtower_cmd
from watchtower.metric_catalog import declared_series
from watchtower.alerting_stack import AlertingStack
from watchtower.prometheus_config import Target

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


# ---- against real servers -------------------------------------------------------------------

def one_thread_env() -> dict[str, str]:
    """Two trainers beside Prometheus on a 2-core machine: one OpenMP thread each, or spinning
    threads starve each other (measured: 10x slower)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def stack(tmp_path):
    with AlertingStack(tmp_path / "stack", interval="1s") as s:
        yield s


def test_inhibition_node_down_silences_its_rank_alerts(tmp_path):
    """The repo's own alertmanager.yml (webhooks pointed at our pager, PagerDuty left out) on a real
    Alertmanager: a dead node's hang is inhibited; the same alert on another node pages."""
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    stack = AlertingStack(tmp_path / "am")
    for receiver in config["receivers"]:
        receiver.pop("pagerduty_configs", None)
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = stack.pager.url
    config["route"]["group_wait"] = "1s"
    for route in config["route"]["routes"]:
        route["group_wait"] = "1s"
    stack.alertmanager_config = config
    with stack:
        node = {"run": "r", "node": "n7", "replica_group": "1"}
        stack.post_alerts([
            {"labels": {"alertname": "WatchtowerRankDown", "severity": "page", "rank": "0", **node}},
            {"labels": {"alertname": "WatchtowerRankHung", "severity": "page", "rank": "1", **node}},
            {"labels": {"alertname": "WatchtowerRankHung", "severity": "page", "rank": "0", "run": "r",
                        "node": "n8", "replica_group": "2"}},
        ])
        stack.pager.wait_for("WatchtowerRankDown", 20, node="n7")
        stack.pager.wait_for("WatchtowerRankHung", 20, node="n8")
        time.sleep(2)
        state = {(a["labels"]["alertname"], a["labels"]["node"]): a["status"] for a in stack.alertmanager_alerts()}
        assert state[("WatchtowerRankHung", "n7")]["inhibitedBy"], state
        assert not state[("WatchtowerRankHung", "n8")]["inhibitedBy"]
        assert not any(p["labels"]["alertname"] == "WatchtowerRankHung" and p["labels"]["node"] == "n7"
                       for p in stack.pager.pages)


def test_fire_drill_pages_spike_and_dead_rank_not_clean_run(tmp_path, processes, stack):
    runs = {}
    for run, inject in (("spiky", ["--inject", "loss_spike@80"]), ("clean", [])):
        port = free_port()
        proc = processes.start(watchtower_cmd(
            "train", "--config", "tiny", "--steps", "120", "--run", run, "--port", str(port),
            "--output-dir", str(tmp_path / run), "--monitor.bind", "127.0.0.1", "--monitor.linger_s", "120",
            *inject), stderr=subprocess.DEVNULL, env=one_thread_env())
        runs[run] = (port, proc)
    stack.set_targets([Target(f"127.0.0.1:{port}", run, 0, 0, f"node-{run}") for run, (port, _) in runs.items()])
    for run, (port, proc) in runs.items():
        wait_for_metrics(port, lambda s: value(s, "watchtower_train_step") == 120, proc=proc)
    page = stack.pager.wait_for("WatchtowerLossSpike", 30, run="spiky")
    assert {"severity": "page", "rank": "0", "node": "node-spiky", "replica_group": "0"}.items() <= page["labels"].items()
    assert page["annotations"]["summary"].endswith("at step 80")
    assert page["annotations"]["runbook_url"] == "docs/runbooks.md#loss-spike"
    time.sleep(3)  # a few more evaluations: the clean run must still have paged nothing
    assert all(p["labels"]["run"] == "spiky" for p in stack.pager.pages), [p["labels"] for p in stack.pager.pages]
    runs["clean"][1].send_signal(signal.SIGKILL)
    down = stack.pager.wait_for("WatchtowerRankDown", 40, run="clean")
    assert {"severity": "page", "rank": "0", "node": "node-clean", "job": "watchtower-ranks"}.items() <= down["labels"].items()


def test_prometheus_config_command_writes_a_config_promtool_accepts(tmp_path):
    out = tmp_path / "prometheus.yml"
    result = run_watchtower("prometheus-config", "--out", str(out), "--targets-file", str(tmp_path / "targets.json"),
                            "--scrape-interval", "5s", "--evaluation-interval", "5s")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    jobs = {job["job_name"]: job["file_sd_configs"][0]["files"][0] for job in config["scrape_configs"]}
    assert jobs == {"watchtower-ranks": str(tmp_path / "targets.json"),
                    "watchtower-supervisor": str(tmp_path / "supervisor_targets.json")}
    checked = tool("promtool", "check", "config", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    bad = run_watchtower("prometheus-config", "--out", str(out), "--scrape-interval", "fast")
    assert bad.returncode == 2 and "--scrape-interval" in bad.stderr
