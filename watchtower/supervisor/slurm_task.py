"""One task of a replica group's Slurm job step: become TP rank `SLURM_PROCID`, run the trainer.

    python -m watchtower.supervisor.slurm_task --master-addr NODE_ADDR GROUP_DIR/trainer.toml

`srun --ntasks=TP` starts this once per rank on the group's node. It sets what `watchtower train`'s
own launcher would (RANK, LOCAL_RANK, WORLD_SIZE from Slurm; MASTER_ADDR the node's Slurm address;
WATCHTOWER_WORKER so the trainer does not spawn ranks again) and runs
`watchtower train --config GROUP_DIR/trainer.toml`: the launch contract, unchanged.

It stays the trainer's parent to write the rank's exit status to `GROUP_DIR/exit-r<RANK>`: `srun`
exits 0 when a node dies under its step (seen with Slurm 22.05: "Node failure on n3", exit 0), so
the launcher trusts a 0 only with every rank's own 0 beside it (`SlurmStep.poll`). A stop on
request (exit 75) is told to Slurm as 0 (`slurm_exit`) and read back from the exit files. The trainer dies
with this process however the step is killed (`orphan_guard.die_with_parent`, set in the child
before exec: no extra interpreter; this process is single-threaded, so `preexec_fn` is safe).

MASTER_PORT: rank 0 takes a free port on the node and writes it to `GROUP_DIR/master-port` (the
group's directory is on the filesystem every node shares, as the launch config itself is); the other
ranks read it. A new group has a new directory, so a port is never read from an earlier launch.
Costs per rank: one short interpreter start and one idle one (~20 MB) beside the trainer.

A standby step (`--standby ORDER`, see `watchtower.standby`): each task starts its trainer as a
standby at once (torch imported while the node is free), waits for the launcher's ORDER, then does
what a group's task does (its port, then the trainer's order `ORDER.r<RANK>` in place of a new
interpreter) and records the exit the same way: the step has become the group's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from watchtower.atomic_write import write_atomic
from watchtower.launch import WORKER_ENV, free_port
from watchtower.orphan_guard import die_with_parent
from watchtower.standby import ORDER_POLL_S
from watchtower.supervisor.contract import EXIT_STOPPED

PORT_FILE = "master-port"
EXIT_FILE = "exit-r{rank}"
PORT_WAIT_S = 120.0  # rank 0 of the same step starts within seconds; this only ends a broken step
PORT_POLL_S = 0.05


def rank_env(env: Mapping[str, str], master_addr: str, master_port: int | None) -> dict[str, str]:
    """The trainer's rank variables from Slurm's task variables.

    >>> e = rank_env({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"}, "10.0.0.3", 29411)
    >>> [e[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WATCHTOWER_WORKER")]
    ['1', '1', '2', '10.0.0.3', '29411', '1']
    """
    out = {WORKER_ENV: "1", "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"],
           "WORLD_SIZE": env["SLURM_NTASKS"], "MASTER_ADDR": master_addr}
    if master_port is not None:
        out["MASTER_PORT"] = str(master_port)
    return out


def master_port(group_dir: Path, rank: int, world_size: int, master_addr: str) -> int | None:
    """Rank 0 picks and publishes the TP store's port; the others wait for it. None for TP = 1
    (the trainer's torchft store then takes a kernel-picked port itself)."""
    if world_size == 1:
        return None
    path = group_dir / PORT_FILE
    if rank == 0:
        port = free_port(master_addr)
        write_atomic(path, f"{port}\n")
        return port
    deadline = time.monotonic() + PORT_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"slurm_task: rank {rank}: rank 0 never wrote {path}")
        time.sleep(PORT_POLL_S)
    return int(path.read_text())


def exit_status(group_dir: Path, tp: int) -> list[int | None]:
    """Each rank's recorded exit code (None: not written: the rank never ended by itself)."""
    codes: list[int | None] = []
    for rank in range(tp):
        try:
            codes.append(int((group_dir / EXIT_FILE.format(rank=rank)).read_text()))
        except (OSError, ValueError):
            codes.append(None)
    return codes


def standby(order: Path, master_addr: str) -> int:
    """This task as a standby until the group's order comes, then that group's rank (module doc)."""
    env = os.environ
    rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    mine = Path(f"{order}.r{rank}")
    trainer = subprocess.Popen([sys.executable, "-m", "watchtower.standby", str(mine)],
                               env={**env, **rank_env(env, master_addr, None)}, preexec_fn=die_with_parent)
    while not order.exists():
        if trainer.poll() is not None:  # died before it was used: the launcher launches cold there
            return slurm_exit(trainer.returncode)
        time.sleep(ORDER_POLL_S)
    given = json.loads(order.read_text())
    config = Path(given["argv"][given["argv"].index("--config") + 1])
    port = master_port(config.parent, rank, world_size, master_addr)
    extra = {"MASTER_PORT": str(port)} if port is not None else {}
    write_atomic(mine, json.dumps({**given, "env": {**(given.get("env") or {}), **extra}}))
    code = trainer.wait()
    write_atomic(config.parent / EXIT_FILE.format(rank=rank), f"{code}\n")
    return slurm_exit(code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m watchtower.supervisor.slurm_task")
    ap.add_argument("--master-addr", required=True)
    ap.add_argument("--standby", metavar="ORDER", help="wait as a standby for the launcher's order file")
    ap.add_argument("config", nargs="?")
    args = ap.parse_args(argv)
    if args.standby:
        return standby(Path(args.standby), args.master_addr)
    if not args.config:
        ap.error("a launch config (or --standby ORDER) is required")
    group_dir, env = Path(args.config).parent, os.environ
    rank = int(env["SLURM_PROCID"])
    port = master_port(group_dir, rank, int(env["SLURM_NTASKS"]), args.master_addr)
    trainer = subprocess.Popen([sys.executable, "-m", "watchtower.cli", "train", "--config", args.config],
                               env={**env, **rank_env(env, args.master_addr, port)}, preexec_fn=die_with_parent)
    code = trainer.wait()
    write_atomic(group_dir / EXIT_FILE.format(rank=rank), f"{code}\n")
    return slurm_exit(code)


def slurm_exit(code: int) -> int:
    """What this task tells Slurm of the trainer's exit `code`. A stop on request (EXIT_STOPPED) is
    0: the step runs with --kill-on-bad-exit, and after the checkpoint's last gather the TP ranks
    are not in step (each writes its events and fingerprint, closes torchft), so the first rank to
    exit 75 would get its peers terminated mid-write. The exit file keeps the 75 (`SlurmStep.poll`
    reads it). Killed by signal N: 128 + N, as a shell reports it.

    >>> [slurm_exit(c) for c in (0, EXIT_STOPPED, 1, -9)]
    [0, 0, 1, 137]
    """
    if code == EXIT_STOPPED:
        return 0
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
