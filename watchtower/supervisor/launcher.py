"""Launching a replica group on a node: the seam between the supervisor and the machines.

A launcher gets the path of the group's launch config (see `contract.py`) and starts
`watchtower train --config <path>` on the node; that file is all the group is told. `LocalLauncher`
is built: a "node" is a slot on this machine with its own ports, cache directory and process group
(killing the group kills the node's processes and nothing else). A Slurm launcher would start the
same command with `srun -N 1 -w NODE` inside an allocation taken with `--no-kill`, so a spare costs
no wait in the queue.

No orphans: a group runs in its own session, so it would outlive a supervisor that is SIGKILLed.
The local launcher starts it through `watchtower.orphan_guard` (the kernel kills it when the
supervisor's loop thread ends), and the group's launcher starts its TP ranks the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watchtower.orphan_guard import guarded

KILL_WAIT_S = 5.0  # a process in uninterruptible sleep may take a while to die; the policy asks again


@dataclass(frozen=True)
class GroupSpec:
    """Everything needed to start one replica group."""

    replica_id: str
    replica_group: int
    node: str
    config_path: Path  # the launch contract: `watchtower train --config config_path`
    log_path: Path


class GroupProcess:
    """A started group: its launcher process, which leads the group's process group."""

    def __init__(self, spec: GroupSpec, proc: subprocess.Popen):
        self.spec, self.proc = spec, proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the whole process group: the group's launcher and every TP rank."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=KILL_WAIT_S)

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.spec.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
        except OSError:
            return []


def direct_peers(env: dict[str, str] | os._Environ, hosts: list[str]) -> dict[str, str]:
    """`no_proxy` / `NO_PROXY` extended with the hosts groups reach each other on. torchft heals a new
    group from a peer over HTTP with urllib, which honours `http_proxy`: with a proxy set for the
    outside world, every heal would go to the proxy and fail. A user's own entries are kept.

    >>> direct_peers({"no_proxy": ".corp"}, ["node-7"])["NO_PROXY"]
    '.corp,localhost,127.0.0.1,::1,node-7'
    """
    mine = [h for h in env.get("no_proxy", env.get("NO_PROXY", "")).split(",") if h]
    joined = ",".join(dict.fromkeys(mine + ["localhost", "127.0.0.1", "::1", *hosts]))
    return {"no_proxy": joined, "NO_PROXY": joined}


class Launcher(Protocol):
    def launch(self, spec: GroupSpec) -> GroupProcess: ...

    def node_cache_dir(self, node: str) -> Path: ...

    def down_nodes(self) -> frozenset[str]: ...


class LocalLauncher:
    """Nodes are slots on this machine. Node NAME's local disk is `nodes_dir/NAME/`: its data cache
    lives there, so two nodes never share staged files, as on a real cluster."""

    def __init__(self, nodes_dir: Path):
        self.nodes_dir = Path(nodes_dir)

    def node_cache_dir(self, node: str) -> Path:
        return self.nodes_dir / node / "cache"

    def down_nodes(self) -> frozenset[str]:
        return frozenset()  # slots of this machine: never unreachable while the supervisor runs

    def launch(self, spec: GroupSpec) -> GroupProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        # slots share this machine's cores: one thread per rank, not one pool per rank
        env = {**os.environ, "OMP_NUM_THREADS": "1", **direct_peers(os.environ, [socket.gethostname()])}
        argv = guarded([sys.executable, "-m", "watchtower.cli", "train", "--config", str(spec.config_path)])
        with open(spec.log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return GroupProcess(spec, proc)
