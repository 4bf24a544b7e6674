"""What a hung rank answers its supervisor with, on one signal: its stacks and its last collectives.

The supervisor reads a hung rank with py-spy first (no cooperation needed), then sends STACK_SIGNAL:
  - faulthandler writes every thread's stack to `stacks-r<rank>.txt` from the signal handler itself,
    in C, so a rank blocked in a collective or in C code answers (py-spy's fallback where ptrace is
    not allowed);
  - it then chains to Python's own C-level handler, which writes the signal number to the wakeup
    fd; a daemon thread reading it dumps torch's flight recorder (the last collectives of every
    process group, Gloo and NCCL alike: op, sequence number, sizes, state) to `flight-r<rank>.json`.
    That thread needs the GIL, which a rank blocked in a collective or a sleep has released; a rank
    spinning in Python while holding it gives stacks but no flight record.
The flight recorder only records when TORCH_FR_BUFFER_SIZE is set before the first process group:
`install` sets it (FR_ENTRIES, a user's own value kept). Cost: a ring buffer of that many small
entries per process group and a record per collective (microseconds), one open file, one thread
blocked on a socket. Only the main thread can own signal handlers: elsewhere (a trainer built on a
worker thread in a test) nothing is installed.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

from watchtower.atomic_write import write_atomic
from watchtower.supervisor.contract import STACK_SIGNAL, flight_file, stack_file

FR_ENTRIES = 2000


def install(group_dir: Path, rank: int) -> Callable[[], None]:
    """Arm the dumps for this rank; returns the function that disarms them (idempotent)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FR_ENTRIES))  # read when a process group is made
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    stacks = open(stack_file(group_dir, rank), "a")
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    signal.signal(STACK_SIGNAL, lambda signum, frame: None)  # Python's C handler: it feeds the wakeup fd
    previous_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True, chain=True)
    threading.Thread(target=_dump_on_signal, args=(wake_read, flight_file(group_dir, rank)), name="hang-dump",
                     daemon=True).start()
    done = []

    def uninstall() -> None:
        if done:
            return
        done.append(True)
        faulthandler.unregister(STACK_SIGNAL)
        signal.set_wakeup_fd(previous_fd)
        signal.signal(STACK_SIGNAL, signal.SIG_DFL)
        wake_write.close()  # the thread's recv returns b"": it ends
        stacks.close()

    return uninstall


def _dump_on_signal(wake: socket.socket, out: Path) -> None:
    with wake:
        while data := wake.recv(64):
            if STACK_SIGNAL in data:
                write_atomic(out, flight_record())


def flight_record() -> str:
    """torch's flight recorder as JSON text (its own format), or {"error": ...} without one."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        return _dump_fr_trace_json().decode()
    except Exception as err:  # noqa: BLE001 - no distributed build, no recorder: say so in the file
        return json.dumps({"error": f"{type(err).__name__}: {err}"})
