"""The supervisor's shell around the policy, in one process: its I/O edges, its snapshot, its imports.

Groups here are real processes that only sleep (started through the same orphan guard as real
groups), so each test runs in seconds; tests/test_supervisor.py runs real trainers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port, samples, scrape_text, value
from served_text import ServedText
from waiting import wait_until
from watchtower.orphan_guard import guarded
from watchtower.prometheus_config import Target, write_file_sd
from watchtower.supervisor import contract, metrics as supervisor_metrics
from watchtower.supervisor.config import load_job
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.jobfile import job_toml
from watchtower.supervisor.launcher import GroupProcess, GroupSpec, LocalLauncher
from watchtower.supervisor.observe import Observer
from watchtower.supervisor.policy_types import GroupState, Role
from watchtower.supervisor import shell
from watchtower.supervisor.health import gated_decision
from watchtower.supervisor.shell import STOP_SIGNALS, Supervisor


class SleepingLauncher(LocalLauncher):
    """Starts `sleep` in place of a trainer: a real process group, guarded like a real group. No
    standbys: its groups are not trainers (a standby would import torch for nothing)."""

    def launch(self, spec: GroupSpec) -> GroupProcess:
        proc = subprocess.Popen(guarded(["sleep", "600"]), start_new_session=True)
        return GroupProcess(spec, proc)

    def keep_warm(self, nodes, start_new=True) -> None:
        pass


@pytest.fixture
def supervisor(tmp_path):
    """A started Supervisor (Lighthouse up, /metrics served) with sleeping groups; stopped after."""
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "shell", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                             {"nodes": ["n0", "n1", "n2"], "active_groups": 1, "spare_groups": 1},
                             {"metrics_port": free_port(), "metrics_bind": "127.0.0.1", "base_port": free_port()}))
    job, trainer = load_job(str(path))
    sup = Supervisor(job, trainer, SleepingLauncher(tmp_path / "job" / "nodes"))
    try:
        sup.start()
        yield sup
    finally:
        sup.shutdown()


def test_supervisor_and_tui_import_no_torch():
    """A head or login node supervises and watches without torch (the old supervisor imported the
    trainer: ~3.7 s of torch). torchft is imported only when a Supervisor is made, for its Lighthouse."""
    code = ("import sys, watchtower.supervisor.shell, watchtower.supervisor.config, watchtower.tui.app, "
            "watchtower.tui.sources\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchft', 'numpy')"
            " or m in ('watchtower.config', 'watchtower.trainer'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_file_sd_targets_are_readable_by_a_prometheus_running_as_another_user(tmp_path):
    """mkstemp made targets.json 0600: a Prometheus under its own user saw no targets, so `up == 0`
    alerts could never fire."""
    path = tmp_path / "targets.json"
    write_file_sd(path, [Target("127.0.0.1:9400", "r", 0, 0, "n0")])
    write_file_sd(path, [])  # rewritten: still readable
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "targets.json"], "no temp file left behind"


def test_scrapes_ignore_http_proxy_feed_progress_and_count_an_html_page(tmp_path, monkeypatch):
    """A rank's /metrics is reached directly even with a dead proxy exported; its progress report
    becomes the policy's progress_at; an HTML page on its port is counted, not raised."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    rank = ServedText(lambda: "watchtower_train_step 0\nwatchtower_progress_timestamp_seconds 1234.5\n"
                              "watchtower_replica_participating 0\nwatchtower_replica_participants 1\n")
    html = ServedText(lambda: "<!DOCTYPE html>\n<html><body>Welcome to nginx!</body></html>\n", "text/html")
    group_dir = tmp_path / "groups" / "g0000"
    group_dir.mkdir(parents=True)
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        from watchtower.supervisor.observe import Group

        g = Group(GroupProcess(GroupSpec("g0000", 0, "n0", group_dir / "trainer.toml", group_dir / "group.log"), proc),
                  launched_at=1000.0)
        errors = StageErrors()
        observer = Observer(tmp_path, tp=1, last_step=100, errors=errors)
        (group_dir / "endpoint-r0.json").write_text(f'{{"port": {rank.server.server_address[1]}}}')
        with errors.guard("scrape"):
            observer.scrape(g)
        view = g.view()
        assert (view.progress_at, view.role, view.state) == (1234.5, Role.SPARE, GroupState.RUNNING)
        (group_dir / "endpoint-r0.json").write_text(f'{{"port": {html.server.server_address[1]}}}')
        with errors.guard("scrape"):
            observer.scrape(g)
        assert errors.snapshot()["scrape"] == 1
        assert g.view().progress_at == 1234.5, "a bad scrape keeps the last good values"
    finally:
        proc.kill()
        proc.wait()
        rank.close()
        html.close()


