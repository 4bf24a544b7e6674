"""The Slurm launcher against a real Slurm: munge, slurmctld and four slurmd (`slurmd -N nK`) on this
machine from a private slurm.conf (`watchtower.supervisor.slurm_testbed`), no mocks. The pure parts
(command lines, batch script, node selection, cache path) are tables first; they need no Slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from watchtower import cli
from watchtower.alerting_stack import AlertingStack
from watchtower.supervisor.config import ClusterSection, JobConfig, JobSection
from watchtower.supervisor.contract import EXIT_STOPPED
from watchtower.supervisor.supervisor_section import SupervisorSection
from watchtower.supervisor.sbatch import sbatch_options
from watchtower.supervisor.shell import STOP_SIGNALS
from watchtower.supervisor.launcher import GroupSpec
from watchtower.supervisor import slurm as slurm_launcher
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.observe import Observer
from watchtower.supervisor.slurm import EXIT_STEP_LOST, SlurmError, SlurmLauncher, SlurmStep
from watchtower.supervisor.slurm_commands import (allocated_cluster, expand_cache_dir, is_down, parse_records, select_nodes,
                                                  srun_argv)
from watchtower.supervisor.slurm_section import SlurmSection
from watchtower.supervisor.slurm_task import slurm_exit
from watchtower.supervisor.slurm_testbed import SlurmTestbed, unavailable
from watchtower.toml_dataclasses import build, dump_toml, read_toml
from watchtower.validation import ConfigError
from conftest import REPO, free_port
from tui.sources import ScrapeSource
from waiting import wait_until

# ---- tables: no Slurm needed ----------------------------------------------------------------------


@pytest.mark.parametrize("state, down", [("DOWN*", True), ("DOWN+DRAIN", True), ("FAIL", True), ("IDLE+DRAIN", False),
                                         ("ALLOCATED*", False), ("MIXED", False), ("DOWN+NOT_RESPONDING", True)])
def test_is_down(state, down):
    assert is_down(state) is down


@pytest.mark.parametrize("allocation, listed, groups, expected", [
    (["n1", "n2", "n3"], [], 3, ["n1", "n2", "n3"]),
    (["n1", "n2", "n3"], ["n3", "n1"], 2, ["n3", "n1"]),
    (["n1", "n2"], [], 3, "cluster.active_groups + spare_groups"),
    (["n1", "n2", "n3"], ["n1", "n9"], 1, "cluster.nodes[1]"),
    (["n1", "n2", "n3"], ["n1"], 2, "cluster.active_groups + spare_groups"),
])
def test_select_nodes(allocation, listed, groups, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as err:
            select_nodes(allocation, listed, groups, "12")
        assert err.value.field == expected and "\n" not in str(err.value)
    else:
        assert select_nodes(allocation, listed, groups, "12") == expected


@pytest.mark.parametrize("template, node, env, expected", [
    ("/local/{node}/cache", "n2", {}, "/local/n2/cache"),
    ("$TMPDIR/wt-{node}", "gpu07", {"TMPDIR": "/tmp/job9"}, "/tmp/job9/wt-gpu07"),
    ("${SCRATCH}/x", "n1", {"SCRATCH": "/s"}, "/s/x"),
    ("$$HOME/{node}", "n1", {}, "$HOME/n1"),
    ("$SCRATCH/{node}", "n1", {}, None),
])
def test_expand_cache_dir(template, node, env, expected):
    if expected is None:
        with pytest.raises(ConfigError, match="SCRATCH"):
            expand_cache_dir(template, node, env)
    else:
        assert expand_cache_dir(template, node, env) == expected


def test_parse_records_keeps_a_reason_with_spaces():
    (n1, n2) = parse_records("NodeName=n1 NodeAddr=10.1.0.7 State=IDLE+DRAIN Reason=watchtower: hang at step 9 "
                             "[root@2026-11-26T13:00:00]\nNodeName=n2 NodeAddr=10.1.0.8 State=DOWN*\n")
    assert n1["NodeAddr"] == "10.1.0.7" and n1["Reason"] == "watchtower: hang at step 9 [root@2026-11-26T13:00:00]"
    assert n2 == {"NodeName": "n2", "NodeAddr": "10.1.0.8", "State": "DOWN*"}


def test_sbatch_options_from_the_slurm_table():
    job = JobConfig(JobSection(name="big", trainer_config="tiny", output_dir="/runs/big"),
                    ClusterSection(active_groups=48, spare_groups=2, launcher="slurm"),
                    slurm=SlurmSection(partition="h100", account="llm", time="2-00:00:00", gpus_per_node=8,
                                       reserve_nodes=1, extra=["--qos=high"], stop_warning_s=120))
    assert sbatch_options(job, tp=8) == [
        "--qos=high", "--job-name=big", "--nodes=51", "--ntasks-per-node=8", "--no-kill", "--signal=B:USR1@120",
        "--output=/runs/big/slurm-%j.out", "--partition=h100", "--account=llm", "--time=2-00:00:00",
        "--gpus-per-node=8"]


@pytest.mark.parametrize("key, value", [("partition", "a b"), ("extra", ["qos=high"]), ("srun_args", ["--x\n#SBATCH"]),
                                        ("reserve_nodes", -1), ("command_timeout_s", 1e10), ("command_timeout_s", 0)])
def test_bad_slurm_table_is_refused(key, value):
    """Review 13, M4: command_timeout_s = 1e10 passed and sbatch died with an OverflowError traceback."""
    with pytest.raises(ConfigError) as err:
        SlurmSection(**{key: value})
    assert err.value.field.split("[")[0] == key


@pytest.mark.parametrize("item, key", [("--exclude=n9", "cluster.exclude"), ("-x n9", "cluster.exclude"),
                                       ("--nodelist=n1", "cluster.nodes"), ("--signal=B:USR1@5", "slurm.stop_warning_s"),
                                       ("-pgpu", "slurm.partition"), ("--nodefile=/tmp/n", "cluster.nodes"),
                                       ("--qos=high --exclude=n9", "cluster.exclude")])
def test_an_option_watchtower_writes_is_refused_in_slurm_extra(item, key):
    """Review 13b, note b: `[slurm] extra` lines come after the ones watchtower writes, and a later
    #SBATCH line wins, so `extra = ["--exclude=..."]` silently undid `cluster.exclude` (S1 again), and
    `--signal` the stop_warning_s the graceful stop was checked against."""
    with pytest.raises(ConfigError) as err:
        SlurmSection(extra=[item])
    assert err.value.field == "extra[0]" and f"set {key} instead" in str(err.value), err.value
    SlurmSection(extra=["--qos=high", "--exclusive", "-C h100"])  # options watchtower does not write pass


@pytest.mark.parametrize("extra", [["--exclud=n9", "--sig=B:USR1@5"], ["-sxn9"], ["--nodefi=/tmp/nodes"]])
def test_an_abbreviated_or_bundled_option_in_slurm_extra_cannot_override_a_written_one(extra):
    """Review 13c, F-B: the refusal above knows exact spellings only; sbatch also takes any unique prefix
    of a long option (`--exclud`, `--sig`), bundled short options (`-sxn9` is -s, then -x n9) and
    `--nodefile`, and the last #SBATCH line of an option wins. The `extra` lines now come first, so
    every option watchtower writes follows them and wins, whatever the spelling (`--nodefile` / `-F`,
    which sets the node list too, is now refused by name as well)."""
    job = JobConfig(JobSection(name="demo", trainer_config="tiny", output_dir="/runs/demo"),
                    ClusterSection(nodes=["n1", "n2", "n3"], active_groups=2, launcher="slurm", exclude=["n3"]),
                    slurm=SlurmSection(extra=extra))
    options = sbatch_options(job, tp=1)
    assert options[:len(extra)] == extra, options
    ours = options[len(extra):]
    assert {"--exclude=n3", "--signal=B:USR1@60", "--nodelist=n1,n2", "--nodes=2"} <= set(ours), ours


@pytest.mark.parametrize("warning, grace, field", [(0, 45, "slurm.stop_warning_s"), (5, 0, "slurm.stop_warning_s"),
                                                   (30, 45, "supervisor.stop_grace_s"), (54, 45, "supervisor.stop_grace_s")])
def test_a_stop_warning_shorter_than_the_grace_is_refused_naming_its_minimum(tmp_path, warning, grace, field):
    """Review 13, M5: stop_warning_s = 0 beside stop_grace_s = 45 was accepted and wrote
    `--signal=B:USR1@0` (the warning at the time limit itself: no time to save)."""
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"trainer_config": "tiny"}, "cluster": {"launcher": "slurm"},
                               "supervisor": {"stop_grace_s": grace}, "slurm": {"stop_warning_s": warning}}))
    with pytest.raises(ConfigError) as err:
        build(JobConfig, read_toml(path, "job file"))
    assert err.value.field == field and f"= {grace + 10:g}" in str(err.value), err.value
    assert "\n" not in str(err.value)
    JobConfig(JobSection(trainer_config="tiny"), ClusterSection(launcher="slurm"),  # the minimum itself is fine
              SupervisorSection(stop_grace_s=grace), SlurmSection(stop_warning_s=grace + 10))


def test_no_graceful_stop_and_no_warning_is_valid_and_the_minimum_is_an_integer(tmp_path):
    """Review 13b, F6: M5's bound refused stop_grace_s = 0 with stop_warning_s = 0 (no graceful stop
    wanted, valid before), advising "or lower supervisor.stop_grace_s" when it was already 0; and for
    a fractional grace it asked for stop_warning_s >= 55.5, which the integer key cannot hold."""
    none = JobConfig(JobSection(name="x", trainer_config="tiny", output_dir="/runs/x"), ClusterSection(launcher="slurm"),
                     SupervisorSection(stop_grace_s=0), SlurmSection(stop_warning_s=0))
    assert not [o for o in sbatch_options(none, tp=1) if o.startswith("--signal")], "a warning at the limit itself"
    with pytest.raises(ConfigError) as err:
        JobConfig(JobSection(trainer_config="tiny"), ClusterSection(launcher="slurm"),
                  SupervisorSection(stop_grace_s=0), SlurmSection(stop_warning_s=5))
    assert "lower supervisor.stop_grace_s" not in str(err.value) and "= 10" in str(err.value), err.value
    with pytest.raises(ConfigError) as err:
        JobConfig(JobSection(trainer_config="tiny"), ClusterSection(launcher="slurm"),
                  SupervisorSection(stop_grace_s=45.5), SlurmSection(stop_warning_s=55))
    assert "= 56" in str(err.value) and "55.5" not in str(err.value), err.value
    JobConfig(JobSection(trainer_config="tiny"), ClusterSection(launcher="slurm"),  # and 56 is accepted
              SupervisorSection(stop_grace_s=45.5), SlurmSection(stop_warning_s=56))


def test_cluster_exclude_on_slurm_is_passed_to_sbatch_and_not_refused_after_the_queue():
    """Review 13, S1: `cluster.exclude` with the Slurm launcher wrote no --exclude, so Slurm could
    allocate the bad node, and after the queue wait the job was refused (exit 2) whatever Slurm
    allocated: one node short, or "exclude[0] = 'n3' is not a known node"."""
    job = JobConfig(JobSection(name="x", trainer_config="tiny", output_dir="/runs/x"),
                    ClusterSection(active_groups=2, launcher="slurm", exclude=["n3"]))
    assert "--exclude=n3" in sbatch_options(job, tp=1) and "--nodes=2" in sbatch_options(job, tp=1)
    for allocation in (["n1", "n2", "n4"], ["n1", "n2", "n3"]):  # n3 absent, or allocated all the same
        nodes = select_nodes(allocation, [], 2, "7", job.cluster.exclude)
        assert nodes == [n for n in allocation if n != "n3"]
        assert allocated_cluster(job.cluster, nodes).nodes == nodes  # validated again, not refused
    listed = JobConfig(JobSection(name="x", trainer_config="tiny", output_dir="/runs/x"),
                       ClusterSection(nodes=["n1", "n2", "n3"], active_groups=2, launcher="slurm", exclude=["n3"]))
    assert {"--nodes=2", "--nodelist=n1,n2", "--exclude=n3"} <= set(sbatch_options(listed, tp=1))
    assert select_nodes(["n1", "n2"], listed.cluster.nodes, 2, "7", listed.cluster.exclude) == ["n1", "n2"]


@pytest.mark.parametrize("exclude, says", [(["n3\ntouch pwned"], "whitespace"), ([""], "is empty"),
                                           (["n3 "], "whitespace"), (["n[3-4]"], '"n3", "n4"'),
                                           (["n3,n4"], '"n3", "n4"'), (["n3", "n3"], "repeat")])
def test_a_cluster_exclude_item_sbatch_would_misread_is_refused_without_cluster_nodes(exclude, says):
    """Review 13b, F5: with launcher = "slurm" and no cluster.nodes (the usual case) cluster.exclude
    was never checked: a newline ended the #SBATCH block (partition, time, extra silently dropped) and
    ran the rest as a shell line; "" wrote `--exclude=`; a hostlist `n[3-4]` reached sbatch but the
    launcher compared it literally, so inside salloc the excluded nodes were used. Hostlist ranges are
    refused (list each node): the launcher and sbatch then read the same names."""
    data = {"job": {"trainer_config": "tiny"}, "cluster": {"launcher": "slurm", "exclude": exclude}}
    with pytest.raises(ConfigError) as err:
        build(JobConfig, data)
    assert err.value.field.startswith("cluster.exclude") and says in str(err.value), err.value
    assert "\n" not in str(err.value).replace(repr(exclude[0]), ""), err.value
    build(JobConfig, {**data, "cluster": {"launcher": "slurm", "exclude": ["n3", "gpu-07.rack2"]}})  # names pass


def test_sbatch_dry_run_prints_the_script_and_a_local_job_is_refused(tmp_path, capsys):
    job = write_job(tmp_path, steps=40, active=2, spares=1, tp=2,
                    slurm_table={"partition": "debug", "time": "01:00:00", "reserve_nodes": 1})
    assert cli.main(["sbatch", str(job), "--dry-run", "--supervisor.heartbeat_timeout_s", "25"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --no-kill", "#SBATCH --signal=B:USR1@60",
                 "#SBATCH --partition=debug", "#SBATCH --time=01:00:00"):
        assert line in script.splitlines(), line
    assert script.splitlines()[-1].endswith(f"supervise {job} --supervisor.heartbeat_timeout_s 25")
    assert script.splitlines()[-1].startswith("exec "), "Slurm's B: signals reach the batch shell only"
    assert signal.SIGUSR1 in STOP_SIGNALS, "the time limit's warning must stop the supervisor cleanly"
    assert not (tmp_path / "job" / "sbatch.sh").exists(), "a dry run wrote the script"
    assert cli.main(["sbatch", str(job), "--cluster.launcher", "local", "--cluster.nodes", "a,b,c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: cluster.launcher = 'local'") and len(err.splitlines()) == 1, err


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    """A Slurm client on PATH that answers as `script` (a /bin/sh body) does."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script + "\n")
    (bin_dir / name).chmod(0o755)


