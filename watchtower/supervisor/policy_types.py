"""The words of the supervisor's policy: what it observes, what it remembers, what it orders.

What it observes (`View`, `GroupView`, ...) is in policy_view.py, re-exported here. Everything
here is a frozen dataclass or an enum, so a decision can be written down as a table row
and compared with `==`. The shell (`shell.py`) builds a `View` each poll, calls
`policy.decide`, executes the actions in order and keeps the returned `PolicyState` for the next
poll. Nothing here reads a clock, a file or a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from watchtower.supervisor.failure_budget import FailureBudget
from watchtower.supervisor.policy_view import (  # noqa: F401 (re-exported: the policy's words in one import)
    GroupState, GroupView, LaunchFailure, LighthouseHealth, Role, View)
from watchtower.supervisor.remediation import RemediationConfig, Rewind, RewindDeclined  # noqa: F401 (the same)
from watchtower.validation import require

EXIT_DONE, EXIT_CRASH_LOOP, EXIT_NO_NODES, EXIT_LIGHTHOUSE = 0, 3, 4, 5  # EXIT_CONFIG (2) is watchtower.validation's
EXIT_REWIND_FAILED = 6  # a rewind's groups were killed, but its checkpoints could not be set aside (actions.py)


class NodeState(Enum):
    FREE = "free"  # a new group may start here
    BUSY = "busy"  # a live group runs here
    DRAINING = "draining"  # taken out of the pool; its group is being killed
    DRAINED = "drained"  # out of the pool: failed, excluded, or drained on request
    DOWN = "down"  # the launcher reports it unreachable


class FailureKind(Enum):
    """EXIT, HANG, NODE_DOWN, LAUNCH blame the node (drained); DEADLOCK blames nobody (every stale group
    was waiting on a peer); LIGHTHOUSE is the quorum server dying; DRAINED is a planned drain (never
    counted toward the failure budget). LAUNCH: the launcher could not start a group there. REWIND:
    every group restarted by the loss-spike remediation (planned: no node blamed, never counted)."""
    EXIT = "exit"
    HANG = "hang"
    DEADLOCK = "deadlock"
    NODE_DOWN = "node_down"
    LIGHTHOUSE = "lighthouse"
    DRAINED = "drained"
    LAUNCH = "launch"
    REWIND = "rewind"


class LaunchReason(Enum):
    INITIAL = "initial"
    SPARE = "spare"  # refilling the pool after a loss
    RESTART = "restart"  # every group was lost: from the last durable checkpoint


def node_name_problem(name: str) -> str | None:
    """Why `name` cannot be a node name (it becomes a path component: `drain/NAME`, `nodes/NAME/`), or None.

    >>> [node_name_problem(n) for n in ("node-a", "", "..", "a/b")]
    [None, 'is empty', 'is . or ..', "contains '/'"]
    """
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is . or .."
    for bad in ("/", "\\", "\0"):
        if bad in name:
            return f"contains {bad!r}"
    return None


@dataclass(frozen=True)
class PolicyConfig:
    """nodes: every node of the job, in launch-preference order; exclude: drained from the start.
    lighthouse_grace_s: failures seen up to this long after the Lighthouse was last seen down are its
    fault, not the nodes' (set it above the groups' quorum timeout, ft_timeout_s).
    lighthouse_restart_timeout_s: a Lighthouse down this long through every restart stops the job."""

    nodes: tuple[str, ...]
    active_groups: int = 1
    spare_groups: int = 0
    exclude: tuple[str, ...] = ()
    heartbeat_timeout_s: float = 30.0
    startup_grace_s: float = 60.0
    lighthouse_grace_s: float = 30.0
    ft_timeout_s: float = 10.0  # torchft's quorum/collective timeout: a deadlock is not judged before it
    lighthouse_restart_timeout_s: float = 300.0
    budget: FailureBudget = field(default_factory=FailureBudget)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    spike_patience: int = 1  # the trainers' monitor.loss_spike.patience: a spike is reported at its streak's end

    def __post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            problem = node_name_problem(node)
            require(problem is None, f"nodes[{i}]", node, f"{problem}: node names become directory names")
        require(self.lighthouse_grace_s >= 0, "lighthouse_grace_s", self.lighthouse_grace_s, "must be >= 0 seconds")

    @property
    def target(self) -> int:
        return self.active_groups + self.spare_groups


@dataclass(frozen=True)
class Failure:
    at: float
    replica_id: str
    node: str | None  # None for the Lighthouse
    kind: FailureKind
    exit_code: int | None
    step: int
    launched_at: float
    counted: bool  # toward the failure budget
    blamed: bool  # its node was drained for it
    detail: str = ""  # a failed launch's error, for the event and the crash-loop message

    @property
    def signature(self) -> tuple[FailureKind, int | None]:
        return self.kind, self.exit_code


@dataclass(frozen=True)
class Outage:
    """The Lighthouse seen down since `since` (until seen up again): `tries` restarts ordered, the
    next not before `next_try`."""

    since: float
    tries: int
    next_try: float


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers between polls; `PolicyState.initial(cfg)` to begin."""

    started: bool = False
    finished: bool = False
    drained: frozenset[str] = frozenset()  # blamed by a failure: given back if the whole job is lost
    retired: frozenset[str] = frozenset()  # excluded or drained on request: never given back
    failures: tuple[Failure, ...] = ()
    ended: frozenset[str] = frozenset()  # groups whose end is accounted for (killed or seen exiting)
    rejected: frozenset[str] = frozenset()  # drain requests already reported as invalid
    excuse_until: float | None = None  # failures until then are the Lighthouse's
    incident_since: float | None = None  # first loss since enough groups ran for a quorum
    short_of_nodes: bool = False  # spares_exhausted reported; cleared once the pool is full
    job_step: int = 0
    live_state: bool = False  # at the last poll a running group had finished a step: progress lived in memory
    lighthouse_outage: Outage | None = None  # the Lighthouse is down: since when, restarts tried
    rewinds: int = 0  # loss-spike rewinds ordered
    spikes_seen: frozenset[int] = frozenset()  # agreed spike steps declined since the last rewind

    @classmethod
    def initial(cls, cfg: PolicyConfig) -> PolicyState:
        return cls(retired=frozenset(cfg.exclude))


