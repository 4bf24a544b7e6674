"""The crash-loop guard: when spending another spare (or another checkpoint restart) is waste.

Two rules, both in the job file's [supervisor] section, both judged over the failures the policy
counted (planned drains and the quorum timeouts of a Lighthouse outage are not counted):
  - too many failures of any kind within a window: kinds that alternate (hang, exit, hang, ...)
    cannot keep the job restarting forever;
  - the same failure (kind and exit code) on K fresh nodes, each group started after the previous
    one failed that way: the program is broken, not the nodes.
Pure: a tuple of failures and a time in, a reason to stop (or None) out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watchtower.validation import require

if TYPE_CHECKING:  # the failures' type lives with the policy's other words; only named here
    from watchtower.supervisor.policy_types import Failure


@dataclass(frozen=True)
class FailureBudget:
    """The crash-loop guard, in the job file's [supervisor] section.

    max_failures: this many counted failures of any kind within failure_window_s stop the job (so
        kinds that alternate, hang/exit/hang, cannot restart forever). Raise it for a large cluster
        whose nodes fail more often than that in a window by themselves.
    crash_loop_limit: the same failure (kind and exit code) on this many fresh nodes within the
        window, each group started after the previous such failure: the program is broken, not the
        nodes; stop before every spare is burnt.
    """

    max_failures: int = 6
    failure_window_s: float = 3600.0
    crash_loop_limit: int = 3

    def __post_init__(self) -> None:
        require(self.max_failures >= 2, "max_failures", self.max_failures, "must be >= 2")
        require(self.failure_window_s > 0, "failure_window_s", self.failure_window_s, "must be > 0 seconds")
        require(self.crash_loop_limit >= 2, "crash_loop_limit", self.crash_loop_limit, "must be >= 2")


def budget_verdict(failures: tuple[Failure, ...], now: float, budget: FailureBudget) -> str | None:
    """Why the job must stop as a crash loop, or None while the budget holds.

    >>> from watchtower.supervisor.policy_types import Failure, FailureKind
    >>> def crash(at, node, launched_at):
    ...     return Failure(at, "g", node, FailureKind.EXIT, 1, 15, launched_at, counted=True, blamed=True)
    >>> budget_verdict((crash(10, "a", 0), crash(20, "b", 11)), 20, FailureBudget()) is None
    True
    >>> budget_verdict((crash(10, "a", 0), crash(20, "b", 11), crash(30, "c", 21)), 30, FailureBudget())
    'crash loop: the same failure (exit, exit code 1) on 3 fresh nodes (a, b, c); not spending more spares'
    """
    recent = [f for f in failures if f.counted and f.at > now - budget.failure_window_s]
    if len(recent) >= budget.max_failures:
        kinds = ", ".join(f"{kind} x{n}" for kind, n in Counter(f.kind.value for f in recent).items())
        return (f"crash loop: {len(recent)} failures within {budget.failure_window_s:g} s ({kinds}) spent the "
                f"failure budget of {budget.max_failures}{_last_error(recent)}")
    for signature in dict.fromkeys(f.signature for f in recent if f.node is not None):
        nodes = fresh_nodes([f for f in recent if f.signature == signature])
        if len(nodes) >= budget.crash_loop_limit:
            kind, code = signature
            return (f"crash loop: the same failure ({kind.value}{'' if code is None else f', exit code {code}'}) "
                    f"on {len(nodes)} fresh nodes ({', '.join(nodes)}); not spending more spares"
                    f"{_last_error([f for f in recent if f.signature == signature])}")
    return None


def _last_error(failures: list[Failure]) -> str:
    """The newest error text among `failures` (a failed launch's), as a suffix of the verdict."""
    detail = next((f.detail for f in reversed(failures) if f.detail), "")
    return f"; last error: {detail}" if detail else ""


def fresh_nodes(same: list[Failure]) -> list[str]:
    """The nodes of the newest failure's chain back in time, each link a group started after the
    previous link failed (groups failing together are one link: their failures are not retries)."""
    chain = [same[-1]]
    for f in reversed(same[:-1]):
        if chain[-1].launched_at > f.at:
            chain.append(f)
    return list(dict.fromkeys(f.node for f in reversed(chain) if f.node is not None))
