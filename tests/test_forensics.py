"""Hang forensics below the supervisor: naming the stuck frame (pure) and the fallback capture.

The end-to-end proof (a real hung TP rank read by py-spy, named in the event, the group replaced)
is tests/test_supervisor.py::test_hung_group_is_detected_replaced_and_its_stuck_rank_and_frame_named.
Here, in a second each: the culprit rule as a table, and the faulthandler fallback used where
py-spy cannot read a process (no ptrace), bounded by its budget.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from watchtower.supervisor import capture as capture_module
from watchtower.supervisor.capture import RankStacks, RankTarget, capture
from watchtower.supervisor.contract import endpoint_file, flight_file, stack_file
from watchtower.supervisor.forensics import rank_targets, verdict
from watchtower.supervisor.stacks import PACKAGE_ROOT, Frame, Thread, culprit

SITE = "/venv/lib/python3.11/site-packages"
TRAIN = Frame("Trainer.train", f"{PACKAGE_ROOT}/trainer/train.py", 303)
INJECTED = Frame("FaultPlan.before_step", f"{PACKAGE_ROOT}/trainer/faults.py", 125)
WAIT = Frame("wait_tensor", f"{SITE}/torch/distributed/_functional_collectives.py", 142)
FORWARD = Frame("Block.forward", f"{PACKAGE_ROOT}/trainer/model.py", 163)
MODULE = Frame("<module>", f"{PACKAGE_ROOT}/cli.py", 437)


def main(*frames: Frame) -> Thread:
    return Thread("1234", (*frames, MODULE))


@pytest.mark.parametrize("stacks,want", [
    # the injector's sleep is a drill, not the bug: the trainer's call into it is named
    ({0: [main(WAIT, FORWARD, TRAIN)], 1: [main(INJECTED, TRAIN)]}, (1, "Trainer.train at train.py:303", True)),
    # a rank blocked in a collective is named by the user's line that called it, not torch's wait
    ({0: [main(WAIT, FORWARD, TRAIN)]}, (0, "Block.forward at model.py:163", False)),
    # the main thread is judged, not torchft's or the exporter's threads
    ({0: [Thread("TimeoutManager", (WAIT,)), main(INJECTED, TRAIN)]}, (0, "Trainer.train at train.py:303", True)),
    # nothing of the user's: the innermost frame
    ({0: [Thread("1", (Frame("sleep", f"{SITE}/x/y.py", 3),))]}, (0, "sleep at y.py:3", True)),
    ({}, None),
])
def test_the_culprit_is_the_rank_outside_a_collective_at_its_innermost_user_frame(stacks, want):
    got = culprit(stacks)
    assert (got if got is None else (got[0], str(got[1]), got[2])) == want


# review of issue 14, F5: any path holding "/watchtower/" counted as Watchtower's own code, so with a
# venv inside a clone named watchtower (or an install under /opt/watchtower/) torch's frames were
# "user code" and the page named torch's wait instead of the user's line
CLONE_SITE = "/home/u/watchtower/.venv/lib/python3.11/site-packages"
OPT_SITE = "/opt/watchtower/venv/lib/python3.11/site-packages"
USER_STEP = Frame("train_step", "/home/u/watchtower/train.py", 77)  # a user's project under ~/watchtower/


def _in(site: str, *frames: Frame) -> Thread:
    """A user's script calling into torch installed under `site`: innermost first."""
    return Thread("MainThread", (*frames, USER_STEP, Frame("<module>", "/home/u/watchtower/train.py", 90)))


@pytest.mark.parametrize("site", [SITE, CLONE_SITE, OPT_SITE], ids=["venv", "venv_in_a_watchtower_clone", "opt_watchtower"])
@pytest.mark.parametrize("stacks,want", [
    # every rank waits in a collective: the lowest is named at the user's line, not at torch's wait
    (lambda s: {0: [_in(s, Frame("wait_tensor", f"{s}/torch/distributed/_functional_collectives.py", 142))]},
     (0, "train_step at train.py:77", False)),
    # rank 1 stuck in a CUDA sync (outside a collective): named at the user's line that called it
    (lambda s: {0: [_in(s, Frame("wait_tensor", f"{s}/torch/distributed/_functional_collectives.py", 142))],
                1: [_in(s, Frame("synchronize", f"{s}/torch/cuda/__init__.py", 985))]},
     (1, "train_step at train.py:77", True)),
    # Watchtower installed in that venv: its trainer is user code, its fault injector is not
    (lambda s: {0: [Thread("MainThread", (Frame("FaultPlan.before_step", f"{s}/watchtower/trainer/faults.py", 125),
                                          Frame("Trainer.train", f"{s}/watchtower/trainer/train.py", 303),
                                          Frame("<module>", f"{s}/watchtower/cli.py", 437)))]},
     (0, "Trainer.train at train.py:303", True)),
], ids=["every_rank_waits", "one_rank_in_a_cuda_sync", "watchtower_installed_there"])
def test_a_venv_under_a_watchtower_directory_does_not_make_torchs_frames_user_code(site, stacks, want):
    got = culprit(stacks(site))
    assert (got[0], str(got[1]), got[2]) == want