@dataclass(frozen=True)
class Launch:
    node: str
    role: Role
    reason: LaunchReason


@dataclass(frozen=True)
class Capture:
    """Before a hung or deadlocked group is killed: read every rank's stacks into an incident
    directory (bounded by supervisor.capture_timeout_s; the `Kill` follows, whatever was read)."""

    replica_id: str
    node: str
    kind: FailureKind
    why: str  # the decision in words, for the incident


@dataclass(frozen=True)
class Kill:
    """Kill the group's whole process group; a kill that fails is ordered again at the next poll."""

    replica_id: str
    node: str
    reason: FailureKind


@dataclass(frozen=True)
class DrainNode:
    node: str
    reason: str


@dataclass(frozen=True)
class RestartFromCheckpoint:
    step: int
    nodes_returned: tuple[str, ...] = ()  # drained by this incident, given back (they failed together)


@dataclass(frozen=True)
class RestartLighthouse:
    attempt: int = 1  # 1: a new outage (the one counted failure); more: retries of the same outage


@dataclass(frozen=True)
class Stop:
    """End the job: the shell stops every group and the Lighthouse and exits with `code`."""

    code: int
    message: str


@dataclass(frozen=True)
class GroupFailed:  # a record: the shell writes the event and counts it
    failure: Failure


@dataclass(frozen=True)
class GroupFinished:
    replica_id: str
    node: str
    step: int


@dataclass(frozen=True)
class SparesExhausted:
    reason: LaunchReason
    missing: int


@dataclass(frozen=True)
class DrainRejected:
    name: str
    why: str


@dataclass(frozen=True)
class NodeUnhealthy:  # a record: the node failed its health check and is out for the job's life
    node: str
    output: str


Action = Union[Launch, Capture, Kill, DrainNode, RestartFromCheckpoint, RestartLighthouse, Stop, GroupFailed, GroupFinished,
               SparesExhausted, DrainRejected, NodeUnhealthy, Rewind, RewindDeclined]
