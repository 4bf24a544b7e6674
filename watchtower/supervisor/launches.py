"""Starting a group, in two steps with two owners: prepare it on the head (its directory and launch
config, on the supervisor's own disk), then have the launcher start it on the node (fork, srun).

Only the launcher failing is the node's fault: a `LaunchFailure` the policy blames the node for
(a retry on the same node every poll would spin forever). A failed preparation (ENOSPC on the
head) is the supervisor's own error: counted under stage "launch", reported once per distinct
error, and a `LaunchFailure(on_node=False)` that blames no node, so the policy orders the launch
again at the next poll, on the same node. It leaves nothing behind and keeps its group id, so a
disk full for an hour costs a mkdir and an rmtree per poll, not a directory per poll.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.contract import ReplicaConfig, group_config, stop_request_file, write_group_config
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.launcher import GroupProcess, GroupSpec, Launcher
from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.policy_types import Launch, LaunchFailure


def one_line(err: BaseException) -> str:
    """An error as one line for an event: its type and the first line of its message.

    >>> one_line(OSError(28, "No space left on device"))
    'OSError: [Errno 28] No space left on device'
    """
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def first_free_seq(groups_dir: Path) -> int:
    """The next group number: after every `gNNNN` directory already there, so a supervisor resuming
    a job after a dead one never reuses a group's directory (its logs, endpoint files)."""
    taken = [int(p.name[1:]) for p in groups_dir.glob("g*") if p.name[1:].isdigit()] if groups_dir.is_dir() else []
    return max(taken, default=-1) + 1


class GroupStarter:
    """Numbers, prepares and starts groups; `failures` holds the failed launches for the next View
    (the loop takes them). `trainer` is the resolved trainer config (`TrainConfig.to_dict()`)."""

    def __init__(self, job: JobConfig, trainer: dict[str, Any], checkpoint_url: str, launcher: Launcher,
                 lighthouse: Callable[[], Lighthouse], events: EventLog, errors: StageErrors):
        self.job, self.trainer, self.checkpoint_url = job, trainer, checkpoint_url
        self.launcher, self.lighthouse, self.events, self.errors = launcher, lighthouse, events, errors
        self.groups_dir = job.job.output_path / "groups"
        self.seq = first_free_seq(self.groups_dir)
        self.node_index = {n: i for i, n in enumerate(job.cluster.nodes)}
        self.failures: list[LaunchFailure] = []
        self._head_errors: set[object] = set()  # the distinct errors preparing a launch, each reported once

    def start(self, a: Launch) -> tuple[str, int, GroupProcess, Path] | None:
        """(replica id, group number, process, launch config), or None when it failed (recorded)."""
        while (self.groups_dir / f"g{self.seq:04d}").exists():  # not ours (ours advance seq): never reuse
            self.seq += 1
        seq, replica_id = self.seq, f"g{self.seq:04d}"  # torchft ranks groups by id: later ones start as spares
        group_dir = self.groups_dir / replica_id
        try:
            config = self._prepare(a, seq, replica_id, group_dir)
        except Exception as err:  # noqa: BLE001 - the head's own I/O: no node to blame
            shutil.rmtree(group_dir, ignore_errors=True)
            self._head_failed(a, replica_id, err)
            return None
        self.seq += 1  # taken: the group's directory now holds its config (and will hold its log)
        try:
            process = self.launcher.launch(GroupSpec(replica_id, seq, a.node, config, group_dir / "group.log"))
        except Exception as err:  # noqa: BLE001 - whatever stopped it, the policy must see the node fail
            self.failures.append(LaunchFailure(replica_id, a.node, time.time(), one_line(err)))
            return None
        return replica_id, seq, process, config

    def _prepare(self, a: Launch, seq: int, replica_id: str, group_dir: Path) -> Path:
        """Write the group's launch config on the head; its path."""
        s = self.job.supervisor
        replica = ReplicaConfig(lighthouse=self.lighthouse().url, replica_id=replica_id, replica_group=seq,
                                active_groups=self.job.cluster.active_groups, node=a.node,
                                cache_dir=str(self.launcher.node_cache_dir(a.node)), ft_timeout_s=s.ft_timeout_s,
                                stop_file=str(stop_request_file(self.job.job.output_path)))
        port = s.base_port + 10 * self.node_index[a.node]
        return write_group_config(group_dir, group_config(self.trainer, replica, group_dir, port, self.checkpoint_url))

    def _head_failed(self, a: Launch, replica_id: str, err: Exception) -> None:
        """Counted under stage "launch" each time (errors_total shows the rate); reported as an event
        once per distinct error, so a disk full for an hour is one line, not one per poll."""
        self.errors.record("launch", err)
        self.failures.append(LaunchFailure(replica_id, a.node, time.time(), one_line(err), on_node=False))
        distinct = (type(err).__name__, err.errno) if isinstance(err, OSError) and err.errno else one_line(err)
        if distinct not in self._head_errors:  # an OSError's text names a path that changes with each try
            self._head_errors.add(distinct)
            self.events.emit("launch_deferred", f"{replica_id} could not be prepared on the supervisor's side "
                             f"({one_line(err)}); retried every poll, no node blamed", replica_id=replica_id,
                             node=a.node, error=one_line(err))
