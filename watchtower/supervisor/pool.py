"""The pool half of the policy: which nodes are free, and refilling, restarting or stopping.

Pure like the rest of the policy (`policy.decide` calls `keep_the_pool_full` last in each poll).
Cost: a few passes over groups and nodes; microseconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from watchtower.supervisor.policy_types import (
    EXIT_DONE, EXIT_NO_NODES, Action, FailureKind, GroupState, GroupView, Launch, LaunchReason, NodeState, PolicyConfig,
    PolicyState, RestartFromCheckpoint, Role, SparesExhausted, Stop, View)


def running_groups(state: PolicyState, view: View) -> list[GroupView]:
    return [g for g in view.groups if g.state is GroupState.RUNNING and g.replica_id not in state.ended]



def node_states(state: PolicyState, view: View, cfg: PolicyConfig) -> dict[str, NodeState]:
    """Every node's state. A node stays busy while any group still runs there, one the policy has
    ended too: its kill may have timed out (a process stuck in the kernel still holds the node's
    GPUs), so nothing new starts there before the shell has seen that group exit."""
    winding = {g.node for g in view.groups if g.state is GroupState.RUNNING}

    def one(node: str) -> NodeState:
        if node in view.down_nodes:
            return NodeState.DOWN
        if node in state.drained or node in state.retired:
            return NodeState.DRAINING if node in winding else NodeState.DRAINED
        return NodeState.BUSY if node in winding else NodeState.FREE

    return {node: one(node) for node in cfg.nodes}


def free_nodes(state: PolicyState, view: View, cfg: PolicyConfig) -> list[str]:
    """Free nodes, those with the fewest blamed failures first, so a retry lands on a fresh node."""
    failed = Counter(f.node for f in state.failures if f.blamed)
    states = node_states(state, view, cfg)
    return sorted((n for n in cfg.nodes if states[n] is NodeState.FREE), key=lambda n: failed[n])


def standby_plan(free: list[str], busy: set[str], steps: list[int], finishing: bool,
                 spare_groups: int) -> tuple[list[str], bool]:
    """Where standbys stay (`Launcher.keep_warm`), and whether new ones may start.

    On free nodes no group of ours runs on (a node launched on this poll is still free in the poll's
    view), the first `max(1, spare_groups)` of them (the refills one incident can ask for at once; a
    standby costs a node's memory and, while it imports, CPU). New ones only once every running group
    has finished a step (their imports would slow a starting group's) and never once a group has
    finished the job (its node frees up as the job ends: a standby there would only be stopped).

    >>> standby_plan(["n3", "n4"], {"n1", "n2"}, [12, 12], False, 1)
    (['n3'], True)
    >>> standby_plan(["n3", "n4", "n5"], {"n3"}, [12, 0], False, 2)  # n3 just launched on; one still starting
    (['n4', 'n5'], False)
    >>> standby_plan(["n1", "n2"], set(), [], True, 0)  # the job is finishing
    (['n1'], False)
    """
    kept = [n for n in free if n not in busy][:max(1, spare_groups)]
    return kept, not finishing and all(step >= 1 for step in steps)


def _winding_down(state: PolicyState, view: View, cfg: PolicyConfig) -> list[str]:
    """Nodes busy only with groups the policy has ended (killed, not yet seen exiting), not drained."""
    states, live = node_states(state, view, cfg), {g.node for g in running_groups(state, view)}
    return [n for n in cfg.nodes if states[n] is NodeState.BUSY and n not in live]


def keep_the_pool_full(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action]) -> PolicyState:
    """Refill, restart or stop. A whole-job loss is not its nodes' fault (they failed together), so
    the nodes this incident drained are given back to the restart, the freshest still first.

    The job is lost when the last group holding its progress in memory (one that has finished a
    step) is gone, even if a replacement started between the losses: a replacement that never
    finished a step holds nothing to heal from, it too resumes from the checkpoint. It is kept
    and counted; the restart launches the rest."""
    alive = running_groups(state, view)
    running = len(alive)
    if state.finished:
        if not running:
            out.append(Stop(EXIT_DONE, f"all groups finished at step {state.job_step}"))
        return state
    if not state.started:
        return _launch(state, view, cfg, out, 0, LaunchReason.INITIAL)
    if not running and not view.groups and view.launch_failures:  # the last poll's launches failed: retried
        return _launch(state, view, cfg, out, 0, LaunchReason.RESTART if state.job_step else LaunchReason.INITIAL)
    holders = any(g.heartbeat is not None for g in alive)
    state_lost = not running or (state.live_state and not holders)
    state = replace(state, live_state=holders)
    if not state_lost:
        if running >= cfg.target:
            return replace(state, short_of_nodes=False)
        return _launch(state, view, cfg, out, running, LaunchReason.SPARE)
    since = state.incident_since if state.incident_since is not None else view.now
    lost = {f.node for f in state.failures if f.blamed and f.at >= since and f.kind is not FailureKind.LAUNCH}
    returned = tuple(n for n in cfg.nodes if n in lost and n in state.drained and n not in state.retired)
    state = replace(state, drained=state.drained - set(returned))  # they failed together: not their fault
    return _launch(state, view, cfg, out, running, LaunchReason.RESTART,
                   RestartFromCheckpoint(state.job_step, returned))


_NO_NODES = {LaunchReason.INITIAL: "not enough free nodes to start the job",
             LaunchReason.RESTART: "every group is lost and there are not enough nodes to restart",
             LaunchReason.SPARE: "too few groups left to form a quorum and no free node to start one"}


def _launch(state: PolicyState, view: View, cfg: PolicyConfig, out: list[Action], have: int, reason: LaunchReason,
            first: Action | None = None) -> PolicyState:
    """Start groups up to active + spare; stop when not even the active groups can run."""
    want = cfg.target - have
    picked = free_nodes(state, view, cfg)[:want]
    missing = want - len(picked)
    if have + len(picked) < cfg.active_groups and have + len(picked) + len(_winding_down(state, view, cfg)) \
            >= cfg.active_groups:
        return state  # enough nodes once the groups just killed there have exited (a rewind): the next poll
    if have + len(picked) < cfg.active_groups:
        out += [SparesExhausted(reason, missing), Stop(EXIT_NO_NODES, f"{_NO_NODES[reason]}: "
                f"{have + len(picked)} of {cfg.active_groups} active groups can run")]
        return replace(state, started=True, short_of_nodes=True)
    out += [first] if first else []
    out += [Launch(node, Role.ACTIVE if have + i < cfg.active_groups else Role.SPARE, reason)
            for i, node in enumerate(picked)]
    if missing and not state.short_of_nodes:
        out.append(SparesExhausted(reason, missing))
    return replace(state, started=True, short_of_nodes=bool(missing))
