"""Which running groups are hung, and whether it is a deadlock: the policy's hang judgement.

Pure, like the rest of the policy (`policy.decide` kills what `hung_groups` names). A group is
stale when it has been silent past what it is allowed (`silence_s`); a stale group that is not
waiting on its peers in a collective is the culprit, and the peers waiting on it are its victims. Cost: one pass over the running groups; microseconds.
"""

from __future__ import annotations

from watchtower.supervisor.policy_types import FailureKind, GroupView, PolicyConfig, PolicyState, View
from watchtower.supervisor.pool import running_groups


def slow_phase(g: GroupView) -> bool:
    """Whether the group is in a phase that reports progress instead of finishing steps: before its
    first step (staging, init, resume, healing), or after a progress report newer than its last step
    (a checkpoint save, a heal from a peer). A save of a large model takes longer than a step; its
    group would otherwise be the only "culprit" while its peers wait for it in the next quorum."""
    return g.heartbeat is None or (g.progress_at is not None and g.progress_at > g.heartbeat)


def silence_s(g: GroupView, now: float, cfg: PolicyConfig) -> float:
    """Seconds past the silence a group is allowed (negative while fine).

    In a slow phase (`slow_phase`) a group is given `startup_grace_s` from its last sign of life, so
    a spare staging a large dataset for hours stays alive as long as it keeps reporting progress;
    else `heartbeat_timeout_s` from its last finished step.

    >>> cfg = PolicyConfig(nodes=("a",), heartbeat_timeout_s=30, startup_grace_s=60)
    >>> silence_s(GroupView("g0", "a", launched_at=0.0, progress_at=500.0), now=570.0, cfg=cfg)
    10.0
    >>> silence_s(GroupView("g0", "a", launched_at=0.0, heartbeat=550.0), now=570.0, cfg=cfg)
    -10.0
    >>> saving = GroupView("g0", "a", launched_at=0.0, heartbeat=500.0, progress_at=501.0)
    >>> silence_s(saving, now=550.0, cfg=cfg)  # 50 s into a save: past the heartbeat timeout, not the grace
    -11.0
    """
    seen = max(t for t in (g.launched_at, g.heartbeat, g.progress_at) if t is not None)
    return now - seen - (cfg.startup_grace_s if slow_phase(g) else cfg.heartbeat_timeout_s)


def hung_groups(state: PolicyState, view: View, cfg: PolicyConfig) -> tuple[list[GroupView], FailureKind]:
    """The groups to kill and why: the hung group, not its victims (the healthy groups waiting for
    it in the quorum or the gradient all-reduce stop finishing steps too, but report
    `in_collective`). While the Lighthouse is excused nothing is judged: every group waits on the
    quorum, none is stuck by itself.

    A deadlock needs every running group stale and waiting: a group still making progress (an
    active stepping, a peer staging its data) is what a waiting group may be waiting for (a spare
    healing from it, a first quorum waiting for it), and torchft's own quorum and collective
    timeout (ft_timeout_s) ends such a wait if it was wrong. So only when all of them have waited
    past three timeouts, and past torchft's own if that is longer, is nobody to blame: all go.

    >>> cfg = PolicyConfig(nodes=("a", "b"), heartbeat_timeout_s=30)
    >>> stepping = GroupView("g0", "a", 0.0, heartbeat=990.0)
    >>> healing = GroupView("g1", "b", 0.0, progress_at=500.0, in_collective=True)  # silent for 500 s
    >>> hung_groups(PolicyState(), View(1000.0, (stepping, healing)), cfg)
    ([], <FailureKind.HANG: 'hang'>)
    """
    if state.excuse_until is not None and view.now <= state.excuse_until:
        return [], FailureKind.HANG
    running = running_groups(state, view)
    stale = [g for g in running if silence_s(g, view.now, cfg) > 0]
    culprits = [g for g in stale if not g.in_collective]
    if culprits or len(stale) < len(running):
        return culprits, FailureKind.HANG
    waited = max(2 * cfg.heartbeat_timeout_s, cfg.ft_timeout_s)
    if stale and all(silence_s(g, view.now, cfg) > waited for g in stale):
        return stale, FailureKind.DEADLOCK
    return [], FailureKind.HANG


def why_hung(g: GroupView, now: float, cfg: PolicyConfig, kind: FailureKind) -> str:
    """The hang decision in words, for the incident directory.

    >>> cfg = PolicyConfig(nodes=("a",), heartbeat_timeout_s=30)
    >>> why_hung(GroupView("g0", "a", 0.0, heartbeat=100.0), 140.0, cfg, FailureKind.HANG)
    'no step finished for 40 s (allowed 30 s) and not waiting on peers'
    """
    allowed = cfg.startup_grace_s if slow_phase(g) else cfg.heartbeat_timeout_s
    what = "progress" if slow_phase(g) else "step finished"
    silent = f"no {what} for {silence_s(g, now, cfg) + allowed:.0f} s"
    if kind is FailureKind.DEADLOCK:
        return f"{silent}, waiting on peers as every running group is, past the deadlock threshold: a deadlock"
    return f"{silent} (allowed {allowed:g} s) and not waiting on peers"