def test_collect_reads_the_loops_snapshot_not_the_groups_it_mutates(supervisor):
    """collect() ran on the HTTP thread over the groups the loop was adding and removing (an
    occasional failed scrape); it now reads one immutable snapshot, swapped in at the end of a poll."""
    port = supervisor.metrics_port
    supervisor.poll_once()  # the policy launches the active group and the spare
    first = samples(scrape_text(port))
    assert value(first, "watchtower_supervisor_groups", state="starting") == 2
    spare = supervisor.groups["g0001"]
    spare.participating = False  # what the next scrape of it would say, mid-poll
    assert samples(scrape_text(port)) == first, "a scrape between polls sees the last poll, whole"
    supervisor.poll_once()
    assert value(samples(scrape_text(port)), "watchtower_supervisor_groups", state="spare") == 1


def test_a_full_disk_under_events_and_file_sd_is_counted_and_kills_no_group(supervisor, monkeypatch):
    """ENOSPC while rewriting targets.json or appending to events.jsonl used to reach run()'s
    `finally` and SIGKILL every healthy group."""
    supervisor.poll_once()
    pids = {rid: g.process.pid for rid, g in supervisor.groups.items()}
    events = supervisor.out / "events.jsonl"
    events.rename(supervisor.out / "events.saved")
    events.symlink_to("/dev/full")  # the kernel's own ENOSPC on every write

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(supervisor_metrics, "write_file_sd", disk_full)
    (supervisor.out / "drain" / "no-such-node").touch()  # an event to write: the request is rejected
    assert supervisor.poll_once() is None
    errors = value(samples(scrape_text(supervisor.metrics_port)), "watchtower_supervisor_errors_total", stage="events")
    assert errors == 1 and supervisor.errors.snapshot()["file_sd"] == 1
    assert [e["event"] for e in supervisor.events.events][-1] == "drain_rejected", "kept in memory"
    assert all(g.process.poll() is None for g in supervisor.groups.values())
    assert {rid: g.process.pid for rid, g in supervisor.groups.items()} == pids, "no group replaced"


def test_a_launch_that_fails_drains_its_node_instead_of_being_retried_there_every_poll(supervisor, monkeypatch):
    """A launch that raised was only counted as a shell error: every poll ordered the same launch on
    the same free node, forever, with no event naming the node and no budget spent. Here the
    launcher cannot start g0000 on n0: n0 is drained once, the event names the error, the spare's
    launch on n1 and a refill on n2 carry the job on."""
    launch = supervisor.launcher.launch

    def refused_on_n0(spec):
        if spec.node == "n0":
            raise NotADirectoryError(errno.ENOTDIR, f"{spec.replica_id}: no such job step on {spec.node}")
        return launch(spec)

    monkeypatch.setattr(supervisor.launcher, "launch", refused_on_n0)
    codes = [supervisor.poll_once() for _ in range(4)]
    assert codes == [None] * 4 and supervisor.executor.starter.seq == 3, "one failed launch, one refill, then quiet"
    assert {rid: g.node for rid, g in supervisor.groups.items()} == {"g0001": "n1", "g0002": "n2"}
    assert all(g.process.poll() is None for g in supervisor.groups.values())
    failed = [e for e in supervisor.events.events if e["event"] == "group_failed"]
    assert [(e["replica_id"], e["node"], e["reason"], e["drained"], e["counted"]) for e in failed] == \
        [("g0000", "n0", "launch", True, True)]
    assert failed[0]["error"].startswith("NotADirectoryError") and "g0000" in failed[0]["error"]
    assert failed[0]["error"] in failed[0]["message"]
    metrics = samples(scrape_text(supervisor.metrics_port))
    assert value(metrics, "watchtower_supervisor_nodes", state="drained") == 1
    assert value(metrics, "watchtower_supervisor_failures_total", reason="launch") == 1