def test_sbatch_prints_the_checkpointing_stop_and_says_plain_scancel_loses_steps(tmp_path, monkeypatch, capsys):
    """Review 13, M7: `watchtower sbatch` printed `stop: scancel JOB`, the stop that loses every step
    since the last periodic checkpoint; the one that saves (`scancel --batch --signal=USR1 JOB`) was
    only in the README. M4: an sbatch on PATH that cannot be run (no #! line) was a traceback."""
    job = write_job(tmp_path, steps=40, active=1, spares=0)
    fake_command(tmp_path / "bin", "sbatch", "echo 4242")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["sbatch", str(job)]) == 0
    out = capsys.readouterr().out
    stop = [line.strip() for line in out.splitlines() if "scancel" in line]
    assert "scancel --batch --signal=USR1 4242" in stop[0] and "checkpoint" in stop[0], out
    assert "scancel 4242" in stop[1] and "last checkpoint" in stop[1], out
    (tmp_path / "bin" / "sbatch").write_text("echo 4242\n")  # executable, but no #! line: exec fails (ENOEXEC)
    assert cli.main(["sbatch", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sbatch" in err and len(err.splitlines()) == 1, err


def test_sbatch_with_no_graceful_stop_does_not_print_a_stop_that_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Review 13c, F-E: with stop_grace_s = 0 (no graceful stop; stop_warning_s = 0 is valid with it)
    `watchtower sbatch` still printed `scancel --batch --signal=USR1 JOB (every group saves a
    checkpoint, then exits)`, but SIGUSR1 then stops at once and saves nothing."""
    job = write_job(tmp_path, steps=40, active=1, spares=0, slurm_table={"stop_warning_s": 0},
                    supervisor_table={"stop_grace_s": 0})
    fake_command(tmp_path / "bin", "sbatch", "echo 4242")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["sbatch", str(job)]) == 0
    stop = [line.strip() for line in capsys.readouterr().out.splitlines() if "scancel" in line]
    assert len(stop) == 1 and "--signal=USR1" not in stop[0] and "scancel 4242" in stop[0], stop
    assert "no graceful stop" in stop[0] and "last periodic checkpoint" in stop[0], stop


def offline_launcher(tmp_path: Path, monkeypatch, **slurm_keys) -> SlurmLauncher:
    """A launcher of job 123 on n1..n3 whose Slurm clients are the fakes in tmp_path/bin."""
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return SlurmLauncher("123", ["n1", "n2", "n3"], {n: "127.0.0.1" for n in ("n1", "n2", "n3")}, "127.0.0.1",
                         SlurmSection(**slurm_keys), 1, "", tmp_path / "nodes")


def test_a_step_kill_with_the_controller_unreachable_still_kills_srun_and_drains(tmp_path, monkeypatch):
    """Review 13, M1: `SlurmStep.kill` asked squeue for the step first and raised when the controller
    did not answer, so the group's srun was never killed; `node_failed` raised the same way before
    the drain was tried (no drain, no node_drain_refused event)."""
    fake_command(tmp_path / "bin", "squeue", 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    fake_command(tmp_path / "bin", "scontrol", f'echo "$*" >> {tmp_path}/scontrol.log')
    launcher = offline_launcher(tmp_path, monkeypatch, drain_failed_nodes=True)
    srun = subprocess.Popen(["sleep", "600"], start_new_session=True)  # stands in for the group's srun
    spec = GroupSpec("g0000", 0, "n1", tmp_path / "g0000" / "trainer.toml", tmp_path / "g0000" / "group.log")
    try:
        with pytest.raises(SlurmError, match="Unable to contact"):
            SlurmStep(spec, srun, "127.0.0.1", launcher).kill()
        assert srun.poll() is not None, "the srun was left running"
    finally:
        srun.kill()
        srun.wait()
    left = launcher.node_failed("n1", "exit", 7)
    assert left.drain_error is None and "Unable to contact" in left.cancel_error and "\n" not in left.cancel_error
    assert "nodename=n1 state=drain reason=watchtower: exit at step 7" in (tmp_path / "scontrol.log").read_text()


@pytest.mark.parametrize("drain", [True, False])
def test_a_failed_step_cancel_is_not_reported_as_a_refused_drain(tmp_path, monkeypatch, drain):
    """Review 13b, F2: `node_failed` returned a failed step cancel as the drain's refusal, so the
    executor emitted node_drain_refused ("could not drain it") when scontrol had drained the node,
    and also with drain_failed_nodes = false, when no drain was asked for; the real problem (steps of
    ours may still run there) was hidden in it. Each outcome is now reported as what it is."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.jobfile import job_toml
    from watchtower.supervisor.policy_types import DrainNode
    from watchtower.supervisor.shell import Supervisor

    fake_command(tmp_path / "bin", "squeue", 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    fake_command(tmp_path / "bin", "scontrol", f'echo "$*" >> {tmp_path}/scontrol.log')
    launcher = offline_launcher(tmp_path, monkeypatch, drain_failed_nodes=drain)
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "j", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                             {"nodes": ["n1", "n2", "n3"], "active_groups": 1}, {"base_port": free_port()}))
    sup = Supervisor(*load_job(str(path)), launcher)
    try:
        sup.executor.run([DrainNode("n1", "exit")], time.time())
    finally:
        sup.lock.release()
    said = {e["event"]: e for e in sup.events.events}
    assert (tmp_path / "scontrol.log").exists() is drain
    assert "node_drain_refused" not in said, said["node_drain_refused"]["message"]
    left = said["node_steps_not_cancelled"]
    assert left["node"] == "n1" and "Unable to contact" in left["error"] and "may still run" in left["message"]
    fake_command(tmp_path / "bin", "scontrol", 'echo "scontrol: error: Invalid user for SlurmUser" >&2; exit 1')
    refused = launcher.node_failed("n1", "exit", 7)  # a drain asked for and refused is still that
    assert ("Invalid user" in (refused.drain_error or "")) is drain and "Unable to contact" in refused.cancel_error


def test_a_step_kill_whose_squeue_fails_still_ends_the_group_and_empties_its_targets(tmp_path, monkeypatch):
    """Review 13b, F1: `SlurmStep.kill` kills the srun, then raises the failed squeue; both callers
    skipped their bookkeeping, so the dead group read "running": shutdown killed it again (one more
    squeue timeout per group), targets.json kept its ranks after exit (WatchtowerRankDown would page
    for a job stopped on purpose), and a policy Kill recorded no kill time."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.jobfile import job_toml
    from watchtower.supervisor.observe import Group
    from watchtower.supervisor.policy_types import FailureKind, Kill
    from watchtower.supervisor.shell import Supervisor

    fake_command(tmp_path / "bin", "squeue", f'echo squeue >> {tmp_path}/calls.log; '
                 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    launcher = offline_launcher(tmp_path, monkeypatch)
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "j", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                             {"nodes": ["n1", "n2", "n3"], "active_groups": 1}, {"base_port": free_port()}))
    sup = Supervisor(*load_job(str(path)), launcher)
    sruns = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2)]  # srun stand-ins
    try:
        for i, srun in enumerate(sruns):
            spec = GroupSpec(f"g000{i}", i, f"n{i + 1}", tmp_path / f"g000{i}" / "trainer.toml", tmp_path / f"g{i}.log")
            sup.groups[spec.replica_id] = Group(SlurmStep(spec, srun, "127.0.0.1", launcher), time.time(), ports=[40001 + i])
        sup.executor.run([Kill("g0000", "n1", FailureKind.HANG)], time.time())
        assert "g0000" in sup.stats.timeline._kills, "the policy's kill left no kill time"
        sup.request_stop(signal.SIGTERM)
        assert sup.run() == 143
        assert all(srun.poll() is not None for srun in sruns)
        assert not any(g.running for g in sup.groups.values()), "a killed group still reads as running"
        assert json.loads((tmp_path / "job" / "targets.json").read_text()) == [], "dead ranks left in targets.json"
        # the policy's kill, then one per group at the signal's stop; none again at shutdown
        assert (tmp_path / "calls.log").read_text().count("squeue") == 3, "a dead group was killed again"
        assert sup.errors.snapshot()["kill"] == 3, "each failed cancel is still counted"
    finally:
        for srun in sruns:
            srun.kill()
            srun.wait()


def test_a_stop_signal_during_a_slurm_health_check_does_not_wait_for_squeue(tmp_path, monkeypatch):
    """Review 13b, F3: a check cut by a stop signal had its step cancelled (squeue, then scancel) in
    the check's thread, and the gate joins that thread: with a slow controller the stop waited up to
    2 x command_timeout_s (20 s by default), eating into the graceful stop's time before the limit.
    The srun is killed at once (Slurm ends its step with it) and the cancel goes on in the background."""
    from watchtower.supervisor.health import HealthCheck, HealthGate

    started, calls = tmp_path / "check-started", tmp_path / "calls.log"
    fake_command(tmp_path / "bin", "srun", f"touch {started}; exec sleep 600")  # the site check hangs
    fake_command(tmp_path / "bin", "squeue", f'sleep 3; echo "123.0 watchtower-check-n1 n1"')  # a slow controller
    fake_command(tmp_path / "bin", "scancel", f'echo "scancel $*" >> {calls}')
    gate = HealthGate(HealthCheck(timeout_s=60), offline_launcher(tmp_path, monkeypatch), StageErrors())
    signalled: list[float] = []

    def interrupted() -> bool:
        if not signalled and started.exists():
            signalled.append(time.monotonic())
        return bool(signalled)

    assert gate.unhealthy(["n1"], interrupted) is None
    assert time.monotonic() - signalled[0] < 2, "the stop waited for the cancel's squeue"
    wait_until(lambda: calls.exists() and "scancel --quiet 123.0" in calls.read_text(),
               "the cut check's step cancelled all the same", timeout=30)


def test_the_cut_health_checks_step_cancel_is_not_orphaned_by_the_supervisor_exiting(tmp_path, monkeypatch):
    """Review 13c, F-A: the cancel of a check cut by a stop signal ran on a daemon thread nobody waited
    for: the supervisor exited under it, its squeue was left an orphan and scancel never ran (inside
    `salloc` the allocation, and so the step, outlives the supervisor). The shutdown now joins it,
    within command_timeout_s."""
    from watchtower.supervisor.health import HealthCheck, HealthGate

    started, calls = tmp_path / "check-started", tmp_path / "calls.log"
    fake_command(tmp_path / "bin", "srun", f"touch {started}; exec sleep 600")
    fake_command(tmp_path / "bin", "squeue", 'sleep 1; echo "123.0 watchtower-check-n1 n1"')  # a slow controller
    fake_command(tmp_path / "bin", "scancel", f'echo "scancel $*" >> {calls}')
    launcher = offline_launcher(tmp_path, monkeypatch, command_timeout_s=30)
    gate = HealthGate(HealthCheck(timeout_s=60), launcher, StageErrors())
    assert gate.unhealthy(["n1"], started.exists) is None
    launcher.finish()  # what Supervisor.shutdown does last
    assert calls.exists() and "scancel --quiet 123.0" in calls.read_text(), "the supervisor exited before scancel"


def test_a_failed_slurm_query_keeps_down_nodes_down(tmp_path, monkeypatch, caplog):
    """Review 13, M2: a failed `scontrol` query made that poll's view list no DOWN node (the policy
    keeps no memory of them), so a dead node read FREE for a poll and could be picked for a launch;
    the SlurmError was also logged with a full traceback."""
    fail = tmp_path / "controller-down"
    fake_command(tmp_path / "bin", "scontrol", f"""[ -e {fail} ] && {{ echo "scontrol: error: Socket timed out" >&2; exit 1; }}
