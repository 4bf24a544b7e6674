"""The supervised job: which trainer, on which nodes, how many groups and spares, how patient.

    [job]
    name = "demo"
    trainer_config = "tiny"                 # preset or TOML path, as for `watchtower train`
    output_dir = "runs/{name}"
    train_overrides = ["train.steps=300"]   # applied like --train.steps 300
    inject = ["crash@120:group=0"]          # fire drills, as `--inject`

    [cluster]
    nodes = ["node-a", "node-b", "node-c", "node-d"]
    active_groups = 2
    spare_groups = 1

    [supervisor]
    heartbeat_timeout_s = 30                 # no step for this long: the group is hung
    crash_loop_limit = 3                     # the same failure on this many fresh nodes: stop, page

Validated in full before anything starts, with the trainer config it names (so `train.tp` not
dividing the heads is refused here, not after the Lighthouse is up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchtower.config import TrainConfig, build, load_config, read_toml
from watchtower.validation import ConfigError, require


@dataclass
class JobSection:
    name: str = "watchtower"
    trainer_config: str = ""
    output_dir: str = "runs/{name}"
    train_overrides: list[str] = field(default_factory=list)
    inject: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(bool(self.trainer_config), "trainer_config", self.trainer_config,
                "is required: a preset name (tiny, smol-135m) or a TOML path")
        for i, item in enumerate(self.train_overrides):
            require("=" in item, f"train_overrides[{i}]", item, "must look like section.key=value")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))


@dataclass
class ClusterSection:
    """nodes: the machines (with the local launcher: slots on this machine) the job may use.
    active_groups: replica groups that contribute gradients; spare_groups: hot spares on top."""

    nodes: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # known-bad nodes, drained from the start
    active_groups: int = 1
    spare_groups: int = 0
    launcher: str = "local"

    def __post_init__(self) -> None:
        require(len(self.nodes) > 0, "nodes", self.nodes, "must list at least one node")
        require(len(set(self.nodes)) == len(self.nodes), "nodes", self.nodes, "must not repeat a node")
        for i, node in enumerate(self.exclude):
            require(node in self.nodes, f"exclude[{i}]", node, f"is not a known node; cluster.nodes = {self.nodes}")
        require(self.active_groups >= 1, "active_groups", self.active_groups, "must be >= 1")
        require(self.spare_groups >= 0, "spare_groups", self.spare_groups, "must be >= 0")
        require(self.active_groups + self.spare_groups <= len(self.nodes) - len(self.exclude), "active_groups", self.active_groups,
                f"active_groups + spare_groups = {self.active_groups + self.spare_groups} needs that many nodes, "
                f"cluster.nodes has {len(self.nodes) - len(self.exclude)} usable")
        require(self.launcher == "local", "launcher", self.launcher, "must be local (slurm is not built yet)")


@dataclass
class SupervisorSection:
    """heartbeat_timeout_s: no finished step for this long (after startup_grace_s) is a hang.
    crash_loop_limit: the same failure on this many different nodes in a row means the program, not
        the nodes, is broken: stop spending spares and page.
    lighthouse_heartbeat_timeout_ms: how fast torchft declares a replica dead; every healthy GPU
        stalls this long per failure (measured 1 s → ~1.1 s stall).
    base_port: /metrics of node i's ranks start at base_port + 10·i (a taken port moves up; each rank
        writes where it really serves); the supervisor serves on metrics_port (0: not at all).
    linger_s: after a stop that needs a person (crash loop, no nodes left) keep /metrics up this long,
        so Prometheus scrapes the reason and the page goes out before the process is gone."""

    heartbeat_timeout_s: float = 30.0
    startup_grace_s: float = 60.0
    crash_loop_limit: int = 3
    lighthouse_heartbeat_timeout_ms: int = 1000
    ft_timeout_s: float = 10.0
    base_port: int = 9400
    metrics_port: int = 9390
    poll_interval_s: float = 0.2
    linger_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", self.heartbeat_timeout_s, "must be > 0 seconds")
        require(self.startup_grace_s > 0, "startup_grace_s", self.startup_grace_s, "must be > 0 seconds")
        require(self.crash_loop_limit >= 2, "crash_loop_limit", self.crash_loop_limit, "must be >= 2")
        require(self.lighthouse_heartbeat_timeout_ms >= 100, "lighthouse_heartbeat_timeout_ms",
                self.lighthouse_heartbeat_timeout_ms, "must be >= 100 ms")
        require(self.ft_timeout_s > 0, "ft_timeout_s", self.ft_timeout_s, "must be > 0 seconds")
        require(1024 <= self.base_port <= 65000, "base_port", self.base_port,
                "must be a TCP port in 1024..65000: the supervisor watches every rank through /metrics")
        require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be a TCP port (0: none)")
        require(self.linger_s >= 0, "linger_s", self.linger_s, "must be >= 0 seconds")
        require(self.poll_interval_s > 0, "poll_interval_s", self.poll_interval_s, "must be > 0 seconds")


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)

    def trainer_overrides(self) -> list[tuple[str, Any]]:
        pairs = [tuple(item.split("=", 1)) for item in self.job.train_overrides]
        pairs.append(("run.name", self.job.name))
        if not any(key == "checkpoint.dir" for key, _ in pairs):  # the job's own, shared by its groups
            pairs.append(("checkpoint.dir", str(self.job.output_path / "checkpoints")))
        if self.job.inject:
            pairs.append(("faults.inject", list(self.job.inject)))
        return pairs

    def trainer(self) -> TrainConfig:
        """The trainer config every group runs (validated; errors name the job key)."""
        try:
            return load_config(self.job.trainer_config, self.trainer_overrides())
        except ConfigError as err:
            if err.field == "--config":
                raise ConfigError("job.trainer_config", err.value, err.allowed) from None
            raise ConfigError(f"job.train_overrides: {err.field}", err.value, err.allowed) from None


def load_job(path: str, overrides: list[tuple[str, Any]] = ()) -> tuple[JobConfig, TrainConfig]:
    """Read and validate the job file and the trainer config it names; nothing is started."""
    from watchtower.config import set_dotted

    file = Path(path)
    if not file.is_file():
        raise ConfigError("job file", path, "no such file")
    data = read_toml(file, "job file")
    for key, value in overrides:
        set_dotted(data, key, value)
    job = build(JobConfig, data)
    trainer = job.trainer()
    return job, trainer
