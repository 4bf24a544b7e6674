"""Launching a replica group on a node: the seam between the supervisor and the machines.

A launcher gets the path of the group's launch config (see `contract.py`) and starts
`watchtower train --config <path>` on the node; that file is all the group is told. `LocalLauncher`
is built: a "node" is a slot on this machine with its own ports, cache directory and process group
(killing the group kills the node's processes and nothing else). `slurm.SlurmLauncher` starts the
same command as a job step (`srun -N1 -w NODE`) inside an allocation taken with `--no-kill`, so a
spare costs no wait in the queue.

No orphans: a group runs in its own session, so it would outlive a supervisor that is SIGKILLed.
The local launcher starts it through `watchtower.orphan_guard` (the kernel kills it when the
supervisor's loop thread ends), and the group's launcher starts its TP ranks the same way.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from watchtower.atomic_write import write_atomic
from watchtower.orphan_guard import guarded
from watchtower.standby import READY_SUFFIX

log = logging.getLogger(__name__)

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
    """A started group: its launcher process, which leads the group's process group. `address`:
    where its node is reached (its ranks' /metrics), as Prometheus and the supervisor scrape it."""

    def __init__(self, spec: GroupSpec, proc: subprocess.Popen, address: str = "127.0.0.1", warm: bool = False,
                 standby_ready: bool = False):
        self.spec, self.proc, self.address = spec, proc, address
        self.warm = warm  # started from a standby, not a new interpreter
        self.standby_ready = standby_ready  # and that standby had finished its imports when ordered

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


NODE_ENV = "WATCHTOWER_NODE"  # set for a command run by `run_on_node`: the node it runs for
NODE_CACHE_ENV = "WATCHTOWER_NODE_CACHE_DIR"  # and that node's data cache (`node_cache_dir`)
OUTPUT_TAIL_CHARS = 4000  # of a node command's output kept (stdout and stderr together)
CANCEL_POLL_S = 0.1  # how soon a node command sees its cancel (a stop signal during the health gate)


def node_env(node: str, cache_dir: Path) -> dict[str, str]:
    """What a command run on a node is told of it, on every launcher (a site health check keys on it).

    >>> node_env("node-b", Path("/scratch/cache"))
    {'WATCHTOWER_NODE': 'node-b', 'WATCHTOWER_NODE_CACHE_DIR': '/scratch/cache'}
    """
    return {NODE_ENV: node, NODE_CACHE_ENV: str(cache_dir)}


def run_bounded(argv: list[str], env: dict[str, str], timeout_s: float,
                cancel: threading.Event | None = None) -> tuple[int | None, str]:
    """Run `argv` to its end, for `timeout_s`, or until `cancel` is set: (exit code, or None on a
    timeout or a cancel; the output's tail).

    It runs in its own session, guarded (it dies with us), stdout and stderr into one unnamed temp
    file (not a pipe: a background child holding a pipe would stall us until the timeout). When it
    exits, times out or is cancelled, its whole session is SIGKILLed, so nothing it started is left
    running. Blocks the calling thread up to `timeout_s` (a cancel is seen within CANCEL_POLL_S);
    costs one extra interpreter start (the orphan guard).
    """
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(guarded(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        code, deadline = None, time.monotonic() + timeout_s
        while code is None and time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
            try:
                code = proc.wait(timeout=min(CANCEL_POLL_S, max(deadline - time.monotonic(), 0)))
            except subprocess.TimeoutExpired:
                pass
        _kill_session(proc.pid)
        proc.wait()
        out.seek(max(out.seek(0, os.SEEK_END) - 4 * OUTPUT_TAIL_CHARS, 0))
        text = out.read().decode(errors="replace").strip()
    return code, text[-OUTPUT_TAIL_CHARS:]


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class NodeCleanup:
    """What the launcher's part of draining a node left undone; None: done, or nothing to do.
    cancel_error: our steps there could not be cancelled (they may still run there);
    drain_error: a drain the job asked for (`[slurm] drain_failed_nodes`) was refused."""

    cancel_error: str | None = None
    drain_error: str | None = None


class Standby:
    """A `watchtower.standby` process (or a Slurm step of them) on `node`, waiting for its order.
    `cancel`: what else stops it besides killing `proc`'s process group (Slurm: cancel its step)."""

    def __init__(self, node: str, proc: subprocess.Popen, order_path: Path, name: str,
                 cancel: Callable[[], None] | None = None, tasks: int = 1):
        self.node, self.proc, self.order_path, self.name, self.cancel = node, proc, order_path, name, cancel
        self.tasks = tasks  # processes that import (a Slurm step: one per TP rank), each marking itself ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _ready_files(self) -> list[Path]:
        """Each importing process's marker: ORDER.ready, or ORDER.r<RANK>.ready for a Slurm step's tasks."""
        return list(self.order_path.parent.glob(f"{self.order_path.name}*{READY_SUFFIX}"))

    def ready(self) -> bool:
        """Its imports are done (every task's, on a Slurm step)."""
        return len(self._ready_files()) >= self.tasks

    def give(self, spec: GroupSpec) -> bool:
        """Hand it the group `spec` (`watchtower train --config`, its log): from now on this process is
        that group's. Returns whether its imports had finished (read first: a standby removes its
        marker once it has read its order)."""
        ready = self.ready()
        write_atomic(self.order_path, json.dumps({"argv": ["train", "--config", str(spec.config_path)],
                                                  "log": str(spec.log_path)}))
        return ready

    def stop(self) -> None:
        """Kill an unused standby and remove the files it had (its order file never existed)."""
        try:
            if self.cancel is not None:
                self.cancel()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=KILL_WAIT_S)
            for ready in self._ready_files():
                ready.unlink(missing_ok=True)


class Standbys:
    """One standby per node the supervisor names free (`keep`); `take` hands a node's to a launch.

    A standby that dies without an order (its imports failed, its node's memory ran out) is not
    started again on that node: the launch there goes cold, as without standbys, and a warning
    names its log. Called from the supervisor's loop thread only (the orphan guard ties a standby to
    the thread that started it). Costs a poll() per standby per call.
    """

    def __init__(self, start: Callable[[str, str], Standby]):
        self._start = start
        self._by_node: dict[str, Standby] = {}
        self._broken: set[str] = set()
        self._seq = itertools.count()
        # in every order file's name: a job resumed in the same directory (a new supervisor, its
        # count from 0 again) must never hand its standby an order an earlier run left there
        self._run = uuid.uuid4().hex[:12]

    def keep(self, nodes: Iterable[str], start_new: bool = True) -> None:
        """Stop the standbys of nodes not in `nodes`; with `start_new`, start one where a node has none,
        one at a time: a new one only once every other has finished its imports, so standbys never
        import side by side on cores the groups step on."""
        wanted = list(dict.fromkeys(nodes))
        for node, standby in list(self._by_node.items()):
            if node not in wanted or not standby.alive():
                del self._by_node[node]
                if node in wanted:  # died with no order
                    self._broken.add(node)
                    log.warning("the standby on %s exited (%s) before it was used: launches there start cold "
                                "(its output: %s)", node, standby.proc.poll(),
                                standby.order_path.parent / "standby.log")
                self._stop(standby)
        if not start_new or not all(s.ready() for s in self._by_node.values()):
            return
        for node in wanted:
            if node not in self._by_node and node not in self._broken:
                self._by_node[node] = self._start(node, f"{self._run}-{next(self._seq):04d}")
                return

    def take(self, node: str) -> Standby | None:
        """The node's standby, alive, now no longer ours to stop; None: launch cold."""
        standby = self._by_node.pop(node, None)
        if standby is not None and not standby.alive():
            self._broken.add(node)
            self._stop(standby)
            return None
        return standby

    def stop_all(self) -> None:
        for node in list(self._by_node):
            self._stop(self._by_node.pop(node))

    def nodes(self) -> list[str]:
        return sorted(self._by_node)

    @staticmethod
    def _stop(standby: Standby) -> None:
        try:
            standby.stop()
        except Exception as err:  # noqa: BLE001 - a failed cancel (Slurm) must not stop the supervisor
            log.warning("stopping the standby on %s: %s", standby.node, err)


def standby_argv(order_path: Path) -> list[str]:
    return [sys.executable, "-m", "watchtower.standby", str(order_path)]


class Launcher(Protocol):
    # where groups and Prometheus reach this process (the Lighthouse, the supervisor's /metrics);
    # None: where it binds (this machine's slots reach it on loopback)
    head_address: str | None

    def launch(self, spec: GroupSpec) -> GroupProcess: ...

    def keep_warm(self, nodes: Iterable[str], start_new: bool = True) -> None:
        """Keep a standby (`watchtower.standby`) on each of `nodes` and on no other (new ones only with
        `start_new`): the supervisor names its free nodes, so a group launched on one starts without an
        interpreter's start."""
        ...

    def node_cache_dir(self, node: str) -> Path: ...

    def down_nodes(self) -> frozenset[str]: ...

    def run_on_node(self, node: str, argv: list[str], timeout_s: float,
                    cancel: threading.Event | None = None) -> tuple[int | None, str]:
        """Run a short command ON `node` (the health gate's checks) with `node_env` in its environment:
        (its exit code, or None if it ran past `timeout_s` or `cancel` was set, and was killed; its
        output's tail). Blocks the calling thread up to about `timeout_s`; leaves no process of the
        command behind."""
        ...

    def node_failed(self, node: str, cause: str, step: int) -> NodeCleanup:
        """The policy drained `node` after `cause` at job step `step`: the launcher's own part (Slurm:
        cancel our steps there, drain it in Slurm). Returns what of that part failed, each on its own."""
        ...

    def finish(self) -> None:
        """The supervisor exits: wait (bounded) for what the launcher still does in the background
        (Slurm: a cut health check's step cancel)."""
        ...


class LocalLauncher:
    """Nodes are slots on this machine. Node NAME's local disk is `nodes_dir/NAME/`: its data cache
    lives there, so two nodes never share staged files, as on a real cluster."""

    head_address = None

    def __init__(self, nodes_dir: Path):
        self.nodes_dir = Path(nodes_dir)
        self.standbys = Standbys(self._start_standby)

    def node_cache_dir(self, node: str) -> Path:
        return self.nodes_dir / node / "cache"

    def down_nodes(self) -> frozenset[str]:
        return frozenset()  # slots of this machine: never unreachable while the supervisor runs

    def node_failed(self, node: str, cause: str, step: int) -> NodeCleanup:
        return NodeCleanup()  # a slot has nothing to cancel or drain beyond what the policy does

    def finish(self) -> None:
        self.standbys.stop_all()  # a cut local check is killed in its own thread: nothing else runs

    def keep_warm(self, nodes: Iterable[str], start_new: bool = True) -> None:
        self.standbys.keep(nodes, start_new)

    def _group_env(self) -> dict[str, str]:
        # slots share this machine's cores: one thread per rank, not one pool per rank
        return {**os.environ, "OMP_NUM_THREADS": "1", **direct_peers(os.environ, [socket.gethostname()])}

    def _start_standby(self, node: str, name: str) -> Standby:
        where = self.nodes_dir / node
        where.mkdir(parents=True, exist_ok=True)
        order = where / f"standby-{name}.order"
        with open(where / "standby.log", "ab") as out:
            proc = subprocess.Popen(guarded(standby_argv(order)), env=self._group_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return Standby(node, proc, order, f"standby-{name}")

    def run_on_node(self, node: str, argv: list[str], timeout_s: float,
                    cancel: threading.Event | None = None) -> tuple[int | None, str]:
        """A local subprocess with the node's environment (its name and its cache dir)."""
        return run_bounded(argv, {**os.environ, **node_env(node, self.node_cache_dir(node))}, timeout_s, cancel)

    def launch(self, spec: GroupSpec) -> GroupProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        standby = self.standbys.take(spec.node)
        if standby is not None:
            return GroupProcess(spec, standby.proc, warm=True, standby_ready=standby.give(spec))
        argv = guarded([sys.executable, "-m", "watchtower.cli", "train", "--config", str(spec.config_path)])
        with open(spec.log_path, "ab") as out:
            proc = subprocess.Popen(argv, env=self._group_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return GroupProcess(spec, proc)
