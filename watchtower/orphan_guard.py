"""Children that die with their parent: `python -m watchtower.orphan_guard PARENT_PID -- CMD ...`.

A replica group runs in its own session (so one `killpg` stops all of its ranks and nothing else),
which also means nothing stops it when its supervisor is SIGKILLed or OOM-killed: it would go on
training, unsupervised, writing the job's checkpoints. This wrapper asks the kernel to SIGKILL the
process when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`, kept across `execve`) and then
becomes CMD. The supervisor starts each group's launcher through it, and the launcher each TP rank,
so a supervisor's death takes every rank down at once.

Two details: the signal fires when the parent *thread* that forked ends, so the parent must start
children from a thread that lives as long as they should (the supervisor's loop thread does); and a
parent that died before the guard was set is caught by comparing `getppid()` with PARENT_PID.
Costs one short interpreter start per child (tens of milliseconds), no thread, no polling. Where
prctl does not exist (not Linux) the command runs unguarded, with a warning.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 125  # the parent died before the guard was in place: do not start at all


def guarded(argv: list[str], parent_pid: int | None = None) -> list[str]:
    """`argv` wrapped so that it is SIGKILLed when `parent_pid` (default: this process) dies.

    >>> guarded(["echo", "hi"], parent_pid=42)[-5:]
    ['watchtower.orphan_guard', '42', '--', 'echo', 'hi']
    """
    return [sys.executable, "-m", "watchtower.orphan_guard", str(parent_pid or os.getpid()), "--", *argv]


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent thread ends; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols: libc's prctl, no library search
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m watchtower.orphan_guard PARENT_PID -- CMD [ARG ...]", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    if not die_with_parent():
        print(f"watchtower.orphan_guard: no PR_SET_PDEATHSIG on {sys.platform}; {cmd[0]} is not tied to its "
              "parent", file=sys.stderr)
    elif os.getppid() != parent:
        return EXIT_PARENT_GONE
    os.execvp(cmd[0], cmd)
    return 127  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
