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
