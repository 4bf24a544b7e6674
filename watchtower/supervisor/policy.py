"""The supervisor's decisions as a pure function: what one poll saw in, what to do out.

    state, actions = decide(state, view, cfg)

The shell observes (process exits, each group's /metrics, drain requests, Lighthouse health, the
clock) into a `View`, executes the actions in the order given and keeps the returned state for the
next poll. No I/O, no clock, no processes: every decision is a table row in tests/test_policy.py.
Cost: a few list passes over groups, nodes and the failures in the budget window; microseconds.

Each poll, in this order (the reasons are in the functions below):
  0. the last poll's launches the launcher failed on a node: each drains its node and is counted,
     like a group that died at once (else the same launch is ordered on the same free node every
     poll, forever); one the head could not prepare (its own disk) is only ordered again.
  -  nodes that failed the health gate (`View.unhealthy_nodes`, see health.py): retired for the
     job's life, reported once; no failure is recorded, so no budget is spent and nobody is restarted.
  1. the Lighthouse seen down → restart it: one counted failure per outage, retried with backoff,
     exit 5 if still down after `lighthouse_restart_timeout_s`. The failures of the next
     `lighthouse_grace_s` are quorum timeouts: recorded, but they drain no node and spend no budget,
     and hangs are not judged.
  2. exits: 0 means the job is finished; 2 (EXIT_CONFIG) is the trainer refusing its config, which
     every restart would refuse again: stop at once with exit 2, no node drained; any other code
     drains the group's node (torchft promotes a spare by itself within one Lighthouse heartbeat timeout).
  3. drain requests: a valid node is retired for good (no new group, spares included); its group is
     killed as a planned drain, never counted. A bad name is reported once and touches nothing.
  4. nodes the launcher reports down: their groups are killed, the nodes drained.
  5. hangs (hangs.py, `silence_s`): the stuck group is killed, not the peers waiting on it in a collective;
     if every running group is stale and has waited so for three timeouts (and torchft's own
     ft_timeout_s), it is a deadlock and all of them go; a group still progressing rules it out.
  5b. a critical loss spike every contributing group agrees on: remediation.py (rewind or page).
  6. the failure budget (`budget_verdict`) spent → stop as a crash loop.
  7. the pool: finished → stop when the last group is gone; every group holding the run's progress
     lost (a replacement that never finished a step holds none) → restart from the checkpoint; else refill to active + spare groups, fresh nodes first. Fewer groups than
     active_groups able to run (torchft would block every commit) → stop, no nodes.
"""

from __future__ import annotations

from dataclasses import replace

from watchtower.supervisor.failure_budget import budget_verdict
from watchtower.supervisor.hangs import hung_groups, silence_s, why_hung  # noqa: F401 (silence_s: re-exported)
from watchtower.supervisor.pool import keep_the_pool_full, node_states, running_groups  # noqa: F401 (node_states: re-exported)
from watchtower.supervisor.policy_types import (
    EXIT_CRASH_LOOP, EXIT_LIGHTHOUSE, Action, Capture, DrainNode, DrainRejected, Failure, FailureKind, GroupFailed,
    GroupFinished, GroupState, GroupView, Kill, LighthouseHealth, NodeUnhealthy, Outage, PolicyConfig, PolicyState,
    RestartLighthouse, Role, Stop, View, node_name_problem)
from watchtower.supervisor.remediation import Rewind, RewindDeclined, agreed_spike, may_rewind, remedy
from watchtower.validation import EXIT_CONFIG

_PLANNED = (FailureKind.DRAINED, FailureKind.REWIND)  # never counted toward the failure budget
_BLAMES_NODE = (FailureKind.EXIT, FailureKind.HANG, FailureKind.NODE_DOWN)
LIGHTHOUSE_RETRY_MAX_S = 30.0  # the longest wait between two restarts of a Lighthouse that stays down


def decide(state: PolicyState, view: View, cfg: PolicyConfig) -> tuple[PolicyState, list[Action]]:
    """One poll's decision.

    >>> cfg = PolicyConfig(nodes=("a", "b", "c"), active_groups=1, spare_groups=1)
    >>> state, actions = decide(PolicyState.initial(cfg), View(now=0.0), cfg)
    >>> [(a.node, a.role.value) for a in actions]
    [('a', 'active'), ('b', 'spare')]
    >>> crashed = View(now=9.0, groups=(GroupView("g0", "a", 0.0, GroupState.EXITED, exit_code=1),
    ...                                 GroupView("g1", "b", 0.0, heartbeat=8.0)))
    >>> [type(a).__name__ for a in decide(state, crashed, cfg)[1]]
    ['GroupFailed', 'DrainNode', 'Launch']
    """
    out: list[Action] = []
    state = _begin(state, view, cfg, out)
    state = _note_failed_launches(state, view, out)
    state = _exclude_unhealthy(state, view, cfg, out)
    state = _watch_lighthouse(state, view, cfg, out)
    if out and isinstance(out[-1], Stop):
        return state, out  # the Lighthouse cannot be restarted
    state = _note_exits(state, view, out)
    if out and isinstance(out[-1], Stop):
        return state, out  # a group refused its config
    state = _take_drain_requests(state, view, cfg, out)
    for g in running_groups(state, view):
        if g.node in view.down_nodes:
            state = _fail(state, g, FailureKind.NODE_DOWN, view.now, out)
    state = _kill_hung(state, view, cfg, out)
    state = _remedy_loss_spike(state, view, cfg, out)
    verdict = budget_verdict(state.failures, view.now, cfg.budget)
    if verdict:
        out.append(Stop(EXIT_CRASH_LOOP, verdict))
        return state, out
    return keep_the_pool_full(state, view, cfg, out), out


