"""What the metrics say and how they are served: every family unique in both exposition formats
Prometheus asks for, live scrapes promtool-clean, and step counts that a skipped step cannot inflate.

Prometheus asks for OpenMetrics first. There a counter's family is named without `_total` (the
samples keep it), so a gauge `x_seconds` and a counter `x_seconds_total` are two families named
`x_seconds`: `promtool check metrics` stops at "second HELP line" and Prometheus keeps one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections import defaultdict
from pathlib import Path

import torch
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from conftest import REPO, free_port, samples, value, watchtower_cmd
from waiting import wait_until
from watchtower.hooks import Monitor, MonitorConfig, RankIdentity
from watchtower.metric_catalog import ALL_METRICS
from watchtower.supervisor.jobfile import job_toml

TEXT_FORMAT = "text/plain; version=0.0.4"
# the Accept header Prometheus 2.x scrapes with: OpenMetrics first
OPENMETRICS = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
               "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
OPENMETRICS_SUFFIXES = {"counter": ("_total", "_created")}  # the sample names a counter family owns


# ---- exposition helpers (also used by test_hooks_live) -------------------------------------------------

def scrape_as(port: int, accept: str) -> tuple[str, str]:
    """(content type, body) of /metrics asked for with this Accept header, as Prometheus asks."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def promtool(text: str) -> tuple[int, list[str]]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: .ci/run installs Debian's prometheus package"
    result = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()


def assert_promtool_clean(port: int) -> None:
    """The scrape is promtool-clean in both formats, each asked for with its Accept header.

    0.0.4 text: `promtool check metrics` finds nothing. OpenMetrics: promtool (2.x, and its promlint
    in client_golang) parses only the 0.0.4 grammar, so fed OpenMetrics it reads the `x_total` samples
    of counter family `x` as a family of their own without HELP, and says exactly "x_total no help
    text" once per counter family. Required: it parses (a duplicate family, the defect, is a parse
    error, exit 1), it reports exactly that per-counter line and nothing else, and the strict
    OpenMetrics parser of prometheus-client accepts the body (it rejects a second HELP or TYPE)."""
    ctype, text = scrape_as(port, TEXT_FORMAT)
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    code, out = promtool(text)
    assert code == 0 and out == [], "\n".join(out)

    ctype, om = scrape_as(port, OPENMETRICS)
    assert ctype.startswith("application/openmetrics-text"), ctype
    assert om.endswith("# EOF\n"), "not an OpenMetrics body"
    counters = set(re.findall(r"^# TYPE (\S+) counter$", om, re.M))
    assert counters, "a rank and the supervisor both export counters"
    code, out = promtool(om)
    assert code != 1, "\n".join(out)  # 1: promtool could not parse it (e.g. "second HELP line")
    assert sorted(out) == sorted(f"{c}_total no help text" for c in counters), "\n".join(out)
    names = [f.name for f in parse_openmetrics(om)]  # raises on a second HELP/TYPE, a bad suffix
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# ---- item 7: unique families ----------------------------------------------------------------------------

def openmetrics_owned_names(name: str, kind: str) -> set[str]:
    """Every name a metric takes in either format: its family name in 0.0.4 text (the name as
    declared), its OpenMetrics family name (a counter's drops `_total`), and its sample names."""
    if kind != "counter":
        return {name}
    assert name.endswith("_total"), f"{name}: a counter's name ends in _total"
    family = name[: -len("_total")]
    return {name, family} | {family + suffix for suffix in OPENMETRICS_SUFFIXES["counter"]}


def test_no_two_catalog_families_collide_after_openmetrics_suffix_stripping():
    owners: dict[str, set[str]] = defaultdict(set)
    for spec in ALL_METRICS.values():
        if spec.kind != "counter":
            assert not spec.name.endswith(("_total", "_created")), f"{spec.name}: only counters end in _total"
        for taken in openmetrics_owned_names(spec.name, spec.kind):
            owners[taken].add(spec.name)
    clashes = {name: sorted(specs) for name, specs in owners.items() if len(specs) > 1}
    assert not clashes, f"families that collide in OpenMetrics: {clashes}"