def test_a_full_disk_under_the_job_directory_during_a_refill_drains_no_node_and_stops_nothing(supervisor,
                                                                                            monkeypatch):
    """Review 12, F3: ENOSPC writing a refill's trainer.toml on the supervisor's own disk was blamed on
    the node: a node drained per poll, and three "fresh nodes" stopped the healthy job as a crash loop
    in ~4 s. It is the head's error: counted under stage "launch", reported once, retried each poll
    under the same id, on the same node, until the disk has room."""
    supervisor.poll_once()  # g0000 active on n0, g0001 spare on n1
    def disk_full(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)  # what the real write does first, on a full disk too
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(contract, "write_atomic", disk_full)
    supervisor.groups["g0001"].process.kill()  # the spare dies: a refill is due, on n2
    codes = [supervisor.poll_once() for _ in range(5)]
    assert codes == [None] * 5 and supervisor.groups["g0000"].process.poll() is None
    kinds = [e["event"] for e in supervisor.events.events]
    assert kinds.count("node_drained") == 1 and kinds.count("launch_deferred") == 1, kinds  # n1: its spare died
    assert supervisor.errors.snapshot()["launch"] >= 4 and supervisor.stats.failures["launch"] == 0
    assert sorted(p.name for p in (supervisor.out / "groups").iterdir()) == ["g0000", "g0001"], "nothing left behind"
    monkeypatch.undo()  # the disk has room again
    assert supervisor.poll_once() is None
    assert {rid: g.node for rid, g in supervisor.groups.items() if g.running} == {"g0000": "n0", "g0002": "n2"}


def test_a_launcher_failing_everywhere_stops_as_a_crash_loop_naming_the_error(supervisor, monkeypatch):
    """The same defect with a launcher that cannot fork on any node: each node is tried once, then
    the failure budget (the same failure on crash_loop_limit = 3 fresh nodes) stops the job, exit 3."""
    def cannot_fork(spec):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(supervisor.launcher, "launch", cannot_fork)
    assert [supervisor.poll_once() for _ in range(3)] == [None, None, 3]
    failed = [(e["node"], e["reason"]) for e in supervisor.events.events if e["event"] == "group_failed"]
    assert failed == [("n0", "launch"), ("n1", "launch"), ("n2", "launch")]
    stopped = supervisor.events.events[-1]
    assert (stopped["event"], stopped["exit_code"]) == ("job_stopped", 3)
    assert stopped["message"].endswith(f"; last error: BlockingIOError: [Errno {errno.EAGAIN}] "  # OSError(EAGAIN)'s
                                       f"{os.strerror(errno.EAGAIN)}")
    assert value(samples(scrape_text(supervisor.metrics_port)), "watchtower_supervisor_crash_loop") == 1


def test_a_stopped_lighthouse_is_restarted_on_the_same_address(supervisor):
    url = supervisor.lighthouse.url
    supervisor.poll_once()
    supervisor.lighthouse.stop()
    supervisor.poll_once()
    assert supervisor.lighthouse.url == url and supervisor.lighthouse.up()
    kinds = [e["event"] for e in supervisor.events.events]
    assert "lighthouse_restarted" in kinds and "node_drained" not in kinds and "group_failed" not in kinds
    assert supervisor.stats.restarts["lighthouse"] == 1


def test_a_lighthouse_restart_that_keeps_failing_counts_one_failure_and_recovers_when_it_can_bind(supervisor,
                                                                                                   monkeypatch):
    """Review 12, F5: each poll that found the Lighthouse still down (its restart raising: the port
    taken) counted a new failure, so a healthy job stopped as a crash loop within seconds. Now the
    outage counts once, restarts are retried with backoff, and it comes back once it can bind."""
    supervisor.poll_once()
    supervisor.lighthouse.stop()
    restart = supervisor.lighthouse.restart

    def port_taken():
        raise RuntimeError("Address already in use (os error 98)")

    monkeypatch.setattr(supervisor.lighthouse, "restart", port_taken)
    codes = []
    wait_until(lambda: codes.append(supervisor.poll_once()) or supervisor.errors.snapshot()["lighthouse"] >= 3,
               "a third restart of the Lighthouse, 1 + 2 s of backoff later")
    assert set(codes) == {None} and len(codes) > supervisor.policy_cfg.budget.max_failures, codes
    assert supervisor.stats.failures["lighthouse"] == 1 and not supervisor.stats.crash_loop
    assert all(g.process.poll() is None for g in supervisor.groups.values())
    monkeypatch.setattr(supervisor.lighthouse, "restart", restart)  # the port is free again
    wait_until(lambda: supervisor.poll_once() is None and supervisor.lighthouse.up(), "the Lighthouse back up")
    assert value(samples(scrape_text(supervisor.metrics_port)), "watchtower_supervisor_failures_total",
                 reason="lighthouse") == 1


