"""`[supervisor]` of the job file: how patient the supervisor is (hangs, crash loops, the failure
budget), where the Lighthouse and /metrics listen, and how a graceful stop is timed.

Apart from config.py because it is the largest section (every key documented where it is declared)
and the one the loop and graceful_stop.py read; validation only, nothing is started.
"""

from __future__ import annotations

from dataclasses import dataclass

from watchtower.supervisor.failure_budget import FailureBudget
from watchtower.validation import require


@dataclass
class SupervisorSection:
    """heartbeat_timeout_s: no finished step for this long is a hang.
    startup_grace_s: before its first step a group may stay silent this long after its last progress
        report (staging, init, resume, healing each report), and so may a group saving a checkpoint
        (it reports before and after the save); raise it past the slowest single phase.
    crash_loop_limit: the same failure on this many fresh nodes in a row means the program, not the
        nodes, is broken: stop spending spares and page.
    max_failures, failure_window_s: this many failures of any kind (planned drains and Lighthouse
        outages aside) within the window stop the job too, so alternating kinds cannot restart forever.
        Raise max_failures for a cluster whose nodes fail that often by themselves.
    lighthouse_heartbeat_timeout_ms: how fast torchft declares a replica dead; every healthy GPU
        stalls about this long per failure (measured on CPU: 1000 ms → 1.02-1.22 s of stall,
        800 ms → 0.82-0.94 s, README's recovery table). A live group heartbeats every 100 ms from a
        Rust thread of its rank 0 that needs no GIL. Must stay below ft_timeout_s.
    lighthouse_join_timeout_ms: how long a quorum that cannot form at once waits for groups that
        heartbeat but have not asked to join (a group saving a checkpoint, a spare still starting).
        Too short, and with steps longer than it one late group starts a rotation in which every
        step leaves a healthy group out to heal from a peer (Lighthouse's docstring); keep it above
        the longest step plus a checkpoint save. It does not lengthen a failure's stall: a dead
        group's heartbeat runs out first. Must stay below ft_timeout_s (the askers' quorum timeout);
        0 (the default) is half of it, so raising ft_timeout_s for long steps raises both.
    lighthouse_bind: where the Lighthouse listens (port 0: the kernel picks one, read back and kept
        across restarts); use the head node's address when groups run on other machines.
    lighthouse_grace_s: after the Lighthouse is seen down (and restarted), group failures for this long
        are its fault: no node is drained, no budget spent. Keep it above ft_timeout_s.
    lighthouse_restart_timeout_s: a Lighthouse that stays down (each restart fails: its port was taken)
        is restarted again 1, 2, 4 ... 30 s apart, one counted failure for the whole outage; down this
        long, the job stops (exit 5). No quorum forms meanwhile, so nothing trains.
    base_port: /metrics of node i's ranks start at base_port + 10·i (a taken port moves up; each rank
        writes where it really serves); the supervisor serves on metrics_bind:metrics_port (0: not at all).
    linger_s: after a stop that needs a person (crash loop, no nodes left) keep /metrics up this long,
        so Prometheus scrapes the reason and the page goes out before the process is gone.
    capture_timeout_s: before a hung group is killed, every rank's Python stack is read into
        `incidents/<id>/` (py-spy, else faulthandler); all ranks together get at most this long, then
        the kill goes ahead whatever was read. 0: no capture (kill at once).
    alertmanager_url: e.g. http://alertmanager:9093. Set, the supervisor posts its own alerts (a group
        failed, spares exhausted, crash loop) straight to Alertmanager's v2 API within a poll, with
        the labels the Prometheus rules use (Alertmanager merges the two); empty: Prometheus only.
        Risk: a second path that pages, so keep the rules and this in step (alert_contract.py).
    stop_grace_s: on SIGUSR1 (Slurm's time-limit warning, `[slurm] stop_warning_s` before the limit)
        every group saves a checkpoint at one agreed step and exits; what still runs this long after
        the signal is killed (0: kill at once, as on SIGTERM). With the Slurm launcher it must end
        before the limit: stop_grace_s + 10 s (config.STOP_KILL_MARGIN_S) <= stop_warning_s.
    stop_lead_s: how far ahead of the groups the agreed step is put (the time for the request to be
        seen); raise it where the job directory is on NFS with attribute caching (acdirmin)."""

    heartbeat_timeout_s: float = 30.0
    startup_grace_s: float = 60.0
    crash_loop_limit: int = 3
    max_failures: int = 6
    failure_window_s: float = 3600.0
    lighthouse_heartbeat_timeout_ms: int = 800
    lighthouse_join_timeout_ms: int = 0  # 0: half of ft_timeout_s (5000 ms by default)
    lighthouse_bind: str = "127.0.0.1:0"
    lighthouse_grace_s: float = 30.0
    ft_timeout_s: float = 10.0
    lighthouse_restart_timeout_s: float = 300.0
    base_port: int = 9400
    metrics_port: int = 9390
    metrics_bind: str = "0.0.0.0"
    poll_interval_s: float = 0.2
    linger_s: float = 60.0
    capture_timeout_s: float = 10.0
    alertmanager_url: str = ""
    stop_grace_s: float = 45.0
    stop_lead_s: float = 1.0

    def __post_init__(self) -> None:
        require(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", self.heartbeat_timeout_s, "must be > 0 seconds")
        require(self.startup_grace_s > 0, "startup_grace_s", self.startup_grace_s, "must be > 0 seconds")
        self.budget()  # validates max_failures, failure_window_s, crash_loop_limit (its keys are ours)
        host, _, port = self.lighthouse_bind.rpartition(":")
        require(bool(host) and port.isdigit() and int(port) <= 65535, "lighthouse_bind", self.lighthouse_bind,
                "must be HOST:PORT, like 127.0.0.1:0 (port 0: any free port)")
        require(self.lighthouse_grace_s > self.ft_timeout_s, "lighthouse_grace_s", self.lighthouse_grace_s,
                f"must be > ft_timeout_s = {self.ft_timeout_s}: the groups' quorum timeouts after an outage "
                "must fall inside it")
        require(bool(self.metrics_bind), "metrics_bind", self.metrics_bind, "must be an address, like 0.0.0.0")
        require(self.ft_timeout_s > 0, "ft_timeout_s", self.ft_timeout_s, "must be > 0 seconds")
        for key, ms in (("lighthouse_heartbeat_timeout_ms", self.lighthouse_heartbeat_timeout_ms),
                        ("lighthouse_join_timeout_ms", self.join_timeout_ms())):
            require(100 <= ms < self.ft_timeout_s * 1000, key, ms,
                    f"must be >= 100 ms and below ft_timeout_s = {self.ft_timeout_s} s: the groups' quorum "
                    "requests time out after ft_timeout_s and a quorum that waits longer fails every survivor"
                    + (" (0: half of ft_timeout_s)" if key == "lighthouse_join_timeout_ms" else ""))
        require(self.lighthouse_restart_timeout_s > 0, "lighthouse_restart_timeout_s",
                self.lighthouse_restart_timeout_s, "must be > 0 seconds")
        require(1024 <= self.base_port <= 65000, "base_port", self.base_port,
                "must be a TCP port in 1024..65000: the supervisor watches every rank through /metrics")
        require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be a TCP port (0: none)")
        require(self.linger_s >= 0, "linger_s", self.linger_s, "must be >= 0 seconds")
        require(0 <= self.capture_timeout_s <= 60, "capture_timeout_s", self.capture_timeout_s,
                "must be 0..60 seconds (0: no stack capture); it delays the kill of a hung group")
        require(not self.alertmanager_url or self.alertmanager_url.startswith(("http://", "https://")),
                "alertmanager_url", self.alertmanager_url, "must be Alertmanager's URL, like http://127.0.0.1:9093 "
                "(empty: no direct alerts)")
        require(self.poll_interval_s > 0, "poll_interval_s", self.poll_interval_s, "must be > 0 seconds")
        require(self.stop_grace_s >= 0, "stop_grace_s", self.stop_grace_s,
                "must be >= 0 seconds (0: no save on SIGUSR1)")
        require(self.stop_lead_s > 0 and (self.stop_grace_s == 0 or self.stop_lead_s < self.stop_grace_s),
                "stop_lead_s", self.stop_lead_s, f"must be > 0 and below stop_grace_s = {self.stop_grace_s}: the "
                "groups must reach the agreed step and save before the deadline")

    def join_timeout_ms(self) -> int:
        """The Lighthouse's join timeout: lighthouse_join_timeout_ms, or half of ft_timeout_s for 0.

        >>> SupervisorSection().join_timeout_ms(), SupervisorSection(lighthouse_join_timeout_ms=2000).join_timeout_ms()
        (5000, 2000)
        """
        return self.lighthouse_join_timeout_ms or int(self.ft_timeout_s * 500)

    def budget(self) -> FailureBudget:
        return FailureBudget(self.max_failures, self.failure_window_s, self.crash_loop_limit)
