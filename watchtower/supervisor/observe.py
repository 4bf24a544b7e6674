"""Observe: what the supervisor sees of its groups each poll, folded into the policy's `View`.

Per group: whether its process has exited (and how), and from its rank 0's /metrics its step,
heartbeat, last progress report (staging, init, resume, healing), role (active, spare, starting),
whether it is waiting on peers, and its time counters (step, data wait, checkpoint save, collective
wait: the rank-side half of the goodput split). Besides groups: drain requests (files
`drain/<name>`), nodes the launcher reports down, and the Lighthouse's health.

Each observation runs on its own in `errors.guard(stage)`: a rank's port answering with an HTML page,
an endpoint file half written, an unreadable drain directory are counted and leave the last good
values in place. Staleness is the policy's to judge; nothing here decides. Scrapes go through a
proxy-free opener (`get_direct`): an `http_proxy` in the environment must not turn loopback scrapes
into "every group is silent". Cost per poll: one `waitpid` per group; every SCRAPE_INTERVAL_S one
HTTP GET per group (1 s timeout) and a parse of its ~100 samples; one listdir; one Lighthouse probe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from watchtower.direct_http import get_direct
from watchtower.supervisor.contract import endpoint_file
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.goodput import RankTimes
from watchtower.supervisor.launcher import GroupProcess, Launcher
from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.policy_types import GroupState, GroupView, LighthouseHealth, Role, View

SCRAPE_INTERVAL_S = 0.5
SCRAPE_TIMEOUT_S = 1.0
RANK_TIMES = ("watchtower_step_seconds_total", "watchtower_data_wait_seconds_total",  # RankTimes' fields, in order
              "watchtower_checkpoint_save_seconds_total", "watchtower_collective_wait_seconds_total")


@dataclass
class Group:
    """One launched group as last observed; owned and mutated by the supervisor's loop only."""

    process: GroupProcess
    launched_at: float
    ports: list[int] = field(default_factory=list)  # each rank's /metrics port, once it has written it
    step: int = 0
    heartbeat: float | None = None
    progress_at: float | None = None
    participating: bool | None = None  # None: torchft has not placed it yet
    participants: int = 0
    in_collective: bool = False
    times: RankTimes = RankTimes()  # rank 0's step, data-wait, checkpoint and collective seconds (goodput)
    spike_step: int | None = None  # step of the last critical loss spike rank 0's detector reported
    critical_spikes: float = 0.0
    exit_code: int | None = None
    reported: bool = False  # its exit has been shown to the policy: it leaves the view
    last_metrics: bytes = b""  # rank 0's last /metrics body, kept for an incident directory
    last_metrics_at: float = 0.0

    @property
    def replica_id(self) -> str:
        return self.process.spec.replica_id

    @property
    def node(self) -> str:
        return self.process.spec.node

    @property
    def replica_group(self) -> int:
        return self.process.spec.replica_group

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def view(self) -> GroupView:
        role = {True: Role.ACTIVE, False: Role.SPARE, None: Role.STARTING}[self.participating]
        state = GroupState.RUNNING if self.running else GroupState.EXITED
        return GroupView(self.replica_id, self.node, self.launched_at, state, self.exit_code, role, self.step,
                         self.heartbeat, self.progress_at, self.in_collective, self.spike_step)


