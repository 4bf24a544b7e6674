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

from watchtower.launch import free_port  # noqa: F401 (the tests import it from here: one place picks ports)

REPO = Path(__file__).resolve().parent.parent


# The suite runs in two pytest-xdist workers (pyproject's addopts: -n 2 --dist loadgroup). A serial
# run keeps the 2 cores CI has about half busy (844 s of CPU in 852 s of wall time on 2026-11-26):
# most tests wait on a Lighthouse heartbeat, a rule's evaluation, a scrape. The supervised and Slurm
# runs (most of the CPU, ~1.6 cores each) stay in one lane, one after the other as in a serial run:
# two of them at once would slow each other's recoveries and the Slurm testbed is one per machine
# (its munge socket is shared). Split into two units, one per worker, the suite took 553 s against
# 521-580 s in one lane (clean-clone CIs of 2026-11-26): the heavy runs slowed each other about as much
# as the balance won, and the suite is not CPU-bound (~780 s of CPU in ~555 s: its wall time is the
# tests' own waiting), so not worth two recoveries at once. Every other module is one unit of work, so
# a module's fixtures (a shared run, a daemon) are set up once, on one worker; the rest go to whichever
# worker is free. At 3c64a7b (2026-11-27) a clean-clone CI ran the suite in 380 s; its tests' times
# summed to 325 s for the e2e modules and 361 s for the rest.
# One thread per process, each trainer and this process alike (before anything imports torch): the two
# lanes keep both cores busy, and a process running torch's default two threads beside them stalls in
# OpenMP's barriers when one of its threads waits for a core (a 60-step run took 61 s instead of 8).
os.environ.setdefault("OMP_NUM_THREADS", "1")
E2E_MODULES = ("test_supervisor.py", "test_slurm.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group into the test's scope
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        item.add_marker(pytest.mark.xdist_group("e2e" if module in E2E_MODULES else module.removesuffix(".py")))
    # the longest lane first: it sets the wall time (pyproject's --no-loadscope-reorder keeps this order;
    # xdist would otherwise order the units by test count, which puts e2e first only while it has the most)
    items.sort(key=lambda item: item.path.name not in E2E_MODULES)


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
