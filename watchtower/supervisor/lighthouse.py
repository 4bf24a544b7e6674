"""torchft's Lighthouse, the quorum server, run inside the supervisor and watched every poll.

`torchft.coordination.LighthouseServer` binds `lighthouse_bind` (port 0: the kernel picks a free
port, which is read back, so there is no free-port race) and serves its gRPC and HTTP endpoints from
Rust threads of this process. A restart binds the same port again: the groups know the Lighthouse by
the address in their launch config, so it must not move.

torchft imports torch, so it is imported here, when the Lighthouse starts, never when the
supervisor's modules are imported. The health probe is one HTTP GET of `/status` (an HTML page of
the quorum) per poll through a proxy-free opener: about a millisecond on loopback.
"""

from __future__ import annotations

import errno
import logging
import os
import urllib.error
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

from watchtower.direct_http import get_direct

log = logging.getLogger("watchtower.supervisor")

PROBE_TIMEOUT_S = 1.0
SLOW_PROBES_DOWN = 3  # a loaded machine may miss one probe; a refused connection is down at once
# How often the Lighthouse re-checks a quorum it is waiting on. The dead group's heartbeat expiring
# forms no quorum by itself: the next tick does, so a tick adds up to its period to every failure's
# stall. A tick is a lock and a scan of a few replicas' heartbeats.
QUORUM_TICK_MS = 50
WILDCARDS = ("0.0.0.0", "::", "[::]")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def bind_and_advertise(bind: str, head_address: str | None) -> tuple[str, str | None]:
    """Where the Lighthouse listens and the host its URL names. Groups on other machines (a launcher
    with a `head_address`) cannot reach a loopback bind (the default), so it listens on every
    interface and is advertised by the head's address; any other bind is kept as given.

    >>> bind_and_advertise("127.0.0.1:0", "10.0.0.5"), bind_and_advertise("127.0.0.1:0", None)
    (('0.0.0.0:0', '10.0.0.5'), ('127.0.0.1:0', None))
    >>> bind_and_advertise("10.0.0.9:29510", "10.0.0.5")
    ('10.0.0.9:29510', '10.0.0.5')
    """
    host, _, port = bind.rpartition(":")
    if head_address is not None and host in LOOPBACK:
        return f"0.0.0.0:{port}", head_address
    return bind, head_address


@contextmanager
def _quiet_rust_log() -> Iterator[None]:
    """torchft's Rust side logs every quorum tick at INFO to this process's stderr, and reads
    RUST_LOG once, when torchft is first imported; keep it at warnings unless the user chose a level.
    Restored at once, so the groups launched later inherit the user's environment unchanged."""
    chosen = os.environ.get("RUST_LOG")
    if chosen is None:
        os.environ["RUST_LOG"] = "warn"
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop("RUST_LOG", None)


def import_lighthouse() -> None:
    """Import torchft's Lighthouse now (2-4 s: it imports torch), so a caller can keep that out of a
    clock it starts next; RUST_LOG is read on this first import (_quiet_rust_log)."""
    with _quiet_rust_log():
        import torchft.coordination  # noqa: F401


class Lighthouse:
    """min_replicas: groups needed before the first quorum (the active groups, so nobody starts
    alone). heartbeat_timeout_ms: how long a silent replica still counts as alive — after a group dies,
    the survivors' next quorum forms once its last heartbeat is this old (the next quorum tick), so it
    sets the stall every healthy group pays per failure. join_timeout_ms: when a quorum cannot form at
    once (not every member of the last one has asked again), how long it waits for replicas that
    heartbeat but have not asked, counted from the earliest asker; then it forms without them. A
    group left out waits at the Lighthouse and asks again at once, so with steps longer than the join
    timeout one late group starts a rotation: every quorum leaves one healthy group out, which heals
    from a peer at the next (torchft 0.2). Keep it above the longest step plus a checkpoint save, and
    below the groups' quorum timeout (ft_timeout_s), which would otherwise fail the askers first.
    `url` is what groups are given: its host is `advertise` when the bind is a wildcard (else the host
    torchft reports), or the bind's own host."""

    def __init__(self, bind: str, min_replicas: int, heartbeat_timeout_ms: int, join_timeout_ms: int, *,
                 advertise: str | None = None):
        self.host, _, port = bind.rpartition(":")
        self.port = int(port)
        self.advertise = advertise
        self.min_replicas, self.heartbeat_timeout_ms = min_replicas, heartbeat_timeout_ms
        self.join_timeout_ms = join_timeout_ms
        self.url = ""
        self._server = None
        self._slow_probes = 0
        self.start()

    def start(self) -> None:
        with _quiet_rust_log():
            from torchft.coordination import LighthouseServer  # imports torch: only where it is started

            self._server = LighthouseServer(bind=f"{self.host}:{self.port}", min_replicas=self.min_replicas,
                                            join_timeout_ms=self.join_timeout_ms,
                                            quorum_tick_ms=QUORUM_TICK_MS,
                                            heartbeat_timeout_ms=self.heartbeat_timeout_ms)
        address = urlsplit(self._server.address())  # http://HOSTNAME:PORT
        self.port = address.port  # kept: a restart binds the same port
        host = (self.advertise or address.hostname) if self.host in WILDCARDS else self.host
        self.url = f"http://{host}:{self.port}"
        self._slow_probes = 0
        log.info("lighthouse listening on %s", self.url)

    def up(self) -> bool:
        """One probe of /status. False when the port refuses (it is gone) or after SLOW_PROBES_DOWN
        probes in a row fail otherwise (a timeout on a loaded machine is not yet an outage)."""
        try:
            get_direct(f"{self.url}/status", PROBE_TIMEOUT_S)
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, OSError) and reason.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                return False
            self._slow_probes += 1
            return self._slow_probes < SLOW_PROBES_DOWN
        self._slow_probes = 0
        return True

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()

    def restart(self) -> None:
        """Stop what is left of it and listen again on the same port."""
        self.stop()
        self.start()