def test_sighup_stops_the_job_like_sigterm_with_its_event_and_empty_targets(supervisor):
    """Review 12, F7: SIGHUP (the terminal or ssh session of a foreground `supervise` closed) had no
    handler: the supervisor died with no job_stopped event, and targets.json and
    supervisor_targets.json still listed the dead ranks and itself, which paged as down."""
    supervisor.poll_once()
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        supervisor.install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) == supervisor._on_signal, "SIGHUP would kill this test process"
        os.kill(os.getpid(), signal.SIGHUP)
        assert supervisor._loop() == 129
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    supervisor.shutdown()
    last = supervisor.events.events[-1]
    assert (last["event"], last["signal"], last["exit_code"]) == ("job_stopped", "SIGHUP", 129)
    assert all(g.process.poll() is not None for g in supervisor.groups.values())
    for name in ("targets.json", "supervisor_targets.json"):
        assert json.loads((supervisor.out / name).read_text()) == [], name


def test_a_planned_drain_is_not_a_failure_in_the_summary(supervisor):
    """Review 12, F6: the summary's "failures" summed every kind, so an operator's `touch drain/n1`
    on a healthy job printed "failures: 1"; the policy and the budget never count it."""
    supervisor.poll_once()  # g0000 on n0, g0001 on n1
    (supervisor.out / "drain" / "n1").touch()
    supervisor.poll_once()
    summary = supervisor.summary()
    assert (summary["failures"], summary["planned_drains"]) == (0, 1), summary
    assert supervisor.stats.failures["drained"] == 1, "failures_total{reason=drained} still shows it"


