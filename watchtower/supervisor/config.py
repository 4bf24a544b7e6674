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
    health_check = "nvidia-smi -L"          # optional site check, run on a node before a group starts

    [supervisor]
    heartbeat_timeout_s = 30                 # no step for this long: the group is hung
    crash_loop_limit = 3                     # the same failure on this many fresh nodes: stop, page
    max_failures = 6                         # this many failures of any kind within failure_window_s: stop

Each section is a validated dataclass: `[job]` and `[cluster]` here, `[supervisor]` in
supervisor_section.py, `[slurm]` in slurm_section.py, `[remediation]` in policy_types.py.
Validated in full before anything starts, with the trainer config it names (so `train.tp` not
dividing the heads is refused here, not after the Lighthouse is up). This module is torch-free: the
trainer config is validated by `JobConfig.trainer()`, which imports `watchtower.config` (and so
torch) only when called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchtower.supervisor.policy_types import PolicyConfig, RemediationConfig, node_name_problem
from watchtower.supervisor.remediation import checkpoints_problem
from watchtower.supervisor.slurm_section import STOP_KILL_MARGIN_S, SlurmSection
from watchtower.supervisor.supervisor_section import SupervisorSection
from watchtower.toml_dataclasses import build, read_toml, set_dotted
from watchtower.validation import ConfigError, require

if TYPE_CHECKING:  # the trainer's config is only loaded by `JobConfig.trainer()`
    from watchtower.config import TrainConfig


LAUNCHERS = ("local", "slurm")


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


def listed_node_problem(name: str, slurm: bool) -> str | None:
    """Why `name` cannot be an item of cluster.nodes / cluster.exclude, or None. Every name becomes a
    directory name; on Slurm it is also written into the batch script and compared with Slurm's
    names: whitespace would end the #SBATCH block, and a hostlist would be expanded by sbatch but not
    by the launcher. The local launcher's slots are only names (an exclude item must be one of them).

    >>> [listed_node_problem(n, slurm=True) for n in ("gpu-07", "n1 ")]
    [None, 'contains whitespace: one node name per item, as Slurm writes it']
    """
    problem = node_name_problem(name)
    if problem is not None:
        return f"{problem}: node names become directory names"
    if slurm and any(c.isspace() for c in name):
        return "contains whitespace: one node name per item, as Slurm writes it"
    if slurm and set(name) & set("[],"):
        return 'is a Slurm hostlist, which watchtower does not expand: list each node, like ["n3", "n4"]'
    return None