def flight(seq: int) -> str:
    """A flight record whose last collective on the default group is `seq` (torch's JSON shape)."""
    return json.dumps({"entries": [{"process_group": ["0", "default_pg"], "collective_seq_id": seq,
                                    "profiling_name": "gloo:all_reduce", "state": "scheduled"}]})


def test_when_every_rank_waits_in_a_collective_the_flight_records_name_the_one_behind():
    """Stacks alone named the lowest rank ("every rank waits"): rank 1, blocked in an earlier
    collective than rank 0 (a mismatched call order), is the one rank 0 waits for."""
    ranks = [RankStacks(0, "py-spy", [main(WAIT, FORWARD, TRAIN)], flight=flight(195)),
             RankStacks(1, "py-spy", [main(WAIT, TRAIN)], flight=flight(194))]
    rank, frame, line = verdict(ranks)
    assert (rank, frame) == (1, "Trainer.train at train.py:303")
    assert line.endswith("rank 1 is behind on default_pg: collective 194, the others at 195)")
    without = [RankStacks(r.rank, r.source, r.threads) for r in ranks]
    assert verdict(without)[0] == 0 and verdict(without)[2].endswith("(every rank waits in a collective)")


def test_the_fault_injectors_frames_are_set_aside_when_the_rank_imported_through_a_symlink():
    """Review 14b, N7: PACKAGE_ROOT is the resolved path, a rank's frames carry the path it imported
    through (a clone under a symlinked project dir, an automount path): faults.py counted as the
    user's code, and a fire drill's hang was pinned on the injector's own sleep."""
    from watchtower.supervisor.stacks import is_user_code

    drill = Frame("_sleep", "/home/u/proj-link/watchtower/trainer/faults.py", 40)
    user = Frame("train_step", "/home/u/proj-link/my_train.py", 12)
    assert not is_user_code(drill)
    assert culprit({0: [Thread("MainThread", (drill, user))]})[1] == user


class _PySpyInTheKernel:
    """A py-spy stuck in an uninterruptible read of a rank's memory: SIGKILL does not end it yet."""

    def __init__(self, *args, **kwargs):
        self.killed = False

    def wait(self, timeout=None):
        if timeout is None:
            raise AssertionError("py-spy waited for with no bound: the supervisor's loop would block with it")
        raise subprocess.TimeoutExpired("py-spy", timeout)

    def kill(self):
        self.killed = True


def test_a_py_spy_that_does_not_die_on_its_kill_is_left_behind_not_waited_for(tmp_path, monkeypatch):
    """Review of issue 14, F10: a py-spy past its deadline was killed, then waited for without a bound;
    one stuck in the kernel (reading a rank hung on NFS or a wedged driver) held the loop: no
    detection, no page, no stop signal handled. Now the reap waits REAP_WAIT_S at most and says so."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(capture_module, "pyspy_binary", lambda: "/bin/true")
    monkeypatch.setattr(capture_module.subprocess, "Popen", _PySpyInTheKernel)
    target = RankTarget(0, int(gone.stdout), tmp_path / "stacks-r0.txt", tmp_path / "flight-r0.json")
    (found,) = capture([target], tmp_path / "work", budget_s=0.5)
    assert found.source == "" and "killed, still not dead" in found.errors[0], found.errors


class _Clock:
    """time.monotonic / time.sleep for capture.py on a clock of its own: a wait costs no real time."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_stuck_py_spys_are_reaped_in_parallel_within_one_reap_wait(tmp_path, monkeypatch):
    """Review 14b, N6: each py-spy past its deadline was killed and then waited for REAP_WAIT_S in
    turn, so 16 stuck ranks (a hang on NFS stalls every rank's py-spy) held the loop 16 s past
    capture_timeout_s. Now every overdue one is killed, then all are reaped against one shared
    REAP_WAIT_S: the capture ends within budget + REAP_WAIT_S, and their output files are removed."""
    clock = _Clock()

    class Stuck(_PySpyInTheKernel):
        def wait(self, timeout=None):
            clock.sleep(timeout)  # a D-state child runs every wait out
            return super().wait(timeout)

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(capture_module, "pyspy_binary", lambda: "/bin/true")
    monkeypatch.setattr(capture_module.subprocess, "Popen", Stuck)
    monkeypatch.setattr(capture_module, "time", clock)
    targets = [RankTarget(r, int(gone.stdout), tmp_path / f"stacks-r{r}.txt", tmp_path / f"flight-r{r}.json")
               for r in range(16)]
    found = capture(targets, tmp_path / "work", budget_s=2.0)
    assert clock.now <= 2.0 + capture_module.REAP_WAIT_S, f"capture took {clock.now:g} s of a 2 s budget"
    assert all("killed, still not dead" in f.errors[0] for f in found)
    assert not list((tmp_path / "work").glob("pyspy-*")), "the killed py-spys' output files were left"