# ---- the steps of one poll ---------------------------------------------------------------------


def _begin(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """Forget what no longer matters; kill again a group that survived its kill."""
    for g in view.groups:
        if g.state is GroupState.RUNNING and g.replica_id in state.ended:
            kind = next((f.kind for f in reversed(state.failures) if f.replica_id == g.replica_id), FailureKind.HANG)
            out.append(Kill(g.replica_id, g.node, kind))
    incident = None if len(running_groups(state, view)) >= cfg.active_groups else state.incident_since  # a quorum again

    def kept(f: Failure) -> bool:  # the window's failures, and the incident's: they name the nodes to give back
        return f.at > view.now - cfg.budget.failure_window_s or (incident is not None and f.at >= incident)

    return replace(state, ended=state.ended & {g.replica_id for g in view.groups},
                   rejected=state.rejected & set(view.drain_requests), incident_since=incident,
                   failures=tuple(filter(kept, state.failures)),
                   job_step=max([state.job_step, *(g.step for g in view.groups)]))


def _exclude_unhealthy(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """A node that failed its health check never gets a group. The gate checks only nodes a launch
    was decided for (free ones), so no group runs there; it is not the job's fault, so it spends no
    budget, and it stays retired even through a restart (no check has said it recovered)."""
    for node, output in view.unhealthy_nodes.items():
        if node in cfg.nodes and node not in state.retired:
            out.append(NodeUnhealthy(node, output))
            state = replace(state, retired=state.retired | {node})
    return state


def _note_failed_launches(state: PolicyState, view: View, out: list[Action]) -> PolicyState:
    """A launch the launcher failed on its node blames the node (the retry goes to another) and
    spends the budget, so a launcher failing everywhere stops as a crash loop. Each attempt is its
    own retry in the budget's fresh-node chain: it started (`launched_at`) after the previous attempt
    failed (`at`). A launch the head could not prepare (`on_node` False: the supervisor's own disk)
    is no failure: the pool orders it again, on the same node."""
    for lf in (lf for lf in view.launch_failures if lf.on_node):
        f = Failure(lf.at, lf.replica_id, lf.node, FailureKind.LAUNCH, None, state.job_step, lf.at,
                    counted=True, blamed=True, detail=lf.error)
        out.append(GroupFailed(f))
        if lf.node not in state.drained | state.retired:
            out.append(DrainNode(lf.node, FailureKind.LAUNCH.value))
        state = replace(state, failures=state.failures + (f,), drained=state.drained | {lf.node})
    return state


def _watch_lighthouse(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """One outage (down until seen up again) is one counted failure, however many restarts it takes:
    a restart that fails (its port taken) is tried again 1, 2, 4 ... 30 s apart, not counted again at
    every poll (six polls were a "crash loop" in a second). Down past lighthouse_restart_timeout_s it
    will not come back by itself: stop, exit 5, saying so. While it is down and for
    lighthouse_grace_s after, group failures are its fault (quorum timeouts)."""
    o = state.lighthouse_outage
    if view.lighthouse is LighthouseHealth.UP:
        return replace(state, lighthouse_outage=None) if o else state
    state = replace(state, excuse_until=view.now + cfg.lighthouse_grace_s)
    if o is None:
        out.append(RestartLighthouse(1))
        died = Failure(view.now, "", None, FailureKind.LIGHTHOUSE, None, state.job_step, view.now,
                       counted=True, blamed=False)
        return replace(state, failures=state.failures + (died,), lighthouse_outage=Outage(view.now, 1, view.now + 1))
    if view.now - o.since > cfg.lighthouse_restart_timeout_s:
        out.append(Stop(EXIT_LIGHTHOUSE, f"the Lighthouse has been down for {view.now - o.since:.0f} s through "
                        f"{o.tries} restarts: it cannot serve where it listened (supervisor.lighthouse_bind)"))
    elif view.now >= o.next_try:
        out.append(RestartLighthouse(o.tries + 1))
        delay = min(2.0 ** o.tries, LIGHTHOUSE_RETRY_MAX_S)
        state = replace(state, lighthouse_outage=Outage(o.since, o.tries + 1, view.now + delay))
    return state


def _note_exits(state: PolicyState, view: View, out: list[Action]) -> PolicyState:
    """Record this poll's exits; end with a `Stop` if a group refused its config (exit 2): a restart
    or a spare reads the same config and would refuse it too, so no node is to blame."""
    refused = []
    for g in view.groups:
        if g.state is not GroupState.EXITED or g.replica_id in state.ended:
            continue
        if g.exit_code == 0:
            out.append(GroupFinished(g.replica_id, g.node, g.step))
            state = replace(state, finished=True, ended=state.ended | {g.replica_id})
        else:
            refused += [g.replica_id] if g.exit_code == EXIT_CONFIG else []
            state = _fail(state, g, FailureKind.EXIT, view.now, out)
    if refused:
        out.append(Stop(EXIT_CONFIG, f"{refused[0]} refused its config; see its log"))
    return state


def _take_drain_requests(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    for name in dict.fromkeys(view.drain_requests):
        problem = node_name_problem(name) or (None if name in cfg.nodes else f"is not one of {list(cfg.nodes)}")
        if problem:
            if name not in state.rejected:
                out.append(DrainRejected(name, problem))
                state = replace(state, rejected=state.rejected | {name})
            continue
        if name in state.retired:
            continue
        for g in running_groups(state, view):
            if g.node == name:
                state = _fail(state, g, FailureKind.DRAINED, view.now, out)
        if name not in state.drained:
            out.append(DrainNode(name, "drain requested"))
        state = replace(state, retired=state.retired | {name})
    return state


def _kill_hung(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """Kill what `hung_groups` (hangs.py) judges hung: the culprit, or every group of a deadlock."""
    culprits, kind = hung_groups(state, view, cfg)
    for g in culprits:
        out.append(Capture(g.replica_id, g.node, kind, why_hung(g, view.now, cfg, kind)))
        state = _fail(state, g, kind, view.now, out)
    return state


def _remedy_loss_spike(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """A critical loss spike every contributing group agrees on: rewind (every group restarted from
    an earlier checkpoint, the data window skipped) or a record that it only pages (remediation.py).
    A rewind is chosen among the committed checkpoints the shell listed; a poll without the listing
    decides nothing (the shell lists them while a spike is undecided: see `spike_undecided`)."""
    spike = _new_agreed_spike(state, view, cfg)
    if spike is None:
        return state
    if may_rewind(state.rewinds, cfg.remediation) and view.checkpoints is None:
        return state
    action = (RewindDeclined(spike, view.rewind_refused) if view.rewind_refused else
              remedy(spike, state.rewinds, cfg.remediation, view.checkpoints or (), cfg.spike_patience))
    # a rewind restarts every group: the spikes the new ones report are new, even at a step number seen
    # before (the skip was too short); remembered by step alone, such a spike got nothing, not even a record
    state = replace(state, spikes_seen=frozenset() if isinstance(action, Rewind) else state.spikes_seen | {spike})
    for g in running_groups(state, view) if isinstance(action, Rewind) else ():
        state = _fail(state, g, FailureKind.REWIND, view.now, out)
    out.append(action)  # before the pool's restart, which launches from the checkpoint it leaves
    return replace(state, rewinds=state.rewinds + isinstance(action, Rewind))


def _new_agreed_spike(state: PolicyState, view: View, cfg: PolicyConfig) -> int | None:
    """The step of a spike every active group agrees on and no earlier poll remedied, else None."""
    active = [g for g in running_groups(state, view) if g.role is Role.ACTIVE]
    spike = agreed_spike((g.spike_step for g in active), cfg.active_groups)
    return None if spike is None or spike in state.spikes_seen else spike


def spike_undecided(state: PolicyState, view: View, cfg: PolicyConfig) -> bool:
    """Whether this poll may decide a rewind, so the shell must list the committed checkpoints for it
    (one listing of the checkpoint directory, only at an agreed spike; none on other polls)."""
    return may_rewind(state.rewinds, cfg.remediation) and _new_agreed_spike(state, view, cfg) is not None


def _fail(state: PolicyState, g: GroupView, kind: FailureKind, now: float, out: list[Action]) -> PolicyState:
    """Record a group's loss (killing it if it still runs); drain its node if the node is to blame."""
    excused = kind is not FailureKind.DRAINED and state.excuse_until is not None and now <= state.excuse_until
    blamed = kind in _BLAMES_NODE and not excused and g.exit_code != EXIT_CONFIG
    failure = Failure(now, g.replica_id, g.node, kind, g.exit_code, g.step, g.launched_at,
                      counted=kind not in _PLANNED and not excused, blamed=blamed)
    if g.state is GroupState.RUNNING:
        out.append(Kill(g.replica_id, g.node, kind))
    out.append(GroupFailed(failure))
    if blamed and g.node not in state.drained | state.retired:
        out.append(DrainNode(g.node, kind.value))
    return replace(state, failures=state.failures + (failure,), ended=state.ended | {g.replica_id},
                   drained=state.drained | {g.node} if blamed else state.drained,
                   incident_since=now if state.incident_since is None else state.incident_since)