def test_tui_reads_only_declared_metric_names():
    from watchtower.tui.model import GPU_GAUGES, RANK_GAUGES

    unknown = (set(RANK_GAUGES) | set(GPU_GAUGES)) - set(ALL_METRICS)
    assert not unknown, unknown


def test_every_rank_family_is_promtool_clean_in_both_formats_in_process():
    """The fast check: a monitor with every optional part on (a skip, an event, a gauge) rendered
    by prometheus-client in both formats, no HTTP, no trainer."""
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    monitor = Monitor(MonitorConfig(port=0, log_interval=2, nonfinite_action="skip_step"),
                      RankIdentity(run="fmt", node="n0"))
    for step in range(1, 5):
        with monitor.step(tokens=8) as s:
            s.record(loss=torch.tensor(float("nan") if step == 3 else 1.0), grad_norm=torch.tensor(1.0), lr=0.1)
            s.should_step()
    monitor.set_gauge("watchtower_replica_participants", 2)
    monitor.set_compute_budget(parameters=1000, total_steps=8)  # the two tokens-per-parameter gauges
    monitor.count("watchtower_checkpoint_save_seconds_total", 0.5)
    monitor.close()
    text = generate_latest(monitor.registry).decode()
    code, out = promtool(text)
    assert code == 0 and out == [], "\n".join(out)
    om = generate_openmetrics(monitor.registry).decode()
    names = [f.name for f in parse_openmetrics(om)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# ---- item 9: a skipped step is not a step ----------------------------------------------------------------

def run_loop(action: str, nan_step: int, steps: int = 6, tokens: int = 10) -> Monitor:
    """A user's loop: step the optimizer only when the monitor says so."""
    monitor = Monitor(MonitorConfig(port=0, log_interval=100, nonfinite_action=action),
                      RankIdentity(run="skip", node="n0"))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        with monitor.step(tokens=tokens) as s:
            loss = model(torch.ones(1, 2)).sum()
            loss.backward()
            s.record(loss=loss.detach() * (float("nan") if step == nan_step else 1.0), lr=0.1)
            if s.should_step():
                opt.step()
            opt.zero_grad()
    return monitor


def exported(monitor: Monitor) -> dict:
    return samples(generate_latest(monitor.registry).decode())


def test_skipped_nonfinite_step_is_counted_as_skipped_not_as_a_step_or_tokens():
    monitor = run_loop("skip_step", nan_step=3)
    got = exported(monitor)
    assert value(got, "watchtower_skipped_steps_total") == 1
    assert value(got, "watchtower_steps_total") == 5
    assert value(got, "watchtower_tokens_total") == 50
    assert value(got, "watchtower_train_step") == 6, "a skipped step still moves the step and heartbeat"
    assert value(got, "watchtower_step_seconds_total") > 0  # wall time of all six iterations
    monitor.close()


def test_a_step_the_loop_skips_after_a_vote_counts_as_skipped():
    """A hot spare has no loss of its own: its monitor says "step", the groups' vote says skip."""
    monitor = Monitor(MonitorConfig(port=0, nonfinite_action="skip_step"), RankIdentity(run="vote"))
    for step in range(1, 4):
        with monitor.step(tokens=5) as s:
            assert s.should_step()
            if step == 2:
                s.mark_skipped()
    got = exported(monitor)
    assert value(got, "watchtower_skipped_steps_total") == 1 and value(got, "watchtower_steps_total") == 2
    assert value(got, "watchtower_tokens_total") == 10
    monitor.close()


def test_count_mode_counts_every_step_and_never_reads_the_device_per_step():
    monitor = run_loop("count", nan_step=3)
    got = exported(monitor)
    assert not monitor.events, "count mode reads the values only at the log interval (100 here)"
    assert value(got, "watchtower_skipped_steps_total") == 0
    assert value(got, "watchtower_steps_total") == 6 and value(got, "watchtower_tokens_total") == 60
    monitor.close()
    assert [(e.detector, e.step) for e in monitor.events] == [("nonfinite", 3)]


# ---- finding 3: a step torchft does not commit, and the trainer redoes, is not an applied step --------------

def test_uncommitted_attempt_is_not_counted_as_an_applied_step_or_tokens_or_a_second_skip():
    """Step 2 and the skipped (NaN) step 4 each have a first attempt that is not committed and is redone.

    Only committed steps count: 5 applied and 1 skipped, the applied steps' tokens only, and the two
    dropped attempts in watchtower_uncommitted_steps_total. tokens/s and MFU are applied tokens per wall
    second of every attempt (the rank was busy redoing). Marking costs no host sync: with
    nonfinite_action=count nothing is read from the device before the log interval."""
    flops_per_token, peak = 6.0, 1e6
    monitor = Monitor(MonitorConfig(port=0, log_interval=100, nonfinite_action="skip_step", peak_flops=peak),
                      RankIdentity(run="redo", node="n0"), flops_per_token=flops_per_token)
    attempts = [(1, True), (2, False), (2, True), (3, True), (4, False), (4, True), (5, True), (6, True)]
    for step, committed in attempts:
        with monitor.step(tokens=10, step=step) as s:
            s.record(loss=torch.tensor(float("nan") if step == 4 else 1.0), lr=0.1)
            s.should_step()
            if not committed:
                s.mark_uncommitted()
    monitor.close()
    got = exported(monitor)
    assert value(got, "watchtower_steps_total") == 5
    assert value(got, "watchtower_skipped_steps_total") == 1, "a redone skipped step is one skip, not two"
    assert value(got, "watchtower_uncommitted_steps_total") == 2
    assert value(got, "watchtower_tokens_total") == 50
    assert value(got, "watchtower_train_step") == 6
    wall = monitor.state.step_time_s * len(attempts)  # the interval's wall time: every attempt's
    assert abs(monitor.state.tokens_per_s * wall - 50) < 1e-6, "tokens/s counts applied tokens only"
    assert abs(monitor.state.mfu - monitor.state.tokens_per_s * flops_per_token / peak) < 1e-12

    counter = Monitor(MonitorConfig(port=0, log_interval=100), RankIdentity(run="redo-count", node="n0"))
    for step, committed in ((1, False), (1, True), (2, True)):
        with counter.step(tokens=10, step=step) as s:
            s.record(loss=torch.tensor(float("nan")))
            if not committed:
                s.mark_uncommitted()
    assert not counter.events, "marking an attempt uncommitted reads nothing from the device"
    assert counter.state.steps_total == 2 and counter.state.uncommitted_steps_total == 1
    counter.close()


class _PeerFailsOnAttempts:
    """The replication layer of one group whose should_commit() is False on the given attempts (1-based),
    which is what TorchFTGroup.should_commit() answers when a peer's all-reduce failed."""

    def __init__(self, failing: set[int]):
        from watchtower.trainer.replication import SingleGroup

        self.group, self.attempt, self.failing = SingleGroup(), 0, failing

    def __getattr__(self, name):
        return getattr(self.group, name)

    def should_commit(self) -> bool:
        self.attempt += 1
        return self.group.should_commit() and self.attempt not in self.failing


def test_trainer_redone_step_is_not_counted_as_an_applied_step(tmp_path, monkeypatch):
    """The bundled trainer tells its monitor when torchft did not commit an attempt: steps 2 and 4
    (step 4 a NaN the monitor skips) are redone once each, and the metrics count 6 committed steps."""
    from watchtower.config import load_config
    from watchtower.trainer import train as train_mod

    cfg = load_config("tiny", [("train.steps", 6), ("run.output_dir", str(tmp_path)), ("monitor.port", 0),
                               ("monitor.nonfinite_action", "skip_step"), ("data.max_bytes", 200_000),
                               ("faults.inject", ["nonfinite@4"])])
    # attempts: 1 = step 1, 2 = step 2 (fails), 3 = step 2, 4 = step 3, 5 = step 4 (fails), 6 = step 4, ...
    monkeypatch.setattr(train_mod.Trainer, "_make_replication", lambda self: _PeerFailsOnAttempts({2, 5}))
    trainer = train_mod.Trainer(cfg)
    trainer.train()
    state = trainer.monitor.state
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.train.grad_accum_steps
    assert trainer.step == 6
    assert (state.steps_total, state.skipped_steps_total) == (5, 1)
    assert state.tokens_total == 5 * tokens_per_step
    assert state.uncommitted_steps_total == 2


# ---- live: a supervised rank and the supervisor ------------------------------------------------------------

def test_live_rank_and_supervisor_scrapes_are_promtool_clean_in_text_and_openmetrics(tmp_path):
    job_dir, sup_port = tmp_path / "job", free_port()
    job = tmp_path / "job.toml"
    job.write_text(job_toml(
        {"name": "fmt", "trainer_config": "tiny", "output_dir": str(job_dir),
         # the light batch: what is exported, not how hard it trains (a step ~9 ms of CPU instead of ~95)
         "train_overrides": ["train.steps=2000", "monitor.system_interval_s=0.5", "checkpoint.interval_steps=0",
                             "train.seq_len=32", "train.micro_batch_size=2"],
         "inject": ["loss_spike@5", "nonfinite@8"]},
        # no spare: the supervisor exports the same families with none (its spare gauges read 0), and a
        # spare is one more trainer importing torch on the 2 cores the other lane shares
        {"nodes": ["n0"], "active_groups": 1, "spare_groups": 0},
        {"base_port": free_port(), "metrics_port": sup_port, "startup_grace_s": 120}))
    proc = subprocess.Popen(watchtower_cmd("supervise", str(job)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        rank_port = wait_for_rank_past_step(job_dir, 12, proc)
        got = samples(scrape_as(rank_port, TEXT_FORMAT)[1])
        # a scrape that failed half-way would export fewer families, and hide a clash behind the failure
        assert value(got, "watchtower_hook_errors_total", hook="scrape") == 0
        assert_promtool_clean(rank_port)
        assert_promtool_clean(sup_port)
    finally:
        stop_job(proc, job_dir)


def wait_for_rank_past_step(job_dir: Path, step: int, proc: subprocess.Popen) -> int:
    """The /metrics port of the first rank whose scrape shows `step` done and a skipped step."""
    def rank_port() -> int | None:
        for endpoint in sorted(job_dir.glob("groups/*/endpoint-r0.json")):
            try:
                port = int(json.loads(endpoint.read_text())["port"])
                got = samples(scrape_as(port, TEXT_FORMAT)[1])
            except (OSError, ValueError, KeyError):
                continue  # not written yet, or not serving yet
            if (value(got, "watchtower_train_step") or 0) >= step and value(got, "watchtower_skipped_steps_total"):
                return port
        return None

    def exited() -> None:
        assert proc.poll() is None, proc.stderr.read()[-3000:]

    return wait_until(rank_port, f"a rank of {job_dir} past step {step} with a skipped step", interval=0.5,
                      abort=exited)


def stop_job(proc: subprocess.Popen, job_dir: Path) -> None:
    """SIGINT: the supervisor stops its groups on the way out; then make sure of it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    events = job_dir / "events.jsonl"
    for line in events.read_text().splitlines() if events.exists() else []:
        e = json.loads(line)
        if e["event"] == "group_started":
            try:
                os.killpg(e["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