def metric_values(body: bytes) -> dict[str, float]:
    """Sample name → value of a rank's /metrics (labels dropped: rank 0 has one series of each we read).
    A body that is not a Watchtower rank's exposition raises ValueError.

    >>> metric_values(b"watchtower_train_step 7\\nwatchtower_replica_participating 1\\n")["watchtower_train_step"]
    7
    >>> metric_values(b"<html><body>Welcome</body></html>")
    Traceback (most recent call last):
    ...
    ValueError: invalid metric name:<html><body>Welcome</body></html>
    """
    values = {s.name: s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    if "watchtower_train_step" not in values:
        raise ValueError("not a Watchtower rank's /metrics: no watchtower_train_step")
    return values


def critical_spikes(body: bytes) -> tuple[float, int | None]:
    """(critical loss-spike events, the loss-spike detector's last event step) of a rank's /metrics.

    >>> critical_spikes(b'watchtower_detector_events_total{detector="loss_spike",severity="critical"} 1\\n'
    ...                 b'watchtower_detector_last_event_step{detector="loss_spike"} 120\\n')
    (1, 120)
    """
    count, step = 0.0, None
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.labels.get("detector") != "loss_spike":
                continue
            if s.name == "watchtower_detector_events_total" and s.labels.get("severity") == "critical":
                count = s.value
            elif s.name == "watchtower_detector_last_event_step":
                step = int(s.value)
    return count, step


class Observer:
    """Builds each poll's `View`; `tp` is the ranks per group (an endpoint file per rank), `last_step`
    the trainer's train.steps."""

    def __init__(self, out: Path, tp: int, last_step: int, errors: StageErrors):
        self.out, self.tp, self.last_step, self.errors = out, tp, last_step, errors
        self.drain_dir = out / "drain"
        self._last_scrape = 0.0
        self.lighthouse_up = True
        self.down_nodes: frozenset[str] = frozenset()  # the launcher's last answer (nodes down for good)

    def observe(self, groups: list[Group], lighthouse: Lighthouse | None, launcher: Launcher, now: float) -> View:
        for g in groups:
            if g.running:
                with self.errors.guard("exits"):
                    g.exit_code = g.process.poll()
                    if g.exit_code == 0:  # it finished the last step, whatever the last scrape saw
                        g.step = self.last_step
        if now - self._last_scrape >= SCRAPE_INTERVAL_S:
            self._last_scrape = now
            for g in groups:
                if g.running:
                    with self.errors.guard("scrape"):
                        self.scrape(g)
        drains: tuple[str, ...] = ()
        with self.errors.guard("drain"):
            drains = tuple(sorted(os.listdir(self.drain_dir))) if self.drain_dir.is_dir() else ()
        with self.errors.guard("exits"):  # a failed query keeps the last answer: a DOWN node never reads free
            self.down_nodes = launcher.down_nodes()
        if lighthouse is not None:
            with self.errors.guard("lighthouse"):
                self.lighthouse_up = lighthouse.up()
        health = LighthouseHealth.UP if self.lighthouse_up or lighthouse is None else LighthouseHealth.DOWN
        return View(now, tuple(g.view() for g in groups if not g.reported), drains, self.down_nodes, health)

    def endpoints(self, g: Group) -> list[int]:
        """Each rank's real /metrics port, from the file the rank writes once it serves."""
        group_dir = g.process.spec.config_path.parent
        ports = [int(json.loads(endpoint_file(group_dir, rank).read_text())["port"])
                 for rank in range(self.tp) if endpoint_file(group_dir, rank).exists()]
        if len(ports) == self.tp:
            g.ports = ports
        return g.ports

    def scrape(self, g: Group) -> None:
        """Rank 0's step, heartbeat, progress, role and whether it waits on peers."""
        ports = self.endpoints(g)
        if not ports:
            return  # not serving yet: its launch time and startup grace speak for it
        body = get_direct(f"http://{g.process.address}:{ports[0]}/metrics", SCRAPE_TIMEOUT_S)
        values = metric_values(body)
        g.last_metrics, g.last_metrics_at = body, time.time()
        g.step = int(values["watchtower_train_step"])
        g.heartbeat = values.get("watchtower_heartbeat_timestamp_seconds", g.heartbeat)
        g.progress_at = values.get("watchtower_progress_timestamp_seconds", g.progress_at)
        g.in_collective = values.get("watchtower_replica_in_collective", 0) == 1
        g.times = RankTimes(*(values.get(name, 0.0) for name in RANK_TIMES))
        count, step = critical_spikes(body)
        if count > g.critical_spikes:  # a new critical spike: the detector's last event is it
            g.spike_step, g.critical_spikes = step, count
        if "watchtower_replica_participating" in values:
            g.participating = values["watchtower_replica_participating"] == 1
            g.participants = int(values.get("watchtower_replica_participants", 0))
