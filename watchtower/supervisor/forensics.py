"""Forensics: why a hung group was killed, written to `incidents/<id>/` before the kill.

For each `Capture` the policy orders (a HANG or a DEADLOCK, just before its `Kill`), the shell
captures every rank's Python stacks (`capture.py`, all groups of the poll at once, within
`supervisor.capture_timeout_s`) and writes `incidents/<UTC time>-<replica_id>/`:

    decision.json       what was decided and why, the culprit rank and frame, each rank's stack source,
                        and per rank and process group the last collective it entered (seq, op)
    stacks-r<rank>.txt  every thread of the rank, innermost frame first (raw py-spy JSON beside it)
    flight-r<rank>.json torch's flight recorder as the rank dumped it (Gloo records too, torch >= 2.8)
    log_tail.txt        the group's last log lines
    metrics-r0.txt      rank 0's last scraped /metrics, as served (with the time of the scrape)

Cost: the capture's time (bounded) and a few small files.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from watchtower.atomic_write import write_atomic
from watchtower.launch import WORKER_ENV
from watchtower.supervisor.capture import RankStacks, RankTarget, capture
from watchtower.supervisor.contract import endpoint_file, flight_file, stack_file
from watchtower.supervisor.observe import Group
from watchtower.supervisor.policy_types import Capture
from watchtower.supervisor.stacks import culprit

LOG_LINES = 50


@dataclass(frozen=True)
class Incident:
    id: str
    path: Path
    rank: int | None  # the culprit rank, None when no stack was read
    frame: str  # where it is stuck, "func at file.py:line"; "" when unknown
    verdict: str  # one line for the event, the page and the TUI
    seconds: float  # the capture's wall time


def rank_targets(group: Group, tp: int, local: bool) -> tuple[list[RankTarget], list[str]]:
    """The ranks to read and why any is missing. A rank's pid and host are in the endpoint file it
    writes once it serves /metrics; a pid is read (and signalled) only on this host: a pid of another
    node is another process here. A local group's rank hung before that (importing, initialising) is
    found in the group's process group instead (`local`: the group runs on this host)."""
    group_dir = group.process.spec.config_path.parent
    here = socket.gethostname()
    early = None
    targets, missing = [], []
    for rank in range(tp):
        try:
            endpoint = json.loads(endpoint_file(group_dir, rank).read_text())
            pid, host = int(endpoint["pid"]), endpoint.get("host", here if local else "?")
        except (OSError, ValueError, KeyError):
            early = (ranks_in_process_group(group.process.pid, tp) if local else {}) if early is None else early
            pid, host = early.get(rank), here
        if host != here:
            missing.append(f"rank {rank}: runs on {host}, not on this host (run `py-spy dump --pid {pid}` there)")
        elif pid is None:
            missing.append(f"rank {rank}: not started (no endpoint file, no process with RANK={rank})")
        else:
            targets.append(RankTarget(rank, pid, stack_file(group_dir, rank), flight_file(group_dir, rank)))
    return targets, missing


