"""What the policy observes: one poll's `View` of the groups, the Lighthouse and the launches.

The shell (`observe.py`) builds a `View` each poll from exits, each group's rank-0 /metrics, drain
requests and the Lighthouse's health; `policy.decide` reads nothing else. Frozen dataclasses and
enums only, so a table row in tests/test_policy.py writes a poll down in a line. Re-exported by
policy_types, where the rest of the policy's words live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(Enum):
    """What torchft has a group doing: contributing gradients, in sync as a hot spare, or not yet known."""
    ACTIVE = "active"
    SPARE = "spare"
    STARTING = "starting"


class GroupState(Enum):
    RUNNING = "running"
    EXITED = "exited"  # GroupView.exit_code says how


class LighthouseHealth(Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class GroupView:
    """One group as the shell last saw it. heartbeat: unix time of its last finished step (None
    before the first); progress_at: of its last progress report (staging, init, resume, healing)."""

    replica_id: str
    node: str
    launched_at: float
    state: GroupState = GroupState.RUNNING
    exit_code: int | None = None
    role: Role = Role.STARTING
    step: int = 0
    heartbeat: float | None = None
    progress_at: float | None = None
    in_collective: bool = False  # waiting on peers in the quorum or the gradient all-reduce
    spike_step: int | None = None  # step of the last critical loss spike its detector reported


@dataclass(frozen=True)
class LaunchFailure:
    """A launch the shell could not carry out: `replica_id` the id it took, `at` when it failed,
    `error` the error's one line. on_node: the launcher failed to start it on the node (the node's
    fault); False: the head could not prepare it (its launch config on the supervisor's own disk),
    which blames no node and spends no budget: the launch is ordered again."""

    replica_id: str
    node: str
    at: float
    error: str
    on_node: bool = True


@dataclass(frozen=True)
class View:
    """One poll's observations. A group stays listed until the shell has reported it EXITED once."""

    now: float
    groups: tuple[GroupView, ...] = ()
    drain_requests: tuple[str, ...] = ()  # raw names, as found; validated by the policy
    down_nodes: frozenset[str] = frozenset()
    lighthouse: LighthouseHealth = LighthouseHealth.UP
    launch_failures: tuple[LaunchFailure, ...] = ()  # the last poll's launches that failed
    unhealthy_nodes: dict[str, str] = field(default_factory=dict)  # node → check output, found this poll
    # steps of the committed checkpoints, listed only while a loss spike may be rewound (rewind.py's
    # committed_steps: one listing); None: not listed this poll
    checkpoints: tuple[int, ...] | None = None
    # why the shell cannot rewind this poll (remediation.json not written): the policy declines instead
    rewind_refused: str = ""