case "$*" in
  "-o show job 123") echo "JobId=123 NodeList=n[1-3]" ;;
  "show hostnames n[1-3]") printf 'n1\\nn2\\nn3\\n' ;;
  "-o show node n1,n2,n3") printf 'NodeName=n1 State=IDLE\\nNodeName=n2 State=DOWN*\\nNodeName=n3 State=IDLE\\n' ;;
esac""")
    monkeypatch.setattr(slurm_launcher, "DOWN_CHECK_INTERVAL_S", 0.0)  # ask Slurm at every poll
    launcher, errors = offline_launcher(tmp_path, monkeypatch), StageErrors()
    observer = Observer(tmp_path, 1, 10, errors)
    assert observer.observe([], None, launcher, time.time()).down_nodes == {"n2"}
    fail.touch()
    assert observer.observe([], None, launcher, time.time()).down_nodes == {"n2"}, "the dead node read free"
    assert sum(errors.snapshot().values()) == 1
    logged = [r for r in caplog.records if "Socket timed out" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None, "a failed Slurm command is one line, not a traceback"


@pytest.mark.parametrize("trainer, to_slurm", [(0, 0), (EXIT_STOPPED, 0), (1, 1), (-9, 137), (-15, 143)])
def test_slurm_task_tells_slurm_a_stop_on_request_is_no_bad_exit(trainer, to_slurm):
    """Review 13, M3: every group's srun has --kill-on-bad-exit=1, and a rank that stopped on request
    exited 75, a bad exit to Slurm: the first TP rank to stop got its peers terminated while they
    still wrote their events and fingerprint, and srun exited 143 instead of 75."""
    assert slurm_exit(trainer) == to_slurm


@pytest.mark.parametrize("ranks, code", [([EXIT_STOPPED] * 2, EXIT_STOPPED), ([0, 0], 0), ([EXIT_STOPPED, None], EXIT_STEP_LOST),
                                         ([0, EXIT_STOPPED], EXIT_STEP_LOST)])
def test_a_tp2_group_stopping_on_request_reads_as_stopped_on_slurm(tmp_path, monkeypatch, ranks, code):
    """M3's other half: srun exits 0 for a group whose ranks stopped on request (slurm_task told Slurm
    0), and the launcher reads their own exit files: every rank 75 is a stop on request, so the
    graceful stop counts the group stopped, not killed (job_stopped said "0 stopped, 0 killed")."""
    launcher = offline_launcher(tmp_path, monkeypatch)
    launcher.tp = 2
    spec = GroupSpec("g0000", 0, "n1", tmp_path / "g0000" / "trainer.toml", tmp_path / "g0000" / "group.log")
    spec.config_path.parent.mkdir()
    for rank, value in enumerate(ranks):
        if value is not None:
            (spec.config_path.parent / f"exit-r{rank}").write_text(f"{value}\n")
    srun = subprocess.Popen(["true"])
    srun.wait()
    assert SlurmStep(spec, srun, "127.0.0.1", launcher).poll() == code


# ---- a real Slurm -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Four nodes n1..n4 on this machine; every daemon stopped at the end, even after a failure."""
    why = unavailable()
    if why:
        pytest.skip(f"no private Slurm here: {why}")
    with SlurmTestbed(tmp_path_factory.mktemp("slurm")) as bed:
        yield bed