def ranks_in_process_group(leader: int, tp: int) -> dict[int, int]:
    """rank → pid of the group whose launcher leads process group `leader` (Linux /proc). With one
    rank the launcher is the rank; with more, its children carry WORKER_ENV and RANK. Costs one
    scan of /proc (a few ms)."""
    if tp == 1:
        return {0: leader}
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[2]) != leader:
                continue
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{entry}/environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in kv)
            if env.get(WORKER_ENV) == "1":
                found[int(env["RANK"])] = int(entry)
        except (OSError, ValueError, KeyError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def verdict(found: list[RankStacks]) -> tuple[int | None, str, str]:
    """(rank, frame, one line) from the stacks read. When every rank waits in a collective, the stacks
    cannot tell who is late; the flight records can: the rank whose last collective on a process
    group is behind the others' is the one they wait for."""
    stacks = {f.rank: f.threads for f in found if f.threads}
    named = culprit(stacks)
    if named is None:
        return None, "", "no stack could be read (see decision.json)"
    rank, frame, alone = named
    if alone:
        return rank, str(frame), f"rank {rank} stuck in {frame}"
    late = behind({f.rank: flight_summary(f.flight) for f in found if f.flight})
    if late is None or late[0] not in stacks:
        return rank, str(frame), f"rank {rank} stuck in {frame} (every rank waits in a collective)"
    rank, pg, seq, ahead = late
    frame = culprit({rank: stacks[rank]})[1]
    return rank, str(frame), (f"rank {rank} stuck in {frame} (every rank waits in a collective; rank {rank} is "
                              f"behind on {pg}: collective {seq}, the others at {ahead})")


def behind(summaries: dict[int, dict | str]) -> tuple[int, str, int, int] | None:
    """(rank, process group, its last collective, the others' highest) for the first process group
    whose ranks' flight records disagree; None when they agree or there are none.

    >>> behind({0: {"default_pg": {"seq": 195}}, 1: {"default_pg": {"seq": 194}}})
    (1, 'default_pg', 194, 195)
    >>> behind({0: {"default_pg": {"seq": 7}}, 1: "no collective recorded"})
    """
    groups = sorted({pg for s in summaries.values() if isinstance(s, dict) for pg in s})
    for pg in groups:
        seqs = {rank: s[pg]["seq"] for rank, s in summaries.items() if isinstance(s, dict) and pg in s}
        if len(seqs) > 1 and len(set(seqs.values())) > 1:
            rank = min(seqs, key=lambda r: (seqs[r], r))
            return rank, pg, seqs[rank], max(seqs.values())
    return None


class Forensics:
    """Captures and writes incidents for the executor; `budget_s` 0 turns capture off. `local`: the
    launcher runs groups on this host; otherwise (Slurm) only ranks whose endpoint names this host."""

    def __init__(self, out: Path, tp: int, budget_s: float, local: bool = True):
        self.dir, self.tp, self.budget_s, self.local = out / "incidents", tp, budget_s, local

    def capture(self, orders: list[tuple[Capture, Group]], now: float) -> dict[str, Incident]:
        """Every ordered group's ranks at once (one deadline), then one directory per group; nothing
        with capture off (capture_timeout_s = 0)."""
        if self.budget_s <= 0:
            return {}
        started = time.monotonic()
        plans = [(order, group, *rank_targets(group, self.tp, self.local)) for order, group in orders]
        targets = [t for *_, ts, _ in plans for t in ts]
        found = capture(targets, self.dir / ".capture", self.budget_s) if targets else []
        seconds = time.monotonic() - started
        incidents, at = {}, 0
        for order, group, ts, missing in plans:
            mine, at = found[at:at + len(ts)], at + len(ts)
            incidents[order.replica_id] = self._write(order, group, mine, missing, now, seconds)
        return incidents

    def _write(self, order: Capture, group: Group, found: list[RankStacks], missing: list[str], now: float,
               seconds: float) -> Incident:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        path = self.dir / f"{stamp}-{order.replica_id}"
        rank, frame, line = verdict(found)
        incident = Incident(path.name, path, rank, frame, line, round(seconds, 3))
        for f in found:
            write_atomic(path / f"stacks-r{f.rank}.txt", render(f))
            if f.source == "py-spy":
                write_atomic(path / f"stacks-r{f.rank}.json", f.raw)
            if f.flight:
                write_atomic(path / f"flight-r{f.rank}.json", f.flight)
        write_atomic(path / "log_tail.txt", "\n".join(group.process.log_tail(LOG_LINES)) + "\n")
        if group.last_metrics:
            write_atomic(path / "metrics-r0.txt", f"# scraped at {group.last_metrics_at:.3f}\n"
                         + group.last_metrics.decode(errors="replace"))
        decision = {**asdict(order), "kind": order.kind.value, "at": now, "step": group.step,
                    "culprit": {"rank": rank, "frame": frame, "verdict": line}, "capture_seconds": incident.seconds,
                    "ranks": {f.rank: {"source": f.source or None, "errors": f.errors} for f in found},
                    "ranks_missing": missing,
                    "last_collectives": {f.rank: flight_summary(f.flight) for f in found if f.flight}}
        write_atomic(path / "decision.json", json.dumps(decision, indent=2) + "\n")
        return incident


def flight_summary(text: str) -> dict | str:
    """Per process group, the last collective a rank's flight recorder saw it enter; the ranks of a
    group that differ show which one fell behind. A string says why there is none.

    >>> flight_summary('{"entries": [{"process_group": ["0", "default_pg"], "collective_seq_id": 2, '
    ...                '"profiling_name": "gloo:all_reduce", "state": "scheduled"}]}')
    {'default_pg': {'seq': 2, 'op': 'gloo:all_reduce', 'state': 'scheduled'}}
    """
    try:
        data = json.loads(text)
    except ValueError:
        return "not JSON"
    if "error" in data:
        return str(data["error"])
    last: dict = {}
    for e in data.get("entries", []):
        pg_id, name = (e.get("process_group") or ["?", ""])[:2]
        pg = name or (f"pg {pg_id}" if pg_id else "unnamed")  # torchft's group has neither name nor id
        if pg not in last or e.get("collective_seq_id", 0) >= last[pg]["seq"]:
            last[pg] = {"seq": e.get("collective_seq_id", 0), "op": e.get("profiling_name", "?"),
                        "state": e.get("state", "?")}
    return last or "no collective recorded"


def render(found: RankStacks) -> str:
    """A rank's threads as text, innermost frame first, main thread first."""
    lines = [f"# rank {found.rank}, read by {found.source or 'nothing'}", *[f"# {e}" for e in found.errors]]
    for t in sorted(found.threads, key=lambda t: not t.is_main):
        lines += [f"Thread {t.name}{' (main)' if t.is_main else ''}:"] + [f"  {f.func} ({f.file}:{f.line})"
                                                                        for f in t.frames] + [""]
    return "\n".join(lines) + "\n"
