"""torchft's Lighthouse, the quorum server, run as a child process of the supervisor."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from watchtower.launch import free_port




class Lighthouse:
    """min_replicas: groups needed before the first quorum (the active groups, so nobody starts
    alone); heartbeat_timeout_ms: how long a silent replica stays in the quorum — the stall every
    healthy group pays per failure."""

    def __init__(self, min_replicas: int, heartbeat_timeout_ms: int, log_path: Path, host: str = "127.0.0.1"):
        binary = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "--min_replicas", str(min_replicas), "--quorum_tick_ms", "100", "--join_timeout_ms", "1000",
             "--heartbeat_timeout_ms", str(heartbeat_timeout_ms), "--bind", f"{host}:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_listening(host)

    def _wait_listening(self, host: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torchft_lighthouse exited with {self.proc.returncode}; see its log")
            try:
                socket.create_connection((host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"torchft_lighthouse did not listen on {host}:{self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
