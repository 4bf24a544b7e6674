"""Alert rules and routing: promtool/amtool offline, then a fire drill through real servers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import yaml

from conftest import REPO, free_port, run_watchtower, wait_for_metrics, value, watchtower_cmd
from held_start import HeldStart
from served_text import ServedText
from waiting import WAIT_CEILING_S, wait_for_loss_spike_page, wait_for_rule_evaluations, wait_until
from watchtower.metric_catalog import declared_series
from watchtower.alerting_stack import AlertingStack
from watchtower.prometheus_config import Target
from watchtower.supervisor.alert_contract import CRASH_LOOP, DIRECT_ALERTS, GROUP_FAILED, PAGED_REASONS
from watchtower.supervisor.direct_alerts import POST_TIMEOUT_S, DirectAlerts
from watchtower.supervisor.errors import StageErrors

ALERTS = REPO / "alerts"
PROMTOOL, AMTOOL = shutil.which("promtool"), shutil.which("amtool")
PROMETHEUS, ALERTMANAGER = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")


def tool(*cmd: str) -> subprocess.CompletedProcess:
    assert shutil.which(cmd[0]), f"{cmd[0]} is missing: .ci/run installs Debian's prometheus packages"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_and_unit_tests_the_rules():
    checked = tool("promtool", "check", "rules", str(ALERTS / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # One promtool per test file, all at once: each evaluates every rule at each 15 s of its tests' time
    # (rules_test.yml alone: ~2,400 evaluations, 6-20 s of one core), so the files overlap on the cores
    # the other lane leaves free instead of queueing (the suite is not CPU-bound).
    runs = {path.name: subprocess.Popen(["promtool", "test", "rules", str(path)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
            for path in sorted((ALERTS / "tests").glob("*.yml"))}
    assert runs, "no promtool tests under alerts/tests"
    try:
        for name, proc in runs.items():
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{name}:\n{output}"
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


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
        stack.pager.wait_for("WatchtowerRankDown", WAIT_CEILING_S, node="n7")
        # n7's and n8's hangs share an Alertmanager group (run, alertname): the flush that paged n8 has
        # already passed n7's hang through the inhibition stage, so the pages below are final.
        stack.pager.wait_for("WatchtowerRankHung", WAIT_CEILING_S, node="n8")

        def state_once_n7_hang_is_inhibited() -> dict | None:
            state = {(a["labels"]["alertname"], a["labels"]["node"]): a["status"] for a in stack.alertmanager_alerts()}
            return state if state.get(("WatchtowerRankHung", "n7"), {}).get("inhibitedBy") else None

        state = wait_until(state_once_n7_hang_is_inhibited, "Alertmanager to mark n7's hang inhibited")
        assert not state[("WatchtowerRankHung", "n8")]["inhibitedBy"]
        assert not any(p["labels"]["alertname"] == "WatchtowerRankHung" and p["labels"]["node"] == "n7"
                       for p in stack.pager.pages)


class FakeRank:
    """/metrics of one rank whose loss-spike counter the test sets, served on loopback."""

    def __init__(self, spikes: int) -> None:
        self.spikes = spikes
        self._served = ServedText(lambda: (
            f'watchtower_detector_events_total{{detector="loss_spike",severity="critical"}} {self.spikes}\n'
            f'watchtower_detector_last_event_step{{detector="loss_spike"}} 40\n'))
        self.address = self._served.address

    def close(self) -> None:
        self._served.close()


def test_loss_spike_pages_only_for_a_rank_scraped_before_its_spike(stack):
    """Why a CI run once waited in vain for WatchtowerLossSpike: the rule's increase() needs a scrape
    reading 0 before the spike. A rank first scraped after its spike (its trainer outran Prometheus's
    target discovery) never pages, and the wait must say so at once instead of timing out."""
    early, late = FakeRank(spikes=0), FakeRank(spikes=1)
    try:
        stack.set_targets([Target(early.address, "early", 0, 0, "n0"), Target(late.address, "late", 0, 0, "n1")])
        wait_until(lambda: stack.scraping(early.address) and stack.scraping(late.address),
                   "Prometheus to scrape both ranks")
        early.spikes = 1
        assert wait_for_loss_spike_page(stack, "early")["labels"]["node"] == "n0"
        with pytest.raises(AssertionError, match="late can never page: .* after the spike"):
            wait_for_loss_spike_page(stack, "late")
        assert not stack.prometheus_alerts(alertname="WatchtowerLossSpike", run="late")
    finally:
        early.close()
        late.close()


# Alerts on a rank's speed: a CI machine busy with other work really slows a trainer down (measured:
# WatchtowerThroughputDrop on the clean run under load), and these are right to say so. The drill
# judges the faults it injects, not the machine's load.
SPEED_ALERTS = {"WatchtowerThroughputDrop", "WatchtowerDataWaitRising", "WatchtowerDataStall", "WatchtowerStragglerRank"}


LIGHT_BATCH = ("--train.seq_len", "32", "--train.micro_batch_size", "2")  # the rules read counters, not compute


def start_trainer(processes, tmp_path, run: str, port: int, *inject: str):
    """A tiny 60-step trainer on `port` that keeps serving its last /metrics after the run for longer
    than any test lasts (the `processes` fixture ends it), so the series the rules read stay scraped."""
    return processes.start(watchtower_cmd(
        "train", "--config", "tiny", "--steps", "60", "--run", run, "--port", str(port),
        "--output-dir", str(tmp_path / run), "--monitor.bind", "127.0.0.1", "--monitor.linger_s", "600",
        *LIGHT_BATCH, *inject), stderr=subprocess.DEVNULL, env=one_thread_env())


def test_fire_drill_pages_spike_and_dead_rank_not_clean_run(tmp_path, processes, stack):
    ports = {"spiky": free_port(), "clean": free_port()}
    targets = {run: Target(f"127.0.0.1:{port}", run, 0, 0, f"node-{run}") for run, port in ports.items()}
    # Both start at once, held before their first step (held_start), and train once Prometheus has
    # scraped both: spiky's spike counter is read at 0 before step 40 (see wait_for_loss_spike_page),
    # and the clean run's whole history is scraped. spiky is registered from before it serves (it may
    # page RankDown while it starts: it is down), so that its discovery overlaps the trainers' start;
    # clean once it serves, so nothing about it may page until it is killed.
    held = HeldStart(tmp_path / "cache")
    stack.set_targets([targets["spiky"]])
    spiky = start_trainer(processes, tmp_path, "spiky", ports["spiky"], "--inject", "loss_spike@40", *held.trainer_args)
    clean = start_trainer(processes, tmp_path, "clean", ports["clean"], *held.trainer_args)
    wait_for_metrics(ports["clean"], lambda s: value(s, "watchtower_train_step") is not None, proc=clean)
    stack.set_targets(list(targets.values()))
    wait_until(lambda: len(stack.prometheus_api("/api/v1/query", query='up{job="watchtower-ranks"} == 1')["result"]) == 2,
               "Prometheus to scrape both held trainers")
    held.release()
    for run, proc in (("spiky", spiky), ("clean", clean)):
        wait_for_metrics(ports[run], lambda s: value(s, "watchtower_train_step") == 60, proc=proc)
    page = wait_for_loss_spike_page(stack, "spiky")
    assert {"severity": "page", "rank": "0", "node": "node-spiky", "replica_group": "0"}.items() <= page["labels"].items()
    assert page["annotations"]["summary"].endswith("at step 40")
    assert page["annotations"]["runbook_url"] == "docs/runbooks.md#loss-spike"
    # The clean run's whole history in Prometheus, then the rules evaluated over it a few times:
    # nothing about it may be pending or firing, nor have paged, but what the machine's load decides.
    wait_until(lambda: stack.prometheus_api("/api/v1/query", query='watchtower_train_step{run="clean"} == 60')["result"],
               "Prometheus to scrape the clean run's last step")
    wait_for_rule_evaluations(stack.rule_evaluations, 3)
    alarms = [a["labels"] for a in stack.prometheus_alerts(run="clean") if a["labels"]["alertname"] not in SPEED_ALERTS]
    assert not alarms, alarms
    pages = [p["labels"] for p in stack.pager.pages]
    assert all(p["run"] == "spiky" or p["alertname"] in SPEED_ALERTS for p in pages), pages
    clean.send_signal(signal.SIGKILL)
    down = stack.pager.wait_for("WatchtowerRankDown", WAIT_CEILING_S, run="clean")
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


def test_the_alerting_stack_is_reached_directly_under_an_http_proxy(tmp_path, monkeypatch):
    """Prometheus and Alertmanager run on loopback beside us; a proxy exported for the outside world
    (nothing listens on :9 here) must not stand between us and them."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with AlertingStack(tmp_path / "stack", interval="1s") as stack:
        assert stack.prometheus_api("/api/v1/query", query="vector(1)")["result"][0]["value"][1] == "1"
        stack.post_alerts([{"labels": {"alertname": "ProxyCheck"}}])
        assert any(a["labels"]["alertname"] == "ProxyCheck" for a in stack.alertmanager_alerts())


