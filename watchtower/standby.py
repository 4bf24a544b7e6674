"""A trainer interpreter started before it is needed: torch and the trainer imported, waiting for its order.

    python -m watchtower.standby ORDER_FILE

A refill (a spare started after a group died) spends most of its seconds in the new trainer's own
start, and most of that in imports: torch, torchft and the trainer take ~3.5 s of CPU on the cores
the stepping groups share. A launcher keeps one standby on each free node (`Standbys`); launching a
group there writes the group's command to the standby's order file instead of starting an
interpreter, and the standby becomes that group's process: killing, polling and the group's log are
what they are for a cold start. The order is JSON, written atomically:

    {"argv": ["train", "--config", "GROUP_DIR/trainer.toml"], "env": {...}, "log": "GROUP_DIR/group.log"}

Each order file has a name no other standby of any run uses (`Standbys` puts a random token of its
own in it) and is removed once read, so a job resumed in the same directory never finds an earlier
run's order. `env` is added to the environment (a Slurm task's rank variables); `log`, when given,
takes this process's stdout and stderr. What a standby cannot take from its order is what was fixed
when it started: its interpreter, and environment read at import (OMP_NUM_THREADS): the launcher
starts it with the environment it gives a group. No CUDA context is made before the order: the trainer it
becomes picks its device as a cold one does.

Costs per free node: one idle interpreter (~240 MB resident with a CPU torch build), a stat of the
order file every ORDER_POLL_S (the order is seen within that), nothing else. A standby without an
order lives until its launcher stops it (its node is used, drained or the job ends) or its parent
dies (the launcher starts it through `orphan_guard`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ORDER_POLL_S = 0.05
READY_SUFFIX = ".ready"  # written beside the order file once the imports are done (for tests and logs)


def prepare() -> None:
    """Import what a trainer start imports; torchft only where it is installed (unsupervised runs
    do not need it, and a standby must not fail where a cold start would not)."""
    import torch  # noqa: F401

    import watchtower.cli  # noqa: F401
    import watchtower.trainer.train  # noqa: F401

    try:
        import torchft  # noqa: F401
        from torchft import process_group  # noqa: F401
    except ImportError:
        pass


def wait_for_order(path: Path, poll_s: float = ORDER_POLL_S) -> dict:
    """The order once its file exists (it is renamed into place whole: never read half-written)."""
    while not path.exists():
        time.sleep(poll_s)
    order = json.loads(path.read_text())
    if not isinstance(order, dict) or not isinstance(order.get("argv"), list):
        raise SystemExit(f"watchtower.standby: {path}: not an order (needs an argv list)")
    path.unlink(missing_ok=True)  # taken: never found again (the launcher names each order once, too)
    Path(str(path) + READY_SUFFIX).unlink(missing_ok=True)
    return order


def become(order: dict) -> int:
    """Run the ordered command in this process: its environment, its log, then `watchtower ARGV`."""
    os.environ.update({str(k): str(v) for k, v in (order.get("env") or {}).items()})
    if order.get("log"):
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    from watchtower import cli

    return cli.main([str(a) for a in order["argv"]])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m watchtower.standby ORDER_FILE", file=sys.stderr)
        return 2
    order_path = Path(args[0])
    prepare()
    from watchtower.atomic_write import write_atomic

    write_atomic(str(order_path) + READY_SUFFIX, f"{os.getpid()}\n")
    return become(wait_for_order(order_path))


if __name__ == "__main__":
    sys.exit(main())
