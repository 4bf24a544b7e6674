"""Helpers for tests that run the real CLI in real processes and read real /metrics over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import WAIT_CEILING_S, wait_until

REPO = Path(__file__).resolve().parent.parent


# The suite runs in two pytest-xdist workers (pyproject's addopts: -n 2 --dist loadgroup). A serial
# run keeps the 2 cores CI has about half busy (844 s of CPU in 852 s of wall time on 2026-11-26):
# most tests wait on a Lighthouse heartbeat, a rule's evaluation, a scrape. The supervised and Slurm
# runs (most of the CPU, ~1.6 cores each) are two units of about equal length, first in the queue, so
# each worker starts with one: in one lane they set the wall time (~540 s of ~575 s, the other lane
# idle for its last ~140 s; ~800 s of CPU in all, 1.4 of the 2 cores, clean-clone CI of 2026-11-26).
# The Slurm testbed is one per machine (its munge socket is shared): test_slurm.py stays in one unit.
# Every other module is one unit of work, so a module's fixtures (a shared run, a daemon) are set up
# once, on one worker; the rest go to whichever worker is free.
# One thread per process, each trainer and this process alike (before anything imports torch): the two
# lanes keep both cores busy, and a process running torch's default two threads beside them stalls in
# OpenMP's barriers when one of its threads waits for a core (a 60-step run took 61 s instead of 8).
os.environ.setdefault("OMP_NUM_THREADS", "1")
E2E_MODULES = ("test_supervisor.py", "test_slurm.py")
# the supervised runs that go with test_slurm.py (~270 s together); the rest of test_supervisor.py
# (~265 s) is the other unit. killed_run's two tests share its module fixture: one unit.
E2E_WITH_SLURM = ("test_killed_group_is_replaced_by_the_spare_and_healthy_group_keeps_going",
                  "test_spare_skips_the_nonfinite_step_with_the_participants",
                  "test_an_agreed_loss_spike_rewinds_once_and_skips_exactly_the_poisoned_data",
                  "test_crash_on_every_node_is_stopped_as_a_crash_loop_and_pages")


def work_unit(module: str, function: str) -> str:
    """The xdist group of a test: "e2e-1" (test_slurm.py and E2E_WITH_SLURM) or "e2e-2" (the rest of
    test_supervisor.py) for the heavy runs, else its module."""
    if module == "test_slurm.py" or (module == "test_supervisor.py" and function in E2E_WITH_SLURM):
        return "e2e-1"
    if module == "test_supervisor.py":
        return "e2e-2"
    return module.removesuffix(".py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group into the test's scope
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        item.add_marker(pytest.mark.xdist_group(work_unit(module, item.originalname)))
    # the two heavy units first, one per worker (pyproject's --no-loadscope-reorder keeps this order;
    # xdist would otherwise order the units by test count)
    items.sort(key=lambda item: (work_unit(item.path.name, item.originalname) != "e2e-1",
                                 item.path.name not in E2E_MODULES))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A base port whose next port is free as well (TP rank 1 serves on base + 1)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def watchtower_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "watchtower.cli", *args]


def run_watchtower(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(watchtower_cmd(*args), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def scrape_text(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels include `labels` (None when absent)."""
    found = [v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else None


def wait_for_metrics(port: int, until, timeout: float = WAIT_CEILING_S, proc: subprocess.Popen | None = None) -> dict:
    """Scrape until `until(samples)` holds; fail at once if `proc` exits with an error."""
    def matched() -> dict | None:
        scraped = samples(scrape_text(port))
        return scraped if until(scraped) else None

    def exited() -> None:
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            raise AssertionError(f"process exited with {proc.returncode} before metrics on :{port} matched")

    return wait_until(matched, f"metrics on :{port} to match", timeout=timeout, abort=exited)


class Processes:
    """Every process a test starts, stopped at the end whatever happened."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("cwd", REPO)
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


@pytest.fixture
def processes():
    registry = Processes()
    yield registry
    registry.stop_all()
