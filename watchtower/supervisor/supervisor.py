"""The supervisor: keeps N replica groups training through node failures, with hot spares.

What it does each poll (every `poll_interval_s`):
  1. notices exits (exit code and the last log lines kept) and drain requests (a file
     `<output>/drain/<node>`); scrapes each group's rank-0 /metrics for its step, heartbeat and
     whether torchft has it participating or sparing; a heartbeat older than `heartbeat_timeout_s`
     is a hang, and the hung group is killed;
  2. classifies each failure: a node fault (the node is drained, the group's work continues on the
     spare torchft promotes by itself within one Lighthouse heartbeat timeout), or a crash loop (the
     same failure again in a group started after the previous one: the program is broken, spares
     would only burn; stop and page);
  3. refills the spare pool on a free node: the new group joins the quorum, heals its weights and
     optimizer state live from a healthy peer, and waits as a spare;
  4. if every group is gone, restarts the job from its last durable checkpoint;
  5. exports its own /metrics, appends to `events.jsonl`, rewrites the Prometheus file_sd targets.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from watchtower.config import TrainConfig
from watchtower.hooks.exporter import Families, serve_metrics
from watchtower.prometheus_config import Target, write_file_sd
from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.launcher import GroupProcess, GroupSpec, Launcher, LocalLauncher
from watchtower.launch import free_port
from watchtower.supervisor.lighthouse import Lighthouse

log = logging.getLogger("watchtower.supervisor")

EXIT_DONE, EXIT_CRASH_LOOP, EXIT_NO_NODES = 0, 3, 4
SCRAPE_INTERVAL_S = 0.5


@dataclass
class Group:
    process: GroupProcess
    launched_at: float
    ports: list[int]
    step: int = 0
    heartbeat: float | None = None
    participating: bool | None = None
    participants: int = 0
    in_collective: bool = False
    exited: int | None = None

    @property
    def replica_id(self) -> str:
        return self.process.spec.replica_id

    @property
    def node(self) -> str:
        return self.process.spec.node


@dataclass
class Failure:
    at: float
    replica_id: str
    node: str
    reason: str  # exit | hang | drained
    exit_code: int | None
    step: int
    repeat: bool  # same failure as the previous one, in a group started after it
    log_tail: list[str] = field(default_factory=list)

    @property
    def signature(self) -> tuple:
        return self.reason, self.exit_code


class Supervisor:
    def __init__(self, job: JobConfig, trainer: TrainConfig, job_path: str, launcher: Launcher | None = None):
        self.job, self.trainer, self.job_path = job, trainer, job_path
        self.cfg = job.supervisor
        self.out = job.job.output_path
        self.launcher = launcher or LocalLauncher(self.out / "nodes")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "drain").mkdir(exist_ok=True)
        self.events = EventLog(self.out / "events.jsonl")
        usable = [n for n in job.cluster.nodes if n not in job.cluster.exclude]
        self.nodes = {n: ("free" if n in usable else "drained") for n in job.cluster.nodes}
        self.node_index = {n: i for i, n in enumerate(job.cluster.nodes)}
        self.groups: dict[str, Group] = {}
        self.failures: list[Failure] = []
        self.restarts = {"spare": 0, "checkpoint": 0}
        self.failure_counts = {"exit": 0, "hang": 0, "drained": 0}
        self.seq = 0
        self.started = time.time()
        self.productive_s = 0.0
        self.job_step = 0
        self.recovery_s: float | None = None
        self._recovering_since: float | None = None
        self._step_at_failure = 0
        self._refill_since: float | None = None
        self._refill_group: str | None = None
        self.crash_loop = False
        self.done = False
        self._last_scrape = 0.0
        self.lighthouse: Lighthouse | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server = None
        self.metrics_port: int | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        c = self.job.cluster
        self.lighthouse = Lighthouse(c.active_groups, self.cfg.lighthouse_heartbeat_timeout_ms, self.out / "lighthouse.log")
        if self.cfg.metrics_port:
            self._server, self.metrics_port = serve_metrics(self.registry, self.cfg.metrics_port, "0.0.0.0")
        self.events.emit("job_started", f"{c.active_groups} active + {c.spare_groups} spare groups on "
                         f"{len(c.nodes)} nodes; lighthouse {self.lighthouse.url}", lighthouse=self.lighthouse.url)
        for _ in range(c.active_groups + c.spare_groups):
            if not self._launch_group("initial"):
                return self._stop(EXIT_NO_NODES, "not enough free nodes to start the job")
        while True:
            code = self._poll()
            self._write_targets()
            if code is not None:
                if code != EXIT_DONE and self._server is not None:
                    self._kill_live()
                    self._write_targets()
                    time.sleep(self.cfg.linger_s)  # the crash-loop / no-nodes gauges must reach a scrape
                return code
            time.sleep(self.cfg.poll_interval_s)

    @staticmethod
    def _kill(g: Group) -> None:
        g.process.kill()
        g.exited = -9

    def _kill_live(self) -> None:
        for g in self.live():
            self._kill(g)

    def shutdown(self) -> None:
        self._kill_live()
        if self.lighthouse:
            self.lighthouse.stop()
            self.lighthouse = None
        if self._server is not None:
            write_file_sd(self.out / "supervisor_targets.json", [])  # a stopped supervisor is not "down"
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.events.close()

    # ---- one poll -----------------------------------------------------------------------------

    def live(self) -> list[Group]:
        return [g for g in self.groups.values() if g.exited is None]

    def _poll(self) -> int | None:
        now = time.time()
        for g in self.live():
            code = g.process.poll()
            if code is not None:
                g.exited = code
                if code == 0:
                    self.done = True
                    self.job_step = max(self.job_step, self.trainer.train.steps)
                    self.events.emit("group_finished", f"{g.replica_id} on {g.node} reached the last step",
                                     replica_id=g.replica_id, node=g.node)
                else:
                    self._fail(g, "exit", code)
            elif (self.out / "drain" / g.node).exists():
                self._kill(g)
                self._fail(g, "drained", None)
        if now - self._last_scrape >= SCRAPE_INTERVAL_S:
            step_before, since = self.job_step, now - self._last_scrape
            self._last_scrape = now
            for g in self.live():
                self._scrape(g)
            self._check_hangs(now)
            if self.job_step > step_before and step_before > 0:
                self.productive_s += min(since, 2 * SCRAPE_INTERVAL_S)  # the job moved in this window
        if self.crash_loop:
            return self._stop(EXIT_CRASH_LOOP, "crash loop: the same failure on fresh nodes; not spending more spares")
        live = self.live()
        if self.done and not live:
            self.events.emit("job_finished", f"all groups finished at step {self.job_step}", step=self.job_step)
            return EXIT_DONE
        if not live and not self.done:
            if not self._restart_from_checkpoint():
                return self._stop(EXIT_NO_NODES, "every group is lost and there are not enough nodes to restart")
        elif not self.done:
            self._refill_spares()
        self._track_recovery(now)
        return None

    def _endpoints(self, g: Group) -> list[int]:
        """Each rank's real /metrics port, from the file the rank writes once it serves."""
        group_dir = g.process.spec.log_path.parent
        ports = []
        for rank in range(self.trainer.train.tp):
            try:
                ports.append(json.loads((group_dir / f"endpoint-r{rank}.json").read_text())["port"])
            except (OSError, ValueError, KeyError):
                return g.ports
        g.ports = ports
        return ports

    def _scrape(self, g: Group) -> None:
        if not self._endpoints(g):
            return
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{g.ports[0]}/metrics", timeout=1) as r:
                text = r.read().decode()
        except OSError:
            return
        values = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                values[s.name] = s.value
        g.step = int(values.get("watchtower_train_step", g.step))
        g.heartbeat = values.get("watchtower_heartbeat_timestamp_seconds", g.heartbeat)
        g.in_collective = values.get("watchtower_replica_in_collective", 0) == 1
        if "watchtower_replica_participating" in values:
            g.participating = values["watchtower_replica_participating"] == 1
            g.participants = int(values.get("watchtower_replica_participants", 0))
        self.job_step = max(self.job_step, g.step)

    def _staleness(self, g: Group, now: float) -> float:
        """Seconds past the allowed silence (negative while fine)."""
        if g.heartbeat is None:
            return now - g.launched_at - self.cfg.startup_grace_s
        return now - max(g.heartbeat, g.launched_at) - self.cfg.heartbeat_timeout_s

    def _check_hangs(self, now: float) -> None:
        """Kill the hung group, not its victims.

        A group stuck in its own code stops finishing steps; so do the healthy groups waiting for it in
        the quorum or the gradient all-reduce. Those report `watchtower_replica_in_collective = 1`
        and are spared. If every stale group is waiting on peers for three timeouts, nobody can be
        blamed: it is a deadlock, and all of them are restarted."""
        stale = [g for g in self.live() if self._staleness(g, now) > 0]
        culprits = [g for g in stale if not g.in_collective]
        if not culprits and stale and all(self._staleness(g, now) > 2 * self.cfg.heartbeat_timeout_s for g in stale):
            culprits = stale
        for g in culprits:
            self._kill(g)
            self._fail(g, "hang", None)

    # ---- failures and recovery -----------------------------------------------------------------

    def _fail(self, g: Group, reason: str, exit_code: int | None) -> None:
        previous = self.failures[-1] if self.failures else None
        repeat = bool(previous and previous.signature == (reason, exit_code) and g.launched_at > previous.at)
        failure = Failure(time.time(), g.replica_id, g.node, reason, exit_code, g.step, repeat, g.process.log_tail())
        self.failures.append(failure)
        self.failure_counts[reason] += 1
        self.nodes[g.node] = "drained"
        streak = 0
        for f in reversed(self.failures):
            if f.signature != failure.signature:
                break
            streak += 1
            if not f.repeat:
                break
        self.events.emit("group_failed", f"{g.replica_id} on {g.node} failed ({reason}"
                         f"{'' if exit_code is None else f', exit code {exit_code}'}) at step {g.step}; node drained",
                         replica_id=g.replica_id, node=g.node, reason=reason, exit_code=exit_code, step=g.step,
                         log_tail=failure.log_tail[-5:])
        if streak >= self.cfg.crash_loop_limit:
            self.crash_loop = True
        if self._recovering_since is None:
            self._recovering_since = failure.at
            self._step_at_failure = self.job_step

    def _refill_spares(self) -> None:
        c = self.job.cluster
        if len(self.live()) < c.active_groups + c.spare_groups:
            replica_id = self._launch_group("spare")
            if replica_id:
                self.restarts["spare"] += 1
                self._refill_since = self._refill_since or time.time()
                self._refill_group = replica_id

    def _restart_from_checkpoint(self) -> bool:
        """Every group is gone: live state is lost. Start the job again from its durable checkpoint.

        A whole-job loss is not the nodes' fault (they failed together), so the nodes drained by this
        incident are given back before relaunching."""
        incident = [f for f in self.failures if f.at >= (self._recovering_since or 0)]
        for f in incident:
            self.nodes[f.node] = "free"
        self.events.emit("restart_from_checkpoint", f"every group is lost at step {self.job_step}; restarting "
                         f"from the last checkpoint in {self.trainer.checkpoint_url}", step=self.job_step)
        self.restarts["checkpoint"] += 1
        c = self.job.cluster
        return all(self._launch_group("restart") for _ in range(c.active_groups + c.spare_groups))

    def _track_recovery(self, now: float) -> None:
        target = self.job.cluster.active_groups
        active = [g for g in self.live() if g.participating]
        if self._recovering_since is not None and active and all(g.participants >= target for g in active) \
                and len(active) >= target and self.job_step > self._step_at_failure:
            self.recovery_s = now - self._recovering_since
            self._recovering_since = None
            self.events.emit("recovered", f"quorum back at {target} groups after {self.recovery_s:.1f}s",
                             seconds=round(self.recovery_s, 3), step=self.job_step)
        newest = self.groups.get(self._refill_group or "")
        if self._refill_since is not None and newest is not None and newest.exited is None \
                and newest.heartbeat is not None and newest.heartbeat > newest.launched_at:
            self.events.emit("spares_refilled", f"spare pool full again after {now - self._refill_since:.1f}s",
                             seconds=round(now - self._refill_since, 3))
            self._refill_since = self._refill_group = None

    def _launch_group(self, why: str) -> str | None:
        failed_on = {n: sum(1 for f in self.failures if f.node == n) for n in self.nodes}
        free = sorted((n for n, state in self.nodes.items() if state == "free"), key=lambda n: failed_on[n])
        if not free:
            self.events.emit("spares_exhausted", f"no free node to start a group ({why})", reason=why)
            return None
        node = free[0]
        seq = self.seq
        self.seq += 1
        replica_id = f"g{seq:04d}"  # torchft ranks groups by id: later groups sort last and start as spares
        base = self.cfg.base_port + 10 * self.node_index[node]
        ports: list[int] = []  # known once each rank has written its endpoint file
        group_dir = self.out / "groups" / replica_id
        argv = ["train", "--config", self.job.job.trainer_config, "--run", self.job.job.name,
                "--output-dir", str(group_dir), "--port", str(base),
                "--checkpoint.dir", self.trainer.checkpoint_url]
        for key, value in self.job.trainer_overrides():
            if key not in ("run.name", "faults.inject"):
                argv += [f"--{key}", str(value)]
        for fault in self.job.job.inject:
            argv += ["--inject", fault]
        env = {"WATCHTOWER_LIGHTHOUSE": self.lighthouse.url, "WATCHTOWER_REPLICA_ID": replica_id,
               "WATCHTOWER_REPLICA_GROUP": str(seq), "WATCHTOWER_ACTIVE_GROUPS": str(self.job.cluster.active_groups),
               "WATCHTOWER_NODE": node, "WATCHTOWER_RUN": self.job.job.name,
               "WATCHTOWER_FT_TIMEOUT_S": str(self.cfg.ft_timeout_s),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1"}
        spec = GroupSpec(replica_id, seq, node, argv, env, group_dir / "group.log")
        group = Group(self.launcher.launch(spec), time.time(), ports)
        self.groups[replica_id] = group
        self.nodes[node] = "busy"
        self.events.emit("group_started", f"{replica_id} started on {node} ({why})", replica_id=replica_id,
                         node=node, reason=why, replica_group=seq, pid=group.process.proc.pid)
        return replica_id

    def _stop(self, code: int, message: str) -> int:
        self.events.emit("job_stopped", message, exit_code=code)
        return code

    # ---- outputs ------------------------------------------------------------------------------

    def _write_targets(self) -> None:
        targets = [Target(f"127.0.0.1:{port}", self.job.job.name, g.process.spec.replica_group, rank, g.node)
                   for g in self.live() for rank, port in enumerate(g.ports)]
        write_file_sd(self.out / "targets.json", targets)
        if self.metrics_port:
            write_file_sd(self.out / "supervisor_targets.json",
                          [Target(f"127.0.0.1:{self.metrics_port}", self.job.job.name, -1, -1, "supervisor")])

    def collect(self):
        """prometheus-client Collector protocol: the supervisor's metrics, read at scrape time."""
        f = Families((self.job.job.name,))
        live = self.live()
        states = {"active": sum(1 for g in live if g.participating),
                  "spare": sum(1 for g in live if g.participating is False),
                  "starting": sum(1 for g in live if g.participating is None)}
        for state, n in states.items():
            f.add("watchtower_supervisor_groups", n, state)
        for state in ("busy", "free", "drained"):
            f.add("watchtower_supervisor_nodes", sum(1 for s in self.nodes.values() if s == state), state)
        f.add("watchtower_supervisor_spares_available", states["spare"])
        f.add("watchtower_supervisor_free_nodes", sum(1 for s in self.nodes.values() if s == "free"))
        for reason, n in self.failure_counts.items():
            f.add("watchtower_supervisor_failures_total", n, reason)
        for kind, n in self.restarts.items():
            f.add("watchtower_supervisor_restarts_total", n, kind)
        f.add("watchtower_supervisor_recovery_seconds", self.recovery_s)
        f.add("watchtower_supervisor_quorum_participants", max((g.participants for g in live if g.participating), default=0))
        f.add("watchtower_supervisor_active_groups_target", self.job.cluster.active_groups)
        f.add("watchtower_supervisor_spare_groups_target", self.job.cluster.spare_groups)
        f.add("watchtower_supervisor_job_step", self.job_step)
        f.add("watchtower_supervisor_goodput_ratio", self.goodput())
        f.add("watchtower_supervisor_crash_loop", int(self.crash_loop))
        f.add("watchtower_supervisor_heartbeat_timestamp_seconds", time.time())
        return list(f.families.values())

    def goodput(self) -> float:
        return min(self.productive_s / max(time.time() - self.started, 1e-9), 1.0)

    def summary(self) -> dict:
        return {"steps": self.job_step, "failures": len(self.failures), "restarts": dict(self.restarts),
                "recovery_seconds": None if self.recovery_s is None else round(self.recovery_s, 2),
                "goodput_ratio": round(self.goodput(), 3), "crash_loop": self.crash_loop}
