"""Launching a replica group on a node: the seam between the supervisor and the machines.

`LocalLauncher` is built: a "node" is a slot on this machine with its own ports, cache directory
and process group (killing the group kills the node's processes and nothing else). A Slurm launcher
would implement the same two calls with `srun -N 1 -w NODE` inside an allocation taken with
`--no-kill`, so a spare costs no wait in the queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class GroupSpec:
    """Everything needed to start one replica group."""

    replica_id: str  # torchft replica id; groups rank in its sort order, so spares get later ids
    replica_group: int  # the numeric `replica_group` label
    node: str
    argv: list[str]  # arguments to `watchtower` (train ...)
    env: dict[str, str]
    log_path: Path


@dataclass
class GroupProcess:
    spec: GroupSpec
    proc: subprocess.Popen
    _log: object = field(default=None, repr=False)

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the whole process group: the group's launcher and every TP rank."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.spec.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
        except OSError:
            return []


class Launcher(Protocol):
    def launch(self, spec: GroupSpec) -> GroupProcess: ...


class LocalLauncher:
    """Nodes are slots on this machine. Node NAME's local disk is `nodes_dir/NAME/`: its data cache
    (WATCHTOWER_CACHE_DIR) lives there, so two nodes never share staged files, as on a real cluster."""

    def __init__(self, nodes_dir: Path):
        self.nodes_dir = Path(nodes_dir)

    def node_cache_dir(self, node: str) -> Path:
        return self.nodes_dir / node / "cache"

    def launch(self, spec: GroupSpec) -> GroupProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(spec.log_path, "ab")
        env = {**os.environ, "WATCHTOWER_CACHE_DIR": str(self.node_cache_dir(spec.node)), **spec.env}
        proc = subprocess.Popen([sys.executable, "-m", "watchtower.cli", *spec.argv], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return GroupProcess(spec, proc, log)