def write_job(tmp_path: Path, *, steps: int, active: int, spares: int, tp: int = 1, slurm_table=None,
              supervisor_table=None) -> Path:
    overrides = [f"train.steps={steps}", f"train.tp={tp}", "checkpoint.interval_steps=20", "train.log_interval=1",
                 "monitor.system_interval_s=1.0", "data.stage=always", f"data.cache_dir={tmp_path}/local/{{node}}"]
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({
        "job": {"name": "sl", "trainer_config": "tiny", "output_dir": str(tmp_path / "job"),
                "train_overrides": overrides},
        "cluster": {"active_groups": active, "spare_groups": spares, "launcher": "slurm"},
        "supervisor": {"heartbeat_timeout_s": 15, "startup_grace_s": 90, "base_port": free_port(), "metrics_port": 0,
                       **(supervisor_table or {})},
        "slurm": slurm_table or {}}))
    return path


def sbatch(slurm: SlurmTestbed, job: Path) -> str:
    """`watchtower sbatch` as a user runs it; the job id it prints. The job inherits this environment
    (sbatch's default): one thread per rank, as the local launcher's slots, since the four nodes
    share this machine's cores."""
    done = subprocess.run([sys.executable, "-m", "watchtower.cli", "sbatch", str(job)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **slurm.env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("submitted Slurm job ") and "watchtower tui --targets-file" in done.stdout
    return first.split()[3].rstrip(":")


def job_gone(slurm: SlurmTestbed, job_id: str) -> bool:
    return not slurm.run("squeue", "-h", "-j", job_id, "-o", "%i").strip()


def events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "job" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rows(tmp_path: Path, replica_id: str) -> list[dict]:
    path = tmp_path / "job" / "groups" / replica_id / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def processes_of(job_dir: Path, job_id: str) -> list[str]:
    """Live processes of the job: anything naming its directory, and its slurmstepd."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (str(job_dir) in cmd or f"slurmstepd: [{job_id}." in cmd):
            found.append(f"{proc.pid} {cmd}")
    return found


@contextmanager
def inside_allocation(slurm: SlurmTestbed, monkeypatch, nodes: int, name: str,
                      tasks_per_node: int = 1) -> Iterator[tuple[str, str]]:
    """An allocation as `salloc` gives a user (no shell), this process's environment inside it:
    (job id, node list); cancelled at the end."""
    slurm.run("salloc", f"-N{nodes}", f"--ntasks-per-node={tasks_per_node}", "--no-shell", "-J", name)
    job_id = slurm.run("squeue", "-h", "-n", name, "-o", "%i").strip()
    try:
        nodelist = slurm.run("squeue", "-h", "-j", job_id, "-o", "%N").strip()
        for key, value in {**slurm.env, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist}.items():
            monkeypatch.setenv(key, value)
        yield job_id, nodelist
    finally:
        slurm.run("scancel", job_id)


def test_more_groups_than_allocated_nodes_is_refused_before_any_step(slurm, tmp_path, monkeypatch, capsys):
    """Inside an allocation of 2 nodes (as in salloc), 3 groups: exit 2, one line, no step started."""
    with inside_allocation(slurm, monkeypatch, 2, "too-few") as (job_id, _):
        code = cli.main(["supervise", str(write_job(tmp_path, steps=40, active=2, spares=1))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "cluster.active_groups + spare_groups = 3" in err and f"allocation {job_id} has 2" in err
        assert slurm.run("squeue", "-h", "-s", "-j", job_id, "-o", "%i").strip() == "", "a step was started"


def test_srun_exit_0_without_each_ranks_own_0_reads_as_a_lost_node_and_a_refused_drain_is_a_warning(
        slurm, tmp_path, monkeypatch):
    """srun exits 0 when its node dies under the step (Slurm 22.05): a group must not read as
    finished unless every rank recorded its own 0. A drain Slurm refuses comes back as text; a health
    check runs on the node as a step; a node the job does not hold is down."""
    with inside_allocation(slurm, monkeypatch, 1, "lost", tasks_per_node=2) as (job_id, node):
        job = JobConfig(JobSection(name="lost", trainer_config="tiny", output_dir=str(tmp_path / "job")),
                        ClusterSection(launcher="slurm"), slurm=SlurmSection(drain_failed_nodes=True))
        launcher = SlurmLauncher.from_allocation(job, tp=1, cache_template="")
        group_dir = tmp_path / "job" / "groups" / "g0000"
        group_dir.mkdir(parents=True)
        spec = GroupSpec("g0000", 0, node, group_dir / "trainer.toml", group_dir / "group.log")
        srun = subprocess.Popen(srun_argv(job_id, node, 1, "watchtower-g0000", [], ["true"]))
        step = SlurmStep(spec, srun, launcher.addresses[node], launcher)
        srun.wait(timeout=60)
        assert srun.returncode == 0 and step.poll() == EXIT_STEP_LOST
        (group_dir / "exit-r0").write_text("0\n")  # what slurm_task writes when the trainer exits 0
        assert step.poll() == 0
        refused = launcher.node_failed("nosuchnode", "exit", 3)
        assert refused.drain_error and "scontrol" in refused.drain_error and refused.cancel_error is None
        # the health gate's command runs on the node, told which; one past its timeout leaves no step
        code, out = launcher.run_on_node(node, ["sh", "-c", 'echo "$WATCHTOWER_NODE $SLURMD_NODENAME"; exit 3'], 60)
        assert code == 3 and f"{node} {node}" in out.splitlines(), out  # beside srun's own "exit code 3" lines
        assert launcher.run_on_node(node, ["sleep", "300"], 1.0)[0] is None
        wait_until(lambda: "watchtower-check" not in slurm.run("squeue", "-h", "-s", "-j", job_id, "-o", "%j"),
                   "the timed-out check's step to be cancelled", timeout=30)
        # review 13, M3: a TP=2 group's step, rank 1 stopping on request first (slurm_task tells Slurm 0):
        # --kill-on-bad-exit leaves rank 0 to finish writing (a 75 terminated it: srun exit 143)
        script = f'[ "$SLURM_PROCID" = 1 ] && exit 0; sleep 2; touch {tmp_path}/rank0-finished'
        tp2 = subprocess.run(srun_argv(job_id, node, 2, "watchtower-g0001", [], ["sh", "-c", script]), timeout=60)
        assert tp2.returncode == 0 and (tmp_path / "rank0-finished").exists(), "Slurm terminated rank 0"
        # a node the job does not hold (it left the allocation) is down, for good
        other = next(n for n in slurm.nodes if n != node)
        both = SlurmLauncher(job_id, [node, other], {node: "127.0.0.1", other: "127.0.0.1"}, "127.0.0.1",
                             job.slurm, 1, "", tmp_path / "nodes")
        assert both.down_nodes() == {other}


def test_a_standby_step_becomes_a_tp2_group_and_an_unused_one_is_cancelled(slurm, tmp_path, monkeypatch):
    """Warm standbys on Slurm: a standby step (2 tasks, torch imported) on a free node becomes the
    TP=2 group launched there (the step keeps its name; ranks get their MASTER_PORT through the
    order; each rank records its exit, so the step reads as finished), and a standby never used is
    cancelled with its step when its node stops being free: no step, no process left."""
    with inside_allocation(slurm, monkeypatch, 2, "warm", tasks_per_node=2) as (job_id, nodelist):
        job = JobConfig(JobSection(name="warm", trainer_config="tiny", output_dir=str(tmp_path / "job")),
                        ClusterSection(launcher="slurm"), slurm=SlurmSection())
        launcher = SlurmLauncher.from_allocation(job, tp=2, cache_template="")
        used, unused = launcher.nodes
        for node in (used, unused):  # one at a time: the second once the first has imported
            launcher.keep_warm([used, unused])
            wait_until(launcher.standbys._by_node[node].ready, f"the standby step on {node} ready", timeout=120)
        names = {n: s.name for n, s in launcher.standbys._by_node.items()}
        group_dir = tmp_path / "job" / "groups" / "g0005"
        config = group_dir / "trainer.toml"
        config.parent.mkdir(parents=True)
        config.write_text(f'[run]\noutput_dir = "{group_dir}"\n[train]\nsteps = 2\ntp = 2\n[monitor]\nport = 0\n'
                          '[model]\ndim = 32\nn_layers = 1\nn_heads = 2\n')
        group = launcher.launch(GroupSpec("g0005", 5, used, config, group_dir / "group.log"))
        assert group.warm and group.standby_ready and group.step == names[used]
        assert wait_until(lambda: group.poll() is not None, "the warm group to finish", timeout=180) is not None
        assert group.poll() == 0, (group_dir / "group.log").read_text()[-3000:]
        assert len((group_dir / "train_log.jsonl").read_text().splitlines()) == 2
        launcher.keep_warm([])  # the other node is no longer free: its standby step is cancelled
        wait_until(lambda: not [n for n in slurm.run("squeue", "-h", "-s", "-j", job_id, "-o", "%j").split()
                                if n.startswith("watchtower-")], "every standby step gone", timeout=30)
        assert not processes_of(tmp_path / "job", job_id)
        launcher.finish()


def test_scancel_stops_every_group_and_prometheus_scraped_every_rank_by_node_address(slurm, tmp_path):
    """One active + one spare group of TP=2: Prometheus with the generated config scrapes all four
    ranks by their node's Slurm address; the TUI lists them by Slurm node name; scancel mid-run
    stops the supervisor and leaves no process of the job."""
    job_id = sbatch(slurm, write_job(tmp_path, steps=5000, active=1, spares=1, tp=2))
    job_dir, targets_file = tmp_path / "job", tmp_path / "job" / "targets.json"
    records = {r["NodeName"]: r for r in parse_records(slurm.run("scontrol", "-o", "show", "node"))}
    assert len({r["NodeAddr"] for r in records.values()}) == len(records), "a shared NodeAddr hides a leftover"

    def four_ranks() -> list[dict] | None:
        entries = json.loads(targets_file.read_text()) if targets_file.exists() else []
        return entries if len(entries) == 4 else None

    entries = wait_until(four_ranks, "4 ranks in targets.json", abort=lambda: assert_running(slurm, job_id))
    for e in entries:  # every rank by its node's Slurm address (NodeAddr), labelled with the Slurm node name
        assert e["targets"][0].rsplit(":", 1)[0] == records[e["labels"]["node"]]["NodeAddr"]
    nodes = {e["labels"]["node"] for e in entries}
    assert len(nodes) == 2 and nodes <= set(slurm.nodes)
    batch_addr = records[slurm.run("squeue", "-h", "-j", job_id, "-o", "%B").strip()]["NodeAddr"]
    started = next(e for e in events(tmp_path) if e["event"] == "job_started")
    assert started["lighthouse"].startswith(f"http://{batch_addr}:"), started  # the Lighthouse by the batch node's
    with AlertingStack(tmp_path / "prom", targets_file=targets_file) as stack:
        def all_up() -> list | None:
            up = stack.prometheus_api("/api/v1/query", query='up{job="watchtower-ranks"}')["result"]
            return up if len(up) == 4 and all(s["value"][1] == "1" for s in up) else None

        up = wait_until(all_up, "Prometheus scraping 4 ranks up")
    assert {(s["metric"]["instance"], s["metric"]["node"]) for s in up} == \
        {(e["targets"][0], e["labels"]["node"]) for e in entries}
    tui_rows = ScrapeSource(targets_file=targets_file).poll().rows
    assert sorted((r.node, r.up) for r in tui_rows) == sorted((e["labels"]["node"], True) for e in entries)
    wait_until(lambda: rows(tmp_path, "g0000") or rows(tmp_path, "g0001"), "a first step")

    slurm.run("scancel", job_id)
    wait_until(lambda: job_gone(slurm, job_id), f"job {job_id} to end")
    stopped = wait_until(lambda: [e for e in events(tmp_path) if e["event"] == "job_stopped"], "job_stopped")
    assert stopped[0]["signal"] == "SIGTERM"
    wait_until(lambda: not processes_of(job_dir, job_id), "no process of the job left", timeout=30)


def assert_running(slurm: SlurmTestbed, job_id: str) -> None:
    if job_gone(slurm, job_id):
        raise AssertionError(f"job {job_id} ended early")


def test_node_death_the_spare_takes_over_and_slurm_drains_the_node(slurm, tmp_path):
    """2 active + 1 spare submitted with `watchtower sbatch`; the node of the active group that is
    not the batch node dies (SIGKILL of its slurmd, slurmstepd and tasks). The healthy group loses no
    step, the spare is promoted, the dead node gets no new group and `sinfo -R` shows our reason."""
    steps = 45
    job_id = sbatch(slurm, write_job(tmp_path, steps=steps, active=2, spares=1,
                                     slurm_table={"drain_failed_nodes": True}))
    def three_started() -> dict[str, str] | None:
        started = {e["replica_id"]: e["node"] for e in events(tmp_path) if e["event"] == "group_started"}
        return started if len(started) >= 3 else None

    started = wait_until(three_started, "three groups started", abort=lambda: assert_running(slurm, job_id))
    batch_node = slurm.run("squeue", "-h", "-j", job_id, "-o", "%B").strip()
    actives = [g for g in ("g0000", "g0001") if started[g] != batch_node]
    victim, healthy = actives[0], next(g for g in ("g0000", "g0001") if g != actives[0])
    wait_until(lambda: any(r["step"] >= 10 for r in rows(tmp_path, healthy)), f"{healthy} at step 10",
               abort=lambda: assert_running(slurm, job_id))
    dead, killed_at = started[victim], time.time()
    slurm.kill_node(dead)
    try:
        wait_until(lambda: job_gone(slurm, job_id), f"job {job_id} to finish")
        ev = events(tmp_path)
        assert ev[-1]["event"] == "job_finished", ev[-3:]
        failed = next(e for e in ev if e["event"] == "group_failed")
        assert failed["replica_id"] == victim and failed["node"] == dead and failed["drained"]
        later = [e["node"] for e in ev if e["event"] == "group_started" and e["time"] > killed_at]
        assert dead not in later, "a group was started on the dead node"
        assert not [e for e in ev if e["event"] == "node_drain_refused"]
        reasons = slurm.run("sinfo", "-h", "-R", "-o", "%N|%E")
        assert f"{dead}|watchtower: " in reasons, reasons
        # the healthy group: every step once, in order, from its first contributing step to the last
        # (how many first steps it spent as a spare is a start-up race; it was in the quorum before the kill)
        healthy_rows = rows(tmp_path, healthy)
        seen = [r["step"] for r in healthy_rows]
        assert healthy_rows[0]["time"] < killed_at and seen == list(range(seen[0], steps + 1)), \
            "the healthy group lost or repeated steps"
        promoted = [r for r in rows(tmp_path, "g0002") if r["time"] > killed_at]
        assert promoted and all(r["participants"] == 2 for r in promoted), "the spare did not take the seat"
        assert any((tmp_path / "local" / started["g0002"]).rglob("*")), "the spare staged nothing on its node"
        assert not processes_of(tmp_path / "job", job_id)
    finally:
        slurm.revive(dead)