def test_the_launch_config_file_is_all_a_group_is_told(tmp_path):
    """Nine WATCHTOWER_* variables and re-serialised --key value flags were the contract; now the
    trainer reads one file: the resolved config with the group's [replica] place. Its identity,
    torchft seat and node cache come from there, and [replica] does not change the config hash (every
    group resumes the same checkpoints)."""
    from watchtower.config import load_config
    from watchtower.supervisor.contract import ReplicaConfig, group_config, write_group_config

    job = load_config("tiny", [("train.steps", "7"), ("faults.inject", ["crash@3:group=1"])])
    replica = ReplicaConfig("http://127.0.0.1:29510", "g0001", 1, 2, "node-b", str(tmp_path / "cache"), 5.0)
    path = write_group_config(tmp_path / "g0001", group_config(job.to_dict(), replica, tmp_path / "g0001", 9410, "ck"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    cfg = load_config(str(path))
    assert cfg.replica == replica and cfg.replica.supervised
    assert (cfg.run.output_dir, cfg.monitor.port, cfg.checkpoint.dir) == (str(tmp_path / "g0001"), 9410, "ck")
    assert (cfg.train.steps, cfg.faults.inject, cfg.model) == (7, ["crash@3:group=1"], job.model)
    assert cfg.config_hash() == job.config_hash()


def test_a_guarded_child_dies_with_its_parent(processes):
    """The orphan guard alone, in a second: a parent that starts `sleep` through it and is then
    SIGKILLed leaves no `sleep` behind (tests/test_supervisor.py does the same with a supervisor)."""
    import signal

    from waiting import wait_until

    code = ("import subprocess, sys, time\n"
            "from watchtower.orphan_guard import guarded\n"
            "child = subprocess.Popen(guarded(['sleep', '600']))\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = processes.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    wait_until(lambda: _command(child) == "sleep", "the guard to exec sleep", interval=0.05)
    os.kill(parent.pid, signal.SIGKILL)
    wait_until(lambda: _command(child) != "sleep", "the child to die with its parent", timeout=5, interval=0.05)


def _command(pid: int) -> str | None:
    """The process's command name; None once it is gone or a zombie."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)
    except OSError:
        return None
    return None if fields[1].split()[0] == "Z" else fields[0].split("(", 1)[1]


class FinishingLauncher(SleepingLauncher):
    """Starts `true` in place of a trainer: a group that reaches its last step at once (exit 0)."""

    def launch(self, spec: GroupSpec) -> GroupProcess:
        return GroupProcess(spec, subprocess.Popen(guarded(["true"]), start_new_session=True))


def test_a_node_failing_its_health_check_never_gets_a_group_and_costs_no_failure(tmp_path):
    """Issue 13, item 5: groups started on any free node, a bad one included, and its loss was then
    counted as the job's failure. The site check fails on n0 only (its output names the node it ran
    on): n0 never gets a group, a node_unhealthy event carries the check's output, nothing is
    counted, and the job finishes on n1 and n2."""
    check = 'if [ "$WATCHTOWER_NODE" = n0 ]; then echo "gpu 3: uncorrectable ECC on $WATCHTOWER_NODE"; exit 1; fi'
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "gate", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                             {"nodes": ["n0", "n1", "n2"], "active_groups": 1, "spare_groups": 1,
                              "health_check": check},
                             {"metrics_port": 0, "base_port": free_port()}))
    job, trainer = load_job(str(path))
    sup = Supervisor(job, trainer, FinishingLauncher(tmp_path / "job" / "nodes"))
    assert sup.run() == 0
    events = sup.events.events
    assert sorted(e["node"] for e in events if e["event"] == "group_started") == ["n1", "n2"]
    unhealthy = [e for e in events if e["event"] == "node_unhealthy"]
    assert [e["node"] for e in unhealthy] == ["n0"]
    assert unhealthy[0]["output"].startswith("exit code 1") and "ECC on n0" in unhealthy[0]["output"]
    assert "ok cache" in unhealthy[0]["output"], "the built-in checks ran first, on the node's own cache"
    assert not any(e["event"] in ("group_failed", "node_drained") for e in events)
    assert events[-1]["event"] == "job_finished" and sup.summary()["failures"] == 0


def test_a_hung_node_command_is_killed_at_its_timeout(tmp_path):
    """A health check that hangs must not hold the supervisor's loop: it is killed with everything it
    started at `timeout_s` and reads as a timeout (exit code None), which the gate calls unhealthy."""
    # seconds unique to this run, so a parallel run of this test or any other sleep is never counted
    a, b = 600 + os.getpid() % 1000 * 2, 601 + os.getpid() % 1000 * 2
    code, _ = LocalLauncher(tmp_path).run_on_node("n1", ["sh", "-c", f"sleep {a} & exec sleep {b}"], timeout_s=0.5)
    assert code is None

    def none_left() -> bool:  # SIGKILL is delivered at once but a loaded box may take a moment to reap
        return not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)) in (f"sleep {a}", f"sleep {b}")]

    wait_until(none_left, "the check and its child killed", timeout=30)


def test_a_stop_signal_during_a_hung_health_check_stops_within_a_second_and_is_never_dropped(tmp_path):
    """Review 13, S2: the health gate blocked the loop, so a SIGUSR1 (Slurm's time-limit warning)
    arriving during a hung site check waited for it (60 s by default, per node: past the time limit),
    and when that poll ended in a policy Stop (no healthy node) the signal was dropped: exit 4, no
    graceful stop. Now the check is killed within a slice and the signal is acted on (a signal around
    a policy Stop: test_a_signal_around_a_policy_stop_leaves_one_job_stopped_and_the_first_decided_code)."""
    hung = 700 + os.getpid() % 1000 * 2  # a sleep unique to this run
    marker = tmp_path / "check-running"

    def supervisor(name: str, check: str) -> Supervisor:
        path = tmp_path / f"{name}.toml"
        path.write_text(job_toml({"name": name, "trainer_config": "tiny", "output_dir": str(tmp_path / name)},
                                 {"nodes": ["n0", "n1"], "active_groups": 1, "health_check": check},
                                 {"metrics_port": 0, "base_port": free_port()}))
        job, trainer = load_job(str(path))
        return Supervisor(job, trainer, FinishingLauncher(tmp_path / name / "nodes"))

    sup, result = supervisor("hung", f"touch {marker}; exec sleep {hung}"), {}
    loop = threading.Thread(target=lambda: result.update(code=sup.run()), daemon=True)
    loop.start()
    wait_until(marker.exists, "the site check to run")
    sent = time.monotonic()
    sup.request_stop(signal.SIGUSR1)
    loop.join(timeout=15)
    assert result.get("code") == 138, f"no stop {time.monotonic() - sent:.1f} s after SIGUSR1: {result}"
    assert time.monotonic() - sent < 5, "the stop waited for the check"
    last = sup.events.events[-1]
    assert (last["event"], last["signal"]) == ("job_stopped", "SIGUSR1")
    assert not [e for e in sup.events.events if e["event"] in ("node_unhealthy", "group_started")], \
        "a check cut short says nothing of its node"
    wait_until(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)) == f"sleep {hung}"],
               "the cut check killed", timeout=30)


def test_a_signal_around_a_policy_stop_leaves_one_job_stopped_and_the_first_decided_code(tmp_path, monkeypatch):
    """Review 13b, F4: a stop signal that landed while a poll ended in a policy Stop (both nodes fail
    their check: no node for the job) was acted on after the executor had carried the Stop out: two
    contradictory job_stopped events (exit 4, then 138 with the signal), a crash-loop page possible
    for a process that exits 138. Now the first stop decided is the one: a signal seen before the
    poll's actions run drops them and stops by signal; one after the Stop ran changes nothing."""
    def supervisor(name: str) -> Supervisor:
        path = tmp_path / f"{name}.toml"
        path.write_text(job_toml({"name": name, "trainer_config": "tiny", "output_dir": str(tmp_path / name)},
                                 {"nodes": ["n0", "n1"], "active_groups": 1, "health_check": "exit 1"},
                                 {"metrics_port": 0, "base_port": free_port(), "linger_s": 0}))
        job, trainer = load_job(str(path))
        return Supervisor(job, trainer, FinishingLauncher(tmp_path / name / "nodes"))

    def stops(sup: Supervisor) -> list[tuple]:
        return [(e["exit_code"], e.get("signal")) for e in sup.events.events if e["event"] == "job_stopped"]

    before = supervisor("before")  # the signal lands once the poll has decided, before the Stop is carried out

    def signalled_after_deciding(*args):
        decided = gated_decision(*args)
        before.request_stop(signal.SIGUSR1)
        return decided

    monkeypatch.setattr(shell, "gated_decision", signalled_after_deciding)
    assert before.run() == 138
    assert stops(before) == [(138, "SIGUSR1")]
    after = supervisor("after")  # the signal lands once the Stop has been carried out
    execute = after.executor.run

    def signalled_after_the_stop(actions, now):
        code = execute(actions, now)
        after.request_stop(signal.SIGUSR1)
        return code

    monkeypatch.undo()
    after.executor.run = signalled_after_the_stop
    assert after.run() == 4
    assert stops(after) == [(4, None)]


def test_sigusr1_before_any_group_finished_a_step_says_nothing_to_save_not_a_lost_checkpoint(supervisor):
    """Review 13b, F7: SIGUSR1 before any group had finished a step (the first health gate, or groups
    still starting) asked for a save no group could make, then reported "checkpoint of step 2 NOT
    saved": a loss that did not happen (on a resumed run, step 2 is long behind). Nothing holds state
    to save: no stop request, and the job_stopped event says so."""
    supervisor.poll_once()  # the groups start: sleeping processes that never report a step
    assert [g for g in supervisor.groups.values() if g.running]
    supervisor.request_stop(signal.SIGUSR1)
    assert supervisor._loop() == 138
    said = [e for e in supervisor.events.events if e["event"] in ("stop_requested", "job_stopped")]
    assert [e["event"] for e in said] == ["job_stopped"], said
    assert "NOT saved" not in said[0]["message"] and "nothing to save" in said[0]["message"], said[0]["message"]
    assert said[0].get("checkpoint_saved") is None


def test_a_group_failure_seen_in_the_poll_a_stop_signal_ends_is_still_recorded(supervisor, monkeypatch):
    """Review 13c, F-C: a stop signal that arrived while a poll decided dropped the whole decision, so
    a group that had died before it (a crash, an OOM) was never recorded: no group_failed event (its
    exit code, its log tail), no failure counted, no page. The record is kept; what would act is not
    (no drain: this very stop may have killed the group; no relaunch)."""
    supervisor.poll_once()
    victim = next(g for g in supervisor.groups.values() if g.running)
    victim.process.kill()
    wait_until(lambda: victim.process.poll() is not None, "the group to die")

    def signalled_after_deciding(*args):
        decided = gated_decision(*args)
        supervisor.request_stop(signal.SIGTERM)
        return decided

    monkeypatch.setattr(shell, "gated_decision", signalled_after_deciding)
    started = len([e for e in supervisor.events.events if e["event"] == "group_started"])
    assert supervisor._loop() == 143
    failed = [e for e in supervisor.events.events if e["event"] == "group_failed"]
    assert [e["replica_id"] for e in failed] == [victim.replica_id], supervisor.events.events
    assert failed[0]["drained"] is False and "node kept" in failed[0]["message"], failed[0]
    assert sum(supervisor.stats.failures.values()) == 1, dict(supervisor.stats.failures)
    assert not [e for e in supervisor.events.events if e["event"] == "node_drained"]
    assert len([e for e in supervisor.events.events if e["event"] == "group_started"]) == started, "no relaunch"


def test_sigusr1_after_a_restart_does_not_say_no_group_had_finished_a_step(supervisor):
    """Review 13c, F-D: SIGUSR1 while no running group had a heartbeat yet wrote "no group had finished
    a step, nothing to save", also for a job at step 5000 whose groups had just been relaunched from
    its checkpoint. Nothing to save is right (the state is in that checkpoint); the claim was not."""
    supervisor.poll_once()  # sleeping groups: never a step of their own
    supervisor.stats.job_step = 5000  # the job's step, kept over a restart of every group
    supervisor.request_stop(signal.SIGUSR1)
    assert supervisor._loop() == 138
    message = [e for e in supervisor.events.events if e["event"] == "job_stopped"][0]["message"]
    assert "no group had finished a step" not in message and "nothing to save" in message, message
    assert "since its launch" in message and "step 5000" in message, message


def test_the_stop_grace_clock_starts_before_the_scrapes_that_ask_whether_a_group_holds_state(supervisor,
                                                                                             monkeypatch):
    """Review 13c, N1: SIGUSR1 first asks whether a group holds state, which scrapes each running group
    (up to 1 s each, one after another), and only then started the stop_grace_s clock: slow scrapes
    ate into the 10 s kill margin before Slurm's time limit. The clock now starts with the signal."""
    supervisor.poll_once()  # sleeping groups: no heartbeat until the scrape below gives them one
    scraped: list[float] = []

    def scrape(g):
        scraped.append(time.monotonic())
        g.heartbeat = time.time()

    monkeypatch.setattr(supervisor.graceful.observer, "scrape", scrape)
    waited: list[float] = []
    monkeypatch.setattr(supervisor.graceful, "wait", lambda step, deadline, interrupted: waited.append(deadline) or {
        "stop_after_step": step, "checkpoint_saved": False, "groups_stopped": [], "groups_killed": []})
    supervisor.request_stop(signal.SIGUSR1)
    assert supervisor._loop() == 138
    assert scraped and waited, (scraped, waited)
    assert waited[0] - supervisor.cfg.stop_grace_s <= scraped[0], "the grace clock started after the scrapes"


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_every_stage_the_supervisor_guards_is_declared():
    """Review of issue 14, F1: the rewind action ran under the stage "rewind", which was not declared,
    so a failed checkpoint move raised KeyError out of the guard and the supervisor exited with a
    traceback. Every stage named in a guard or in the executor's action table must be declared."""
    import re
    from pathlib import Path

    from watchtower.supervisor.errors import STAGES

    used = set()
    for source in (Path(__file__).parent.parent / "watchtower" / "supervisor").glob("*.py"):
        text = source.read_text()
        used |= set(re.findall(r'guard\("([a-z_]+)"\)', text))
        used |= set(re.findall(r':\s*\("([a-z_]+)", self\.', text))  # the executor's {Action: (stage, do)}
    assert "rewind" in used and "launch" in used, used  # the scan sees both kinds of use
    assert used <= set(STAGES), sorted(used - set(STAGES))