def test_a_py_spy_dump_of_another_shape_is_that_ranks_error_not_the_whole_capture(tmp_path, monkeypatch):
    """A frame without its `filename` raised KeyError out of the capture (only ValueError was caught):
    every incident of that poll was lost, not just that rank's stack."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pyspy = tmp_path / "py-spy"
    pyspy.write_text("#!/bin/sh\necho '[{\"thread_name\": \"MainThread\", \"frames\": [{\"name\": \"f\", \"line\": 3}]}]'\n")
    pyspy.chmod(0o755)
    monkeypatch.setattr(capture_module, "pyspy_binary", lambda: str(pyspy))
    target = RankTarget(0, int(gone.stdout), tmp_path / "stacks-r0.txt", tmp_path / "flight-r0.json")
    (found,) = capture([target], tmp_path / "work", budget_s=2.0)
    assert found.errors[0].startswith("py-spy: not py-spy's dump --json shape"), found.errors


def test_a_trainer_that_fails_to_build_leaves_no_signal_handler_or_wakeup_fd(tmp_path):
    """Review of issue 14, F8: the hang dump was armed before Trainer._build and left armed when it
    raised (an unreadable source, a refused resume): Python's wakeup fd kept the number of a socket
    since closed, so in a process that went on (a notebook, a caller catching ConfigError) the next
    handled signal wrote a byte into whatever file reused that number."""
    import signal

    from watchtower.config import load_config
    from watchtower.supervisor.contract import STACK_SIGNAL
    from watchtower.trainer.train import Trainer
    from watchtower.validation import ConfigError

    (tmp_path / "empty").mkdir()
    cfg = load_config("tiny", [("run.output_dir", str(tmp_path / "out")), ("monitor.port", 0),
                               ("data.source", str(tmp_path / "empty"))])
    handler, wakeup = signal.getsignal(STACK_SIGNAL), signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    with pytest.raises(ConfigError, match="holds no text files"):
        Trainer(cfg)
    left = signal.set_wakeup_fd(wakeup)
    assert (signal.getsignal(STACK_SIGNAL), left) == (handler, wakeup), "the hang dump is still armed"


def test_a_rank_on_another_host_is_never_read_or_signalled_by_its_pid(tmp_path):
    """On Slurm a rank's pid is a pid of its compute node: read or signalled on the head it would be
    some other process. Only ranks whose endpoint file names this host are targets; with a remote
    launcher a rank without an endpoint file is not looked for in the head's process groups."""
    for rank, host in ((0, "node-17"), (1, socket.gethostname())):
        endpoint_file(tmp_path, rank).write_text(json.dumps({"port": 1, "pid": 4242 + rank, "host": host}))
    group = SimpleNamespace(process=SimpleNamespace(pid=os.getpid(), spec=SimpleNamespace(
        config_path=tmp_path / "trainer.toml")))
    targets, missing = rank_targets(group, 3, local=False)
    assert [(t.rank, t.pid) for t in targets] == [(1, 4243)]
    assert missing[0].startswith("rank 0: runs on node-17") and missing[1].startswith("rank 2: not started")


HUNG = """
import sys, time
from pathlib import Path
from watchtower.trainer.hang_dump import install
install(Path(sys.argv[1]), 0)  # what the trainer does for each rank
def stuck_in_user_code():
    print("ready", flush=True)
    while True:
        time.sleep(3600)
stuck_in_user_code()
"""


def test_without_ptrace_the_faulthandler_dump_names_the_frame_and_a_silent_rank_costs_only_the_budget(
        tmp_path, monkeypatch, processes):
    """py-spy needs ptrace (CAP_SYS_PTRACE, Yama scope); without it each rank is sent STACK_SIGNAL
    and its faulthandler dump read back. A rank that never answers (no handler: here the signal is
    blocked) ends the capture at its budget, not later: the kill of a hung group waits no longer."""
    monkeypatch.setattr(capture_module, "pyspy_binary", lambda: None)
    hung = processes.start([sys.executable, "-c", HUNG, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert hung.stdout.readline().strip() == "ready"
    deaf = processes.start([sys.executable, "-c", "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, "
                            "{signal.SIGUSR2}); print('ready', flush=True); time.sleep(600)"],
                           stdout=subprocess.PIPE, text=True)
    assert deaf.stdout.readline().strip() == "ready"
    started = time.monotonic()
    (read, silent) = capture([RankTarget(0, hung.pid, stack_file(tmp_path, 0), flight_file(tmp_path, 0)),
                              RankTarget(1, deaf.pid, tmp_path / "none.txt", tmp_path / "flight-r1.json")],
                             tmp_path / "work", budget_s=1.5)
    assert time.monotonic() - started < 1.5 + 0.5
    assert read.source == "faulthandler" and "py-spy: not installed" in read.errors[0]
    assert culprit({0: read.threads})[1].func == "stuck_in_user_code"
    assert silent.source == "" and "faulthandler: no dump before the deadline" in "".join(silent.errors)
    assert deaf.poll() is None, "the signal was blocked, not fatal: the kill is the supervisor's to do"
