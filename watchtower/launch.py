"""Start the TP ranks of one replica group on this machine (what torchrun would do, minus torchrun).

Each rank is `python -m watchtower.cli <same arguments>` with RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set. If one rank dies the others are stopped (SIGTERM, then SIGKILL after a
grace period) and its exit code is returned: a TP group with a missing rank can only hang. Each rank
is started through `watchtower.orphan_guard`, so a launcher killed outright (by a supervisor that is
itself dying, or the OOM killer) takes its ranks with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from watchtower.orphan_guard import guarded
from watchtower.supervisor.contract import EXIT_STOPPED

WORKER_ENV = "WATCHTOWER_WORKER"


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free now: held open together, so two calls of free_port cannot return the
    same port for two servers (the kernel may hand a just-closed port out again)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def is_worker() -> bool:
    """True inside a launched rank (ours or torchrun's): run the training loop, don't spawn."""
    return os.environ.get(WORKER_ENV) == "1" or "TORCHELASTIC_RUN_ID" in os.environ


def rank_env(rank: int, world_size: int, master_port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = dict(os.environ)
    env.update({WORKER_ENV: "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(threads))})
    env.update(extra or {})
    return env


def stop_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(argv: list[str], world_size: int, extra_env: dict[str, str] | None = None) -> int:
    """Run `watchtower <argv>` as `world_size` ranks; returns 0 or the first failing rank's code.
    EXIT_STOPPED (every rank saved and exits on the supervisor's stop request) is no failure: the
    other ranks are left to finish their part of the save."""
    port = free_port()
    procs = [subprocess.Popen(guarded([sys.executable, "-m", "watchtower.cli", *argv]),
                              env=rank_env(r, world_size, port, extra_env)) for r in range(world_size)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0, EXIT_STOPPED)]
            if failed:
                stop_all(procs)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c in (0, EXIT_STOPPED) for c in codes):  # stopped on request: each rank ends by itself
                return max(codes)
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop_all(procs)
        return 130
