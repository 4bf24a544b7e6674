"""Capture the Python stacks and flight records of hung ranks, all at once, within a deadline.

First py-spy (`py-spy dump --pid P --json`): it reads a process from outside through ptrace,
without its cooperation, so a rank stuck anywhere (in C, holding the GIL) is read; it pauses the
rank for the read (tens of ms). Then every rank is sent STACK_SIGNAL (trainer/hang_dump.py): its
faulthandler writes every thread's stack to `stacks-r<rank>.txt` from the signal handler itself,
in C (read back for a rank py-spy could not read: no ptrace in a container without CAP_SYS_PTRACE,
Yama's ptrace_scope 3, or py-spy missing), and a thread of the rank writes torch's flight recorder
to `flight-r<rank>.json` (its last collectives: which one each rank waits in).

Bounded: every rank's py-spy runs at the same time, and whatever has not answered when the
deadline comes is killed (py-spy's ptrace detaches when it dies; the rank is killed next anyway);
the signal phase gets the time py-spy left, flight records at most FLIGHT_WAIT_S of it. A capture
never takes longer than its `budget_s`. Cost: one short-lived py-spy per rank (a few MB, ~30 ms on
an idle rank), one signal per rank, a flight record of up to 2000 small entries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchtower.supervisor.contract import STACK_SIGNAL
from watchtower.supervisor.stacks import Thread, parse_faulthandler, parse_pyspy

POLL_S = 0.02
FALLBACK_SHARE = 0.4  # of the budget kept for the signal fallback when py-spy is slow
FLIGHT_WAIT_S = 2.0  # for the flight records, after the signal (a rank holding the GIL sends none)
# after SIGKILL: a py-spy in an uninterruptible read of a rank stuck in the kernel (hung NFS/Lustre,
# a wedged driver: the very hangs captured) dies only when that read returns; it is left to the kernel
REAP_WAIT_S = 1.0


@dataclass(frozen=True)
class RankTarget:
    rank: int
    pid: int
    stack_file: Path  # where its faulthandler writes on STACK_SIGNAL
    flight_file: Path  # where it writes torch's flight recorder on STACK_SIGNAL


@dataclass
class RankStacks:
    rank: int
    source: str = ""  # "py-spy", "faulthandler", or "" when neither answered
    threads: list[Thread] = field(default_factory=list)
    raw: str = ""  # what the source wrote, kept in the incident as is
    flight: str = ""  # torch's flight recorder as the rank dumped it (JSON), "" if none came
    errors: list[str] = field(default_factory=list)


def pyspy_binary() -> str | None:
    """py-spy beside this interpreter (a venv's bin is often not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def capture(targets: list[RankTarget], workdir: Path, budget_s: float) -> list[RankStacks]:
    """Each target's stacks, in the order given (ranks of several groups may be captured together);
    py-spy's output goes to files under `workdir` (no pipe to fill)."""
    deadline = time.monotonic() + budget_s
    workdir.mkdir(parents=True, exist_ok=True)
    found = [RankStacks(t.rank) for t in targets]
    _with_pyspy(targets, workdir, found, deadline - FALLBACK_SHARE * budget_s)
    _with_signal(targets, found, deadline)
    return found


def _with_pyspy(targets: list[RankTarget], workdir: Path, found: list[RankStacks], deadline: float) -> None:
    binary = pyspy_binary()
    if binary is None:
        for f in found:
            f.errors.append("py-spy: not installed (pip install py-spy)")
        return
    running = {}
    for i, t in enumerate(targets):
        out, err = workdir / f"pyspy-{i}.json", workdir / f"pyspy-{i}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            running[i] = (subprocess.Popen([binary, "dump", "--pid", str(t.pid), "--json"], stdout=stdout,
                                          stderr=stderr, stdin=subprocess.DEVNULL), out, err)
    overdue = []
    for i, (proc, out, err) in running.items():
        try:
            code = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            proc.kill()  # reaped below, all together
            overdue.append(i)
            continue
        text = out.read_text(errors="replace")
        try:
            if code != 0:
                raise ValueError(f"exit {code}: {err.read_text(errors='replace').strip()[-300:]}")
            found[i].threads, found[i].raw, found[i].source = parse_pyspy(text), text, "py-spy"
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            found[i].errors.append(f"py-spy: {e}")
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
    reap_deadline = time.monotonic() + REAP_WAIT_S  # one wait for all: 16 stuck ranks cost 1 s, not 16
    for i in overdue:
        proc, out, err = running[i]
        found[i].errors.append("py-spy: no answer before the deadline" + _reap(proc, reap_deadline))
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


def _reap(proc: subprocess.Popen, deadline: float) -> str:
    """Reap a py-spy killed past its deadline, waiting until `deadline` at most (shared by every killed
    py-spy, REAP_WAIT_S after the capture's py-spy deadline): "" once it is gone, else what the error
    should add (the capture goes on; subprocess reaps it at a later Popen)."""
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        return ""
    except subprocess.TimeoutExpired:
        return f"; killed, still not dead after {REAP_WAIT_S:g} s (stuck in the kernel reading the rank?): left behind"


def _with_signal(targets: list[RankTarget], found: list[RankStacks], deadline: float) -> None:
    """STACK_SIGNAL to every rank at once (after py-spy: a rank that registered no handler dies of it),
    then read back the stacks py-spy could not get and each rank's flight record. A flight record is
    waited for at most FLIGHT_WAIT_S: a rank holding the GIL never writes one."""
    sizes = {}
    for i, t in enumerate(targets):
        try:
            size = t.stack_file.stat().st_size if t.stack_file.exists() else 0
            t.flight_file.unlink(missing_ok=True)  # the rank writes a fresh one (atomically) on the signal
            os.kill(t.pid, STACK_SIGNAL)
            sizes[i] = size  # waited for only once signalled: a rank already gone costs no time
        except OSError as e:
            found[i].errors.append(f"signal: {e}")
    stacks = {i for i in sizes if not found[i].source}
    flights = set(sizes)
    flight_deadline = min(deadline, time.monotonic() + FLIGHT_WAIT_S)
    last_len: dict[int, int] = {}
    while (stacks and time.monotonic() < deadline) or (flights and time.monotonic() < flight_deadline):
        for i in list(stacks):
            text = _read_from(targets[i].stack_file, sizes[i])
            if text and last_len.get(i) == len(text):  # one poll without growth: the dump is complete
                found[i].threads, found[i].raw, found[i].source = parse_faulthandler(text), text, "faulthandler"
                stacks.discard(i)
            last_len[i] = len(text)
        for i in list(flights):
            if targets[i].flight_file.exists():
                found[i].flight = _read_from(targets[i].flight_file, 0)
                flights.discard(i)
        time.sleep(POLL_S)
    for i in stacks:
        found[i].errors.append("faulthandler: no dump before the deadline (no handler registered?)")
    for i in flights:
        found[i].errors.append("flight recorder: no dump in time (a rank holding the GIL cannot write one)")


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