# ---- issue 14, item 4: the supervisor pages through Alertmanager itself ---------------------------

def test_the_rules_the_supervisor_also_posts_carry_the_contracts_severity_annotations_and_reasons():
    """Alertmanager merges the supervisor's post and Prometheus's alert only when their labels are
    equal (the promtool tests in alerts/tests/supervisor_test.yml show each rule keeps exactly the
    contract's labels), and the page reads the same whichever path came first."""
    rules = {r["alert"]: r for g in yaml.safe_load((ALERTS / "rules.yml").read_text())["groups"]
             for r in g["rules"] if "alert" in r}
    for spec in DIRECT_ALERTS:
        rule = rules[spec.alertname]
        assert rule["labels"] == {"severity": spec.severity}, spec.alertname
        assert rule["annotations"] == {"summary": spec.summary, "runbook_url": spec.runbook}, spec.alertname
        assert f"max by ({', '.join(spec.keys)})" in rule["expr"], spec.alertname
    assert f'reason=~"{"|".join(PAGED_REASONS)}"' in rules[GROUP_FAILED.alertname]["expr"]


def test_a_killed_group_pages_directly_through_a_real_alertmanager_and_merges_with_the_rule(tmp_path):
    """A dead group paged a scrape and a rule evaluation later (15-20 s at 5 s intervals). With
    [supervisor] alertmanager_url the supervisor posts the alert the moment it decides: the page
    carries the rule's labels plus the event as its description (only the direct path sets one,
    so this page came through it), and once Prometheus fires the same rule Alertmanager holds one
    alert, not two."""
    from test_supervisor_shell import SleepingLauncher
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.jobfile import job_toml
    from watchtower.supervisor.shell import Supervisor

    job_dir = tmp_path / "job"
    # Prometheus scrapes from the start but has no rules until the direct page is in: a rule evaluated in
    # the second after the kill reaches Alertmanager inside its group_wait, and the notification then
    # carries the rule's annotations (no description: seen on a clean-clone CI with rules every 5 s).
    with AlertingStack(tmp_path / "stack", interval="1s", supervisor_targets_file=job_dir / "supervisor_targets.json",
                       rules=False) as stack:
        path = tmp_path / "job.toml"
        path.write_text(job_toml({"name": "direct", "trainer_config": "tiny", "output_dir": str(job_dir)},
                                 {"nodes": ["n0", "n1", "n2"], "active_groups": 1, "spare_groups": 1},
                                 {"metrics_port": free_port(), "metrics_bind": "127.0.0.1", "base_port": free_port(),
                                  "alertmanager_url": stack.alertmanager_url, "startup_grace_s": 3600}))
        job, trainer = load_job(str(path))
        sup = Supervisor(job, trainer, SleepingLauncher(job_dir / "nodes"))
        try:
            sup.start()
            sup.poll_once()  # launches g0000 (active) and g0001 (spare); the groups only sleep
            wait_until(lambda: sup.poll_once() or stack.prometheus_api("/api/v1/query", query=(
                'watchtower_supervisor_failures_total{run="direct", reason="exit"}'))["result"],
                "Prometheus's first scrape of the supervisor (the rule needs the counter before the failure)")
            os.killpg(sup.groups["g0000"].process.pid, signal.SIGKILL)
            page = wait_until(lambda: sup.poll_once() or stack.pager.find("WatchtowerGroupFailed", run="direct"),
                              "the direct page of g0000's death")
            assert page["labels"] == {"alertname": "WatchtowerGroupFailed", "severity": "page", "run": "direct",
                                      "reason": "exit"}
            assert page["annotations"]["summary"] == "A replica group of run direct failed (exit): the supervisor " \
                                                     "replaces it"
            assert page["annotations"].get("description", "").startswith("g0000 on n0 failed (exit"), \
                (page["annotations"], (job_dir / "events.jsonl").read_text()[-3000:], sup.errors.snapshot())
            stack.load_rules()
            wait_until(lambda: sup.poll_once() or [a for a in stack.prometheus_alerts(alertname="WatchtowerGroupFailed")
                                                    if a["state"] == "firing"], "the rule firing too")
            held = [a for a in stack.alertmanager_alerts() if a["labels"]["alertname"] == "WatchtowerGroupFailed"
                    and a["status"]["state"] == "active"]
            assert len(held) == 1 and held[0]["labels"] == page["labels"], held
            assert sup.errors.snapshot()["alertmanager"] == 0
        finally:
            sup.shutdown()


def test_an_alertmanager_that_does_not_answer_is_counted_and_never_holds_the_loop():
    """A post goes out on its own thread: the loop only queues. One that fails (here: a server that
    accepts and never answers) is counted under stage "alertmanager"."""
    errors = StageErrors()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        alerts = DirectAlerts(f"http://127.0.0.1:{silent.getsockname()[1]}", errors.record)
        started = time.monotonic()
        alerts.fire(CRASH_LOOP, time.time(), {"run": "r"}, "stopped")
        assert time.monotonic() - started < POST_TIMEOUT_S, "fire() waited for the post"
        wait_until(lambda: errors.snapshot()["alertmanager"] == 1, "the timed-out post counted", interval=0.1)
        alerts.close(timeout_s=0)
