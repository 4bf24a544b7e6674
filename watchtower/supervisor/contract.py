"""The launch contract: one file between the supervisor and each group's trainer.

The supervisor writes `groups/<replica_id>/trainer.toml`, the job's fully resolved trainer config
(every section, defaults filled in) with this group's place in the job:

    [run]        output_dir = "<job>/groups/g0003"        (name: the job's)
    [monitor]    port = <the node's base port>
    [checkpoint] dir = "<the job's checkpoint dir>"       (shared by every group)
    [replica]    lighthouse, replica_id, replica_group, active_groups, node, cache_dir, ft_timeout_s,
                 stop_file = "<job>/stop-request.json"

and starts `watchtower train --config <that file>`; nothing else passes between them (no
environment variables of ours, no re-serialised flags), so the file is the whole story of a group,
and a launcher that starts the same command on another machine (Slurm) needs nothing more. The
trainer reads `[replica]` as `TrainConfig.replica`; an empty `lighthouse` means "not supervised":
one group, no torchft.

One file goes the other way while a group runs: the graceful stop. On SIGUSR1 (Slurm's time-limit
warning) the supervisor writes `<job>/stop-request.json` = {"stop_after_step": N} (atomically), and
every trainer, which stats that file once per committed step (`StopRequest`), saves a checkpoint
through its normal path after step N and exits EXIT_STOPPED. The groups must stop at the same step:
torchft commits a step only with every active group, so a group leaving early would block the others
in the next quorum. N is chosen ahead of every group (`stop_step`); a group that sees the request only
after step N ignores it and is killed at the deadline like before (no checkpoint at N, never a
checkpoint of a step the groups did not commit). The supervisor deletes the file before it starts
any group, so a request never outlives its run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from watchtower.atomic_write import write_atomic
from watchtower.supervisor.policy_types import node_name_problem
from watchtower.toml_dataclasses import dump_toml
from watchtower.validation import require

GROUP_CONFIG = "trainer.toml"
STOP_FILE = "stop-request.json"  # in the job directory: the graceful stop's agreed step
EXIT_STOPPED = 75  # a trainer that saved and exited on the stop request (EX_TEMPFAIL: resume later)

log = logging.getLogger("watchtower.contract")

# What each rank leaves in its group directory for the supervisor: where it serves /metrics and its
# pid (`endpoint-r<rank>.json`), and on STACK_SIGNAL its Python stacks (faulthandler, the fallback
# when py-spy cannot read the process) and torch's flight recorder (trainer/hang_dump.py).
# SIGUSR2: neither the trainer, torch nor torchft uses it.
STACK_SIGNAL = signal.SIGUSR2


def endpoint_file(group_dir: Path, rank: int) -> Path:
    return Path(group_dir) / f"endpoint-r{rank}.json"


def stack_file(group_dir: Path, rank: int) -> Path:
    return Path(group_dir) / f"stacks-r{rank}.txt"


def flight_file(group_dir: Path, rank: int) -> Path:
    return Path(group_dir) / f"flight-r{rank}.json"


@dataclass
class ReplicaConfig:
    """Where a group sits in a supervised job (`[replica]`); the supervisor writes it, users rarely do.

    lighthouse: torchft Lighthouse URL; empty: no torchft, this group trains alone.
    replica_id: torchft's id for the group; groups rank in its sort order, so spares get later ids.
    replica_group: the `replica_group` metric label, and what `--inject ...:group=N` matches.
    active_groups: groups that contribute gradients (torchft's min_replica_size); the rest are spares.
    node: the node label on every metric ("" : this host's name).
    cache_dir: the node's local disk for staged data; overrides `data.cache_dir` ("" : keep it).
    ft_timeout_s: torchft's quorum, collective and connect timeouts. A failed peer stalls the
        others at most this long; raise it where a quorum RPC or a heal is slow (large models).
    stop_file: the job's graceful-stop request, checked once per step ("" : none).
    """

    lighthouse: str = ""
    replica_id: str = ""
    replica_group: int = 0
    active_groups: int = 1
    node: str = ""
    cache_dir: str = ""
    ft_timeout_s: float = 10.0
    stop_file: str = ""

    def __post_init__(self) -> None:
        require(not self.lighthouse or self.lighthouse.startswith(("http://", "https://")), "lighthouse",
                self.lighthouse, "must be the Lighthouse's URL, like http://host:29510 (empty: no torchft)")
        require(not self.lighthouse or bool(self.replica_id), "replica_id", self.replica_id,
                "is required with a lighthouse: torchft names each group by it")
        require(self.replica_group >= 0, "replica_group", self.replica_group, "must be >= 0")
        require(self.active_groups >= 1, "active_groups", self.active_groups, "must be >= 1")
        require(not self.node or node_name_problem(self.node) is None, "node", self.node,
                f"{node_name_problem(self.node)}: node names become directory names")
        require(self.ft_timeout_s > 0, "ft_timeout_s", self.ft_timeout_s, "must be > 0 seconds")

    @property
    def supervised(self) -> bool:
        return bool(self.lighthouse)


def group_config(trainer: dict[str, Any], replica: ReplicaConfig, output_dir: Path, port: int,
                 checkpoint_dir: str) -> dict[str, Any]:
    """The resolved trainer config (`TrainConfig.to_dict()`) with one group's place filled in.

    >>> cfg = group_config({"run": {"name": "demo"}, "monitor": {}, "checkpoint": {}},
    ...                    ReplicaConfig("http://h:1", "g0001", 1, 2, "node-b"), Path("out/g0001"), 9410, "ck")
    >>> cfg["run"], cfg["monitor"], cfg["replica"]["replica_id"]
    ({'name': 'demo', 'output_dir': 'out/g0001'}, {'port': 9410}, 'g0001')
    """
    data = copy.deepcopy(trainer)
    data.setdefault("run", {})["output_dir"] = str(output_dir)
    data.setdefault("monitor", {})["port"] = port
    data.setdefault("checkpoint", {})["dir"] = checkpoint_dir
    data["replica"] = asdict(replica)
    return data


def write_group_config(group_dir: Path, config: dict[str, Any]) -> Path:
    """Write the group's trainer.toml (atomically, 0644) and return its path."""
    path = Path(group_dir) / GROUP_CONFIG
    write_atomic(path, dump_toml(config))
    return path


# ---- the graceful stop -------------------------------------------------------------------------------


def stop_request_file(job_dir: Path) -> Path:
    return Path(job_dir) / STOP_FILE


def write_stop_request(job_dir: Path, step: int) -> Path:
    """Ask every group to save after `step` and exit (atomic: a trainer never reads half of it)."""
    path = stop_request_file(job_dir)
    write_atomic(path, json.dumps({"stop_after_step": step}) + "\n")
    return path


def stop_step(job_step: int, step_s: float | None, lead_s: float) -> int:
    """The step every group stops after: one no group can have passed when the request becomes visible.

    Groups check the request after each committed step and run in lockstep (each commit needs every
    active group), so when the file appears each group sees it within one step of the fastest one.
    Stopping after `job_step + 1 + ceil(lead_s / step_s)` leaves `lead_s` (scrape, write, a shared
    filesystem's attribute cache) plus one step of room; `step_s` unknown: two steps.

    >>> stop_step(100, None, 1.0), stop_step(100, 5.0, 1.0), stop_step(100, 0.05, 1.0)
    (102, 102, 121)
    """
    return job_step + 1 + (math.ceil(lead_s / step_s) if step_s else 1)


class StopRequest:
    """The trainer's side: `due(step)` after each committed step. Costs one stat() per step (~5 µs on
    a local disk, an attribute-cache lookup on NFS); the file is read only when its inode, mtime or
    size changed, so only once per request.

    >>> import tempfile
    >>> job = Path(tempfile.mkdtemp())
    >>> early, late = StopRequest(str(stop_request_file(job))), StopRequest(str(stop_request_file(job)))
    >>> early.due(40), bool(write_stop_request(job, 42)), [early.due(s) for s in (41, 42)]
    (False, True, [False, True])
    >>> late.due(43)  # first seen past the agreed step: the others have stopped at 42, not this one alone
    False
    """

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self.after_step: int | None = None
        self._missed = False

    def due(self, step: int) -> bool:
        """True exactly at the agreed step; a request first seen past it is logged once and ignored."""
        if not self.path:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._seen:
            self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            try:
                with open(self.path) as f:
                    self.after_step = int(json.load(f)["stop_after_step"])
            except (OSError, ValueError, KeyError, TypeError):
                self.after_step = None  # not ours to judge: keep training, the supervisor's deadline decides
            if self.after_step is not None and step > self.after_step and not self._missed:
                self._missed = True
                log.warning("stop request for step %d seen only after step %d: not stopping alone (the other "
                            "groups may have stopped); the supervisor's deadline ends this group",
                            self.after_step, step)
        return self.after_step == step