@dataclass
class ClusterSection:
    """nodes: the machines (with the local launcher: slots on this machine) the job may use; with
        launcher = "slurm", Slurm node names of the allocation, or empty: every allocated node.
    active_groups: replica groups that contribute gradients; spare_groups: hot spares on top.
    launcher: "local" (slots on this machine) or "slurm" (one job step per group inside the Slurm
        allocation the supervisor runs in; see `watchtower sbatch` and `[slurm]`).
    exclude: known-bad nodes, drained from the start (slurm: `sbatch --exclude`, and dropped from the
        allocation). Node names only: a Slurm hostlist (`n[3-4]`, `n3,n4`) is refused, so sbatch and
        the launcher read the same names (list each node: ["n3", "n4"])."""

    nodes: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    active_groups: int = 1
    spare_groups: int = 0
    launcher: str = "local"
    # The node health gate (health.py) checks a node before a group starts there; one that fails is
    # out for the job's life, never counted as a failure. health_check: a site command (`/bin/sh -c`
    # on the node; $WATCHTOWER_NODE names it) run after the built-in checks, non-zero exit = unhealthy;
    # leave it out for none. health_check_timeout_s: the whole check of a node; the supervisor's loop
    # waits for it (running groups train on; a stop signal does not wait: the check is killed), so
    # raise it only as far as the site check needs.
    health_check: str | None = None
    health_check_timeout_s: float = 60.0
    health_min_free_bytes: int = 1 << 30  # free in the node's data cache; raise it to the staged size
    health_min_gpu_free_fraction: float = 0.9  # of each GPU's memory, on a CUDA job (a leftover process?)
    # warm_standby: keep a trainer interpreter with torch imported (`watchtower.standby`, ~240 MB of host
    # memory, no GPU memory) on each free node once every group has stepped, so a refill skips the ~3.5 s
    # of CPU its imports cost; false: every launch starts a new interpreter.
    warm_standby: bool = True

    def __post_init__(self) -> None:
        require(self.launcher in LAUNCHERS, "launcher", self.launcher,
                "must be local (slots on this machine) or slurm (job steps in a Slurm allocation)")
        require(len(self.nodes) > 0 or self.launcher == "slurm", "nodes", self.nodes,
                "must list at least one node (with launcher = slurm, leave it empty for the allocation's nodes)")
        for key in ("nodes", "exclude"):  # exclude even without nodes: on Slurm it is written into the batch script
            names = getattr(self, key)
            for i, node in enumerate(names):
                problem = listed_node_problem(node, slurm=self.launcher == "slurm")
                require(problem is None, f"{key}[{i}]", node, problem)
            require(len(set(names)) == len(names), key, names, "must not repeat a node")
        require(self.active_groups >= 1, "active_groups", self.active_groups, "must be >= 1")
        require(self.spare_groups >= 0, "spare_groups", self.spare_groups, "must be >= 0")
        require(self.health_check is None or bool(self.health_check.strip()), "health_check", self.health_check,
                "must be a shell command run on each node before a group starts (leave the key out for none)")
        require(self.health_check_timeout_s > 0, "health_check_timeout_s", self.health_check_timeout_s,
                "must be > 0 seconds")
        require(self.health_min_free_bytes >= 0, "health_min_free_bytes", self.health_min_free_bytes, "must be >= 0")
        require(0 <= self.health_min_gpu_free_fraction <= 1, "health_min_gpu_free_fraction",
                self.health_min_gpu_free_fraction, "must be between 0 and 1")
        if not self.nodes:
            return  # slurm: the allocation's nodes, checked (and this run again) once the launcher reads them
        for i, node in enumerate(self.exclude):
            require(node in self.nodes, f"exclude[{i}]", node, f"is not a known node; cluster.nodes = {self.nodes}")
        require(self.active_groups + self.spare_groups <= len(self.nodes) - len(self.exclude), "active_groups", self.active_groups,
                f"active_groups + spare_groups = {self.active_groups + self.spare_groups} needs that many nodes, "
                f"cluster.nodes has {len(self.nodes) - len(self.exclude)} usable")


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)  # remediation.py: loss spikes

    def __post_init__(self) -> None:
        """On Slurm the graceful stop must end before the time limit's SIGKILL (see stop_grace_s).
        stop_grace_s = 0 with stop_warning_s = 0 asks for neither (no --signal: the limit kills)."""
        warning, grace = self.slurm.stop_warning_s, self.supervisor.stop_grace_s
        if self.cluster.launcher != "slurm" or grace + STOP_KILL_MARGIN_S <= warning or grace == warning == 0:
            return
        least = (f"slurm.stop_warning_s >= supervisor.stop_grace_s + {STOP_KILL_MARGIN_S:g} = "
                 f"{math.ceil(grace + STOP_KILL_MARGIN_S)}")  # the key is an integer
        if warning < STOP_KILL_MARGIN_S:  # no grace fits: the warning is what is wrong (0: at the limit itself)
            other = "or 0: no warning and no graceful stop" if grace == 0 else "or lower supervisor.stop_grace_s"
            raise ConfigError("slurm.stop_warning_s", warning, f"must leave time to stop every group before Slurm's "
                              f"time limit: {least} ({other})")
        raise ConfigError("supervisor.stop_grace_s", grace, f"must end {STOP_KILL_MARGIN_S:g} s before Slurm's time "
                          f"limit: at most slurm.stop_warning_s - {STOP_KILL_MARGIN_S:g} = "
                          f"{warning - STOP_KILL_MARGIN_S:g} (or raise {least})")

    def policy(self) -> PolicyConfig:
        """What the policy needs to know of this job."""
        c, s = self.cluster, self.supervisor
        return PolicyConfig(nodes=tuple(c.nodes), active_groups=c.active_groups, spare_groups=c.spare_groups,
                            exclude=tuple(c.exclude), heartbeat_timeout_s=s.heartbeat_timeout_s,
                            startup_grace_s=s.startup_grace_s, lighthouse_grace_s=s.lighthouse_grace_s,
                            ft_timeout_s=s.ft_timeout_s, lighthouse_restart_timeout_s=s.lighthouse_restart_timeout_s,
                            budget=s.budget(), remediation=self.remediation)

    def trainer_overrides(self) -> list[tuple[str, Any]]:
        pairs = [tuple(item.split("=", 1)) for item in self.job.train_overrides]
        pairs.append(("run.name", self.job.name))
        if not any(key == "checkpoint.dir" for key, _ in pairs):  # the job's own, shared by its groups
            pairs.append(("checkpoint.dir", str(self.job.output_path / "checkpoints")))
        if self.job.inject:
            pairs.append(("faults.inject", list(self.job.inject)))
        return pairs

    def trainer(self) -> TrainConfig:
        """The trainer config every group runs (validated; errors name the job key). Imports no torch
        (tests/test_import_cost.py), unless train.device is cuda."""
        from watchtower.config import load_config

        try:
            return load_config(self.job.trainer_config, self.trainer_overrides())
        except ConfigError as err:
            if err.field == "--config":
                raise ConfigError("job.trainer_config", err.value, err.allowed) from None
            raise ConfigError(f"job.train_overrides: {err.field}", err.value, err.allowed) from None


def load_job(path: str, overrides: list[tuple[str, Any]] = ()) -> tuple[JobConfig, TrainConfig]:
    """Read and validate the job file and the trainer config it names; nothing is started.
    Validating the trainer config imports no torch (its sections are in torch-free modules)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("job file", path, "no such file")
    data = read_toml(file, "job file")
    for key, value in overrides:
        set_dotted(data, key, value)
    job = build(JobConfig, data)
    trainer = job.trainer()
    problem = checkpoints_problem(job.remediation, trainer.checkpoint.interval_steps, trainer.checkpoint.keep_last,
                                  trainer.monitor.loss_spike.patience)
    if problem:
        raise ConfigError("remediation.loss_spike", job.remediation.loss_spike, problem)
    return job, trainer
