"""The supervisor's policy as a table: one poll's observations in, the actions out, per situation.

Each case runs `decide` over its polls from a given state and compares every poll's actions, in
order, with the expected ones written briefly (`brief`). Pure: no process, no clock, no port.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field, replace

import pytest

from watchtower.supervisor.failure_budget import FailureBudget, budget_verdict
from watchtower.supervisor.policy import decide, node_states
from watchtower.supervisor.policy_types import (
    Capture, DrainNode, DrainRejected, Failure, FailureKind, GroupFailed, GroupFinished, GroupState, GroupView,
    Kill, Launch, LighthouseHealth, NodeState, PolicyConfig, PolicyState, RestartFromCheckpoint, RestartLighthouse,
    LaunchFailure, NodeUnhealthy, RemediationConfig, Rewind, RewindDeclined, Role, SparesExhausted, Stop, View)
from watchtower.validation import ConfigError

NODES = ("a", "b", "c", "d", "e")
CFG = PolicyConfig(nodes=NODES, active_groups=2, spare_groups=1, heartbeat_timeout_s=30, startup_grace_s=60,
                   lighthouse_grace_s=30)
THREE_NODES = replace(CFG, nodes=("a", "b", "c"))
ONE_GROUP = replace(CFG, active_groups=1, spare_groups=0)
FOUR_EXCLUDED = replace(CFG, exclude=("a", "b", "c", "d"))
REWIND = replace(CFG, remediation=RemediationConfig("rewind", rewind_margin=10, skip_batches_after=4))
NOW = 1000.0
STARTED = PolicyState(started=True)
DOWN = LighthouseHealth.DOWN
ENOSPC = "OSError: [Errno 28] No space left on device"


def budget(**kw) -> PolicyConfig:
    return replace(CFG, budget=FailureBudget(**kw))


def grp(rid: str, node: str, *, at: float = NOW, beat: float = 1.0, launched: float = 0.0, **kw) -> GroupView:
    """A running group seen at `at` whose last step finished `beat` seconds before."""
    return GroupView(rid, node, launched, heartbeat=at - beat, step=kw.pop("step", 40), **kw)


def gone(rid: str, node: str, code: int, *, launched: float = 0.0, step: int = 40) -> GroupView:
    return GroupView(rid, node, launched, GroupState.EXITED, exit_code=code, step=step)


def pool(at: float = NOW, **swap: GroupView) -> tuple[GroupView, ...]:
    """The healthy pool g0@a, g1@b (active) and g2@c (spare), with some groups swapped."""
    healthy = {"g0": grp("g0", "a", at=at, role=Role.ACTIVE), "g1": grp("g1", "b", at=at, role=Role.ACTIVE),
               "g2": grp("g2", "c", at=at, role=Role.SPARE)}
    return tuple({**healthy, **swap}.values())


def failed(at: float, rid: str, node: str, kind: FailureKind, code: int | None = None) -> Failure:
    return Failure(at, rid, node, kind, code, 20, 0.0, counted=True, blamed=True)


def brief(a) -> tuple:
    """An action in a few words, so a table row fits on a line."""
    if isinstance(a, GroupFailed):
        f = a.failure
        return ("failed", f.replica_id, f.kind.value, "counted" if f.counted else "free", "blamed" if f.blamed else "-")
    return {Launch: lambda: ("launch", a.node, a.role.value, a.reason.value),
            Kill: lambda: ("kill", a.replica_id, a.reason.value),
            Capture: lambda: ("capture", a.replica_id, a.kind.value),
            DrainNode: lambda: ("drain", a.node, a.reason),
            RestartFromCheckpoint: lambda: ("restart", a.step, a.nodes_returned),
            RestartLighthouse: lambda: ("lighthouse",),
            Stop: lambda: ("stop", a.code, a.message.split(":")[0]),
            GroupFinished: lambda: ("finished", a.replica_id),
            SparesExhausted: lambda: ("exhausted", a.reason.value, a.missing),
            DrainRejected: lambda: ("rejected", a.name),
            NodeUnhealthy: lambda: ("unhealthy", a.node, a.output),
            Rewind: lambda: ("rewind", a.spike_step, a.checkpoint_step, a.skip_first, a.skip_last),
            RewindDeclined: lambda: ("declined", a.spike_step, a.why.split(":")[0])}[type(a)]()


@dataclass
class Case:
    name: str
    polls: list[View]
    want: list[list[tuple]]  # each poll's actions, briefly
    cfg: PolicyConfig = CFG
    state: PolicyState = field(default_factory=lambda: STARTED)


def hang_victims(beat: float) -> tuple[GroupView, ...]:
    """Every group silent for `beat` seconds, each waiting on its peers in a collective."""
    return tuple(replace(g, heartbeat=NOW - beat, in_collective=True) for g in pool())


# a spike at 120 rewound to the checkpoint of step 100; the new groups spike at 120 again
SAME_STEP_AGAIN = [
    View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                   g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)), checkpoints=(100, 120)),
    View(NOW + 1, (gone("g0", "a", -9), gone("g1", "b", -9), gone("g2", "c", -9))),
    View(NOW + 60, (grp("g3", "a", at=NOW + 60, role=Role.ACTIVE, spike_step=120, launched=NOW + 1),
                    grp("g4", "b", at=NOW + 60, role=Role.ACTIVE, spike_step=120, launched=NOW + 1),
                    grp("g5", "c", at=NOW + 60, role=Role.SPARE, launched=NOW + 1)), checkpoints=(100,))]
REWOUND_AND_RESTARTED = [
    [("kill", "g0", "rewind"), ("failed", "g0", "rewind", "free", "-"), ("kill", "g1", "rewind"),
     ("failed", "g1", "rewind", "free", "-"), ("kill", "g2", "rewind"), ("failed", "g2", "rewind", "free", "-"),
     ("rewind", 120, 100, 120, 124)],
    [("restart", 40, ()), ("launch", "a", "active", "restart"), ("launch", "b", "active", "restart"),
     ("launch", "c", "spare", "restart")]]

CASES = [
    Case("initial_launch_fills_actives_then_spares", [View(NOW)],
         [[("launch", "a", "active", "initial"), ("launch", "b", "active", "initial"),
           ("launch", "c", "spare", "initial")]], state=PolicyState()),
    Case("initial_without_nodes_for_the_actives_stops_no_nodes", [View(NOW)],
         [[("exhausted", "initial", 2), ("stop", 4, "not enough free nodes to start the job")]],
         cfg=FOUR_EXCLUDED, state=PolicyState.initial(FOUR_EXCLUDED)),
    Case("healthy_pool_needs_nothing", [View(NOW, pool())], [[]]),
    Case("crash_drains_the_node_and_a_spare_is_refilled", [View(NOW, pool(g0=gone("g0", "a", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "d", "spare", "spare")]]),
    Case("node_down_kills_its_group_and_drains_it", [View(NOW, pool(), down_nodes=frozenset({"b"}))],
         [[("kill", "g1", "node_down"), ("failed", "g1", "node_down", "counted", "blamed"), ("drain", "b", "node_down"),
           ("launch", "d", "spare", "spare")]]),
    Case("only_the_hangs_culprit_is_killed_not_the_peers_waiting_on_it",
         [View(NOW, pool(g0=grp("g0", "a", beat=40, in_collective=True), g1=grp("g1", "b", beat=40),
                         g2=grp("g2", "c", beat=40, in_collective=True)))],
         [[("capture", "g1", "hang"), ("kill", "g1", "hang"),
           ("failed", "g1", "hang", "counted", "blamed"), ("drain", "b", "hang"),
           ("launch", "d", "spare", "spare")]]),
    Case("waiting_victims_are_not_yet_a_deadlock", [View(NOW, hang_victims(beat=70))], [[]]),
    Case("deadlock_kills_every_stale_group_blames_no_node_and_restarts", [View(NOW, hang_victims(beat=100))],
         [[("capture", "g0", "deadlock"), ("kill", "g0", "deadlock"), ("failed", "g0", "deadlock", "counted", "-"),
           ("capture", "g1", "deadlock"), ("kill", "g1", "deadlock"), ("failed", "g1", "deadlock", "counted", "-"),
           ("capture", "g2", "deadlock"), ("kill", "g2", "deadlock"),
           ("failed", "g2", "deadlock", "counted", "-"), ("restart", 40, ()),
           ("launch", "d", "active", "restart"), ("launch", "e", "active", "restart"),
           ("exhausted", "restart", 1)]]),  # a, b, c: busy until their killed groups are seen gone
    # Review 12, F2: the deadlock rule looked at the stale groups only, so a group waiting in a collective
    # on a peer that was still progressing was killed every ~130 s as a "deadlock", counted, and
    # relaunched on the same node, until the budget stopped the job.
    Case("a_spare_healing_from_a_peer_is_not_a_deadlock",
         [View(NOW + t, pool(NOW + t, g2=GroupView("g2", "c", NOW - 10, progress_at=NOW - 5, in_collective=True)))
          for t in range(0, 201, 50)], [[]] * 5),
    Case("a_first_quorum_waiting_on_a_staging_peer_is_not_a_deadlock",
         [View(NOW + t, (GroupView("g0", "a", NOW - 10, in_collective=True),
                         GroupView("g1", "b", NOW - 10, progress_at=NOW + t - 1),
                         GroupView("g2", "c", NOW - 10, progress_at=NOW + t - 2))) for t in range(0, 201, 50)],
         [[]] * 5),
    Case("a_deadlock_waits_out_torchfts_own_timeout_when_it_is_longer",
         [View(NOW, hang_victims(beat=100)), View(NOW + 60, hang_victims(beat=100))],
         [[], [("capture", "g0", "deadlock"), ("kill", "g0", "deadlock"), ("failed", "g0", "deadlock", "counted", "-"),
               ("capture", "g1", "deadlock"), ("kill", "g1", "deadlock"), ("failed", "g1", "deadlock", "counted", "-"),
               ("capture", "g2", "deadlock"), ("kill", "g2", "deadlock"), ("failed", "g2", "deadlock", "counted", "-"), ("restart", 40, ()),
               ("launch", "d", "active", "restart"), ("launch", "e", "active", "restart"),
               ("exhausted", "restart", 1)]], cfg=replace(CFG, ft_timeout_s=120)),
    # Review 12, U2: a checkpoint save longer than the heartbeat timeout made the saver the only stale
    # group not waiting on peers (they wait for it in the next quorum): killed as a hang, its node
    # drained, the checkpoint never committed. The trainer reports progress before the save.
    Case("a_checkpoint_save_longer_than_the_heartbeat_timeout_is_not_a_hang",
         [View(NOW, pool(g0=grp("g0", "a", beat=50, progress_at=NOW - 49),
                         g1=grp("g1", "b", beat=50, in_collective=True), g2=grp("g2", "c", beat=50, in_collective=True)))],
         [[]]),
    Case("a_save_silent_past_the_startup_grace_is_a_hang",
         [View(NOW, pool(g0=grp("g0", "a", beat=80, progress_at=NOW - 70),
                         g1=grp("g1", "b", beat=80, in_collective=True), g2=grp("g2", "c", beat=80, in_collective=True)))],
         [[("capture", "g0", "hang"), ("kill", "g0", "hang"), ("failed", "g0", "hang", "counted", "blamed"),
           ("drain", "a", "hang"), ("launch", "d", "spare", "spare")]]),
    # Review 12, U3: the node of a group the policy had killed counted as free in the same poll, so a
    # deadlock's restart (no node blamed) launched on it at once; a kill that timed out (a process in
    # the kernel, the GPU still held) met the new group there. It stays busy until the group is gone.
    Case("a_node_whose_killed_group_is_still_alive_gets_no_new_group",
         [View(NOW, hang_victims(beat=100)),
          View(NOW + 5, (*hang_victims(beat=105), GroupView("g3", "d", NOW), GroupView("g4", "e", NOW))),
          View(NOW + 6, (*(gone(g, n, -9) for g, n in (("g0", "a"), ("g1", "b"), ("g2", "c"))),
                         GroupView("g3", "d", NOW), GroupView("g4", "e", NOW)))],
         [[("capture", "g0", "deadlock"), ("kill", "g0", "deadlock"), ("failed", "g0", "deadlock", "counted", "-"),
           ("capture", "g1", "deadlock"), ("kill", "g1", "deadlock"), ("failed", "g1", "deadlock", "counted", "-"),
           ("capture", "g2", "deadlock"), ("kill", "g2", "deadlock"), ("failed", "g2", "deadlock", "counted", "-"),
           ("restart", 40, ()), ("launch", "d", "active", "restart"), ("launch", "e", "active", "restart"),
           ("exhausted", "restart", 1)],
          [("kill", "g0", "deadlock"), ("kill", "g1", "deadlock"), ("kill", "g2", "deadlock")],
          [("launch", "a", "spare", "spare")]]),
    Case("startup_grace_counts_from_the_last_progress_report_not_the_launch",
         [View(NOW, pool(g2=GroupView("g2", "c", launched_at=NOW - 5000, progress_at=NOW - 10)))], [[]]),
    Case("starting_group_silent_past_its_grace_is_hung",
         [View(NOW, pool(g2=GroupView("g2", "c", launched_at=NOW - 100, progress_at=NOW - 70)))],
         [[("capture", "g2", "hang"), ("kill", "g2", "hang"),
           ("failed", "g2", "hang", "counted", "blamed"), ("drain", "c", "hang"),
           ("launch", "d", "spare", "spare")]]),
    Case("every_group_lost_restarts_from_the_checkpoint_fresh_nodes_first",
         [View(NOW, pool(g0=gone("g0", "a", -9), g1=gone("g1", "b", -9), g2=gone("g2", "c", -9)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("restart", 40, ("a", "b", "c")),
           ("launch", "d", "active", "restart"), ("launch", "e", "active", "restart"),
           ("launch", "a", "spare", "restart")]]),
    Case("a_restart_gives_back_only_the_nodes_its_incident_drained",
         [View(NOW, pool()[:2]), View(NOW + 1, (gone("g0", "a", -9), gone("g1", "b", -9)))],
         [[("exhausted", "spare", 1)],
          [("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"), ("restart", 40, ("a", "b")),
           ("launch", "a", "active", "restart"), ("launch", "b", "active", "restart")]],
         cfg=replace(CFG, nodes=("a", "b", "d")),
         state=replace(STARTED, drained=frozenset({"d"}), incident_since=NOW - 100,
                       failures=(failed(NOW - 100, "g9", "d", FailureKind.EXIT, 1),))),
    # CI of 667f376: both groups were SIGKILLed together, the supervisor saw one exit a poll before the
    # other and started a replacement between them; the job then counted as never lost (no restart
    # event, its drained nodes kept). A replacement that has not finished a step holds nothing.
    Case("losses_a_poll_apart_with_a_replacement_between_are_a_restart_from_the_checkpoint",
         [View(NOW, pool(g0=gone("g0", "a", -9))),
          View(NOW + 1, (gone("g1", "b", -9), gone("g2", "c", -9), GroupView("g3", "d", launched_at=NOW)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "d", "spare", "spare")],
          [("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("restart", 40, ("a", "b", "c")),
           ("launch", "e", "active", "restart"), ("launch", "a", "spare", "restart")]]),
    Case("a_loss_before_any_step_is_refilled_not_a_restart",
         [View(NOW, (gone("g0", "a", 1, step=0), GroupView("g1", "b", launched_at=NOW - 5),
                     GroupView("g2", "c", launched_at=NOW - 5)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "d", "spare", "spare")]]),
    Case("a_restarted_group_lost_while_its_peers_start_is_refilled_not_a_second_restart",
         [View(NOW, pool(g0=gone("g0", "a", -9), g1=gone("g1", "b", -9), g2=gone("g2", "c", -9))),
          View(NOW + 1, (gone("g3", "d", 1, step=0), GroupView("g4", "e", launched_at=NOW),
                         GroupView("g5", "a", launched_at=NOW)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("restart", 40, ("a", "b", "c")),
           ("launch", "d", "active", "restart"), ("launch", "e", "active", "restart"),
           ("launch", "a", "spare", "restart")],
          [("failed", "g3", "exit", "counted", "blamed"), ("drain", "d", "exit"), ("launch", "b", "spare", "spare")]]),
    Case("every_group_lost_with_the_budget_spent_stops_instead_of_restarting",
         [View(NOW, pool(g0=gone("g0", "a", -9), g1=gone("g1", "b", -9), g2=gone("g2", "c", -9)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("stop", 3, "crash loop")]],
         cfg=budget(max_failures=3)),
    Case("every_group_lost_without_nodes_to_restart_stops_no_nodes",
         [View(NOW, (gone("g0", "a", 1), gone("g1", "b", 1)), down_nodes=frozenset({"b"}))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"), ("exhausted", "restart", 1),
           ("stop", 4, "every group is lost and there are not enough nodes to restart")]],
         cfg=replace(CFG, nodes=("a", "b"), spare_groups=0)),
    Case("spares_exhausted_is_recorded_once_and_the_job_goes_on",
         [View(NOW, pool(g2=gone("g2", "c", 1))), View(NOW + 1, pool(NOW + 1)[:2])],
         [[("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("exhausted", "spare", 1)], []],
         cfg=THREE_NODES),
    Case("too_few_groups_for_a_quorum_and_no_node_stops_no_nodes",
         [View(NOW, pool(g0=gone("g0", "a", 1), g2=gone("g2", "c", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("exhausted", "spare", 2),
           ("stop", 4, "too few groups left to form a quorum and no free node to start one")]], cfg=THREE_NODES),
    # Review of issue 11, findings 4 and 5: exit code 2 is the trainer refusing its config (a resume with
    # another config_hash, a corpus short of the global batch). Every restart would be refused the same
    # way: the job stops at once, exit 2, and no node is drained for it (they drained and crash-looped).
    Case("a_group_refusing_its_config_stops_the_job_and_drains_no_node", [View(NOW, pool(g0=gone("g0", "a", 2)))],
         [[("failed", "g0", "exit", "counted", "-"), ("stop", 2, "g0 refused its config; see its log")]]),
    Case("every_group_refusing_its_config_stops_once_not_a_restart",
         [View(NOW, pool(g0=gone("g0", "a", 2), g1=gone("g1", "b", 2), g2=gone("g2", "c", 2)))],
         [[("failed", "g0", "exit", "counted", "-"), ("failed", "g1", "exit", "counted", "-"),
           ("failed", "g2", "exit", "counted", "-"), ("stop", 2, "g0 refused its config; see its log")]]),
    # Issue 13, item 5: the shell runs the health gate on the nodes a decision would launch on and
    # decides again with the failures in View.unhealthy_nodes (found this poll; the policy remembers).
    Case("unhealthy_nodes_are_never_launched_on_reported_once_and_spend_no_budget",
         [View(NOW, unhealthy_nodes={"a": "gpu 0: ECC", "b": "cache: 0 bytes free"}),
          View(NOW + 1, (grp("g0", "c", at=NOW + 1), gone("g1", "d", 1), grp("g2", "e", at=NOW + 1)),
               unhealthy_nodes={"a": "gpu 0: ECC"})],
         [[("unhealthy", "a", "gpu 0: ECC"), ("unhealthy", "b", "cache: 0 bytes free"),
           ("launch", "c", "active", "initial"), ("launch", "d", "active", "initial"),
           ("launch", "e", "spare", "initial")],
          [("failed", "g1", "exit", "counted", "blamed"), ("drain", "d", "exit"), ("exhausted", "spare", 1)]],
         cfg=budget(max_failures=2), state=PolicyState()),
    Case("a_spare_refill_onto_an_unhealthy_node_goes_to_the_next_node",
         [View(NOW, pool(g0=gone("g0", "a", 1)), unhealthy_nodes={"d": "site check: exit 1"})],
         [[("unhealthy", "d", "site check: exit 1"), ("failed", "g0", "exit", "counted", "blamed"),
           ("drain", "a", "exit"), ("launch", "e", "spare", "spare")]]),
    Case("too_few_healthy_nodes_stop_the_job_no_nodes",
         [View(NOW, unhealthy_nodes={"b": "timed out", "c": "timed out"})],
         [[("unhealthy", "b", "timed out"), ("unhealthy", "c", "timed out"), ("exhausted", "initial", 2),
           ("stop", 4, "not enough free nodes to start the job")]], cfg=THREE_NODES, state=PolicyState()),
    Case("an_unhealthy_node_is_not_given_back_by_a_restart",
         [View(NOW, (gone("g0", "a", -9), gone("g1", "b", -9)), unhealthy_nodes={"c": "gpu 1: 2% free"})],
         [[("unhealthy", "c", "gpu 1: 2% free"), ("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"), ("restart", 40, ("a", "b")),
           ("launch", "a", "active", "restart"), ("launch", "b", "active", "restart")]],
         cfg=replace(THREE_NODES, spare_groups=0)),
    Case("drain_request_kills_its_group_as_a_planned_drain", [View(NOW, pool(), drain_requests=("b",))],
         [[("kill", "g1", "drained"), ("failed", "g1", "drained", "free", "-"), ("drain", "b", "drain requested"),
           ("launch", "d", "spare", "spare")]]),
    Case("a_node_with_a_drain_request_gets_no_new_spare",
         [View(NOW, pool(g0=gone("g0", "a", 1)), drain_requests=("d",))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("drain", "d", "drain requested"),
           ("launch", "e", "spare", "spare")]]),
    Case("a_drained_node_is_never_launched_on", [View(NOW, pool(g0=gone("g0", "a", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "e", "spare", "spare")]],
         state=replace(STARTED, drained=frozenset({"d"}))),
    Case("planned_drains_never_count_toward_the_budget",
         [View(NOW, pool(), drain_requests=("b",)),
          View(NOW + 1, (grp("g0", "a", at=NOW + 1), grp("g2", "c", at=NOW + 1),
                         grp("g3", "d", at=NOW + 1, launched=NOW)), drain_requests=("b", "c")),
          View(NOW + 2, (grp("g0", "a", at=NOW + 2), grp("g3", "d", at=NOW + 2, launched=NOW),
                         grp("g4", "e", at=NOW + 2, launched=NOW + 1)), drain_requests=("b", "c", "d"))],
         [[("kill", "g1", "drained"), ("failed", "g1", "drained", "free", "-"), ("drain", "b", "drain requested"),
           ("launch", "d", "spare", "spare")],
          [("kill", "g2", "drained"), ("failed", "g2", "drained", "free", "-"), ("drain", "c", "drain requested"),
           ("launch", "e", "spare", "spare")],
          [("kill", "g3", "drained"), ("failed", "g3", "drained", "free", "-"), ("drain", "d", "drain requested"),
           ("exhausted", "spare", 1)]],
         cfg=budget(max_failures=2, crash_loop_limit=2)),
    Case("failure_budget_by_count_within_the_window", [View(NOW, pool(g0=gone("g0", "a", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("stop", 3, "crash loop")]],
         cfg=budget(max_failures=3, failure_window_s=3600),
         state=replace(STARTED, drained=frozenset({"d", "e"}), failures=(
             failed(NOW - 2000, "g7", "d", FailureKind.HANG), failed(NOW - 1000, "g8", "e", FailureKind.EXIT, 1)))),
    Case("failures_older_than_the_window_are_forgotten", [View(NOW, pool(g0=gone("g0", "a", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("exhausted", "spare", 1)]],
         cfg=budget(max_failures=3, failure_window_s=3600),
         state=replace(STARTED, drained=frozenset({"d", "e"}), failures=(
             failed(NOW - 4000, "g7", "d", FailureKind.HANG), failed(NOW - 1000, "g8", "e", FailureKind.EXIT, 1)))),
    Case("alternating_kinds_hang_exit_hang_stop_at_the_budget",
         [View(NOW, pool(g1=grp("g1", "b", beat=40))),
          View(NOW + 10, (gone("g0", "a", 1), grp("g2", "c", at=NOW + 10), grp("g3", "d", at=NOW + 10, launched=NOW))),
          View(NOW + 20, (grp("g2", "c", at=NOW + 20, beat=40), grp("g3", "d", at=NOW + 20, launched=NOW),
                          grp("g4", "e", at=NOW + 20, launched=NOW + 10)))],
         [[("capture", "g1", "hang"), ("kill", "g1", "hang"),
           ("failed", "g1", "hang", "counted", "blamed"), ("drain", "b", "hang"),
           ("launch", "d", "spare", "spare")],
          [("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "e", "spare", "spare")],
          [("capture", "g2", "hang"), ("kill", "g2", "hang"),
          ("failed", "g2", "hang", "counted", "blamed"), ("drain", "c", "hang"),
           ("stop", 3, "crash loop")]],
         cfg=budget(max_failures=3)),
    Case("the_same_failure_on_three_fresh_nodes_is_a_crash_loop",
         [View(NOW, (gone("g0", "a", 1, step=15),)),
          View(NOW + 30, (gone("g1", "b", 1, launched=NOW + 1, step=15),)),
          View(NOW + 60, (gone("g2", "c", 1, launched=NOW + 31, step=15),))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("restart", 15, ("a",)),
           ("launch", "b", "active", "restart")],
          [("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"), ("restart", 15, ("b",)),
           ("launch", "c", "active", "restart")],
          [("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("stop", 3, "crash loop")]],
         cfg=ONE_GROUP),
    Case("groups_failing_together_are_one_retry_not_a_crash_loop",
         [View(NOW, pool(g0=gone("g0", "a", 1), g1=gone("g1", "b", 1)))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("launch", "d", "active", "spare"), ("launch", "e", "spare", "spare")]],
         cfg=budget(crash_loop_limit=2)),
    Case("lighthouse_down_is_restarted_and_its_quorum_timeouts_drain_no_node",
         [View(NOW, tuple(replace(g, heartbeat=NOW - 40) for g in pool()), lighthouse=DOWN),
          View(NOW + 12, pool(NOW + 12, g0=gone("g0", "a", 1), g1=gone("g1", "b", 1)))],
         [[("lighthouse",)],
          [("failed", "g0", "exit", "free", "-"), ("failed", "g1", "exit", "free", "-"),
           ("launch", "a", "active", "spare"), ("launch", "b", "spare", "spare")]],
         cfg=budget(max_failures=2)),
    Case("a_lighthouse_that_keeps_dying_spends_the_budget",
         [View(NOW, pool(), lighthouse=DOWN), View(NOW + 1, pool(NOW + 1)), View(NOW + 2, pool(NOW + 2), lighthouse=DOWN)],
         [[("lighthouse",)], [], [("lighthouse",), ("stop", 3, "crash loop")]], cfg=budget(max_failures=2)),
    # Review 12, F5: a restart that failed (its port taken) was a new counted failure at every poll: a
    # healthy job stopped as a "crash loop" in seconds. One outage is one failure, retried with backoff.
    Case("a_lighthouse_that_cannot_be_restarted_is_one_failure_not_a_crash_loop",
         [View(NOW + t, pool(NOW + t), lighthouse=DOWN) for t in (0, 0.5, 1, 2, 3, 5, 7, 14, 15, 31, 60, 61)],
         [[("lighthouse",)], [], [("lighthouse",)], [], [("lighthouse",)], [], [("lighthouse",)], [],  # 1, 2, 4 s
          [("lighthouse",)], [("lighthouse",)], [], [("lighthouse",)]], cfg=budget(max_failures=2)),  # 8, 16, 30
    Case("a_lighthouse_down_past_its_restart_timeout_stops_the_job_saying_so",
         [View(NOW, pool(), lighthouse=DOWN), View(NOW + 301, pool(NOW + 301), lighthouse=DOWN)],
         [[("lighthouse",)], [("stop", 5, "the Lighthouse has been down for 301 s through 1 restarts")]]),
    # A launch the launcher failed (its OSError on the node) was only counted as a shell error: the next
    # poll ordered the same launch on the same free node, forever, and no budget was spent. It is now a
    # failure of its node: drained, counted, the retry goes elsewhere.
    Case("a_failed_launch_drains_its_node_and_the_retry_goes_to_another_node",
         [View(NOW, pool()[:2], launch_failures=(LaunchFailure("g3", "c", NOW - 1, "OSError: [Errno 28] full"),))],
         [[("failed", "g3", "launch", "counted", "blamed"), ("drain", "c", "launch"),
           ("launch", "d", "spare", "spare")]]),
    Case("a_launcher_failing_everywhere_stops_as_a_crash_loop_not_a_tight_loop",
         [View(NOW), View(NOW + 1, launch_failures=(LaunchFailure("g0", "a", NOW + 0.1, "OSError: fork"),)),
          View(NOW + 2, launch_failures=(LaunchFailure("g1", "b", NOW + 1.1, "OSError: fork"),)),
          View(NOW + 3, launch_failures=(LaunchFailure("g2", "c", NOW + 2.1, "OSError: fork"),))],
         [[("launch", "a", "active", "initial")],
          [("failed", "g0", "launch", "counted", "blamed"), ("drain", "a", "launch"),
           ("launch", "b", "active", "initial")],
          [("failed", "g1", "launch", "counted", "blamed"), ("drain", "b", "launch"),
           ("launch", "c", "active", "initial")],
          [("failed", "g2", "launch", "counted", "blamed"), ("drain", "c", "launch"), ("stop", 3, "crash loop")]],
         cfg=ONE_GROUP, state=PolicyState()),
    Case("launches_failing_one_after_another_in_one_poll_are_fresh_node_retries",
         [View(NOW + 1, launch_failures=tuple(LaunchFailure(f"g{i}", n, NOW + 0.1 * i, "OSError: fork")
                                              for i, n in enumerate("abc")))],
         [[("failed", "g0", "launch", "counted", "blamed"), ("drain", "a", "launch"),
           ("failed", "g1", "launch", "counted", "blamed"), ("drain", "b", "launch"),
           ("failed", "g2", "launch", "counted", "blamed"), ("drain", "c", "launch"), ("stop", 3, "crash loop")]]),
    Case("a_restart_does_not_give_back_a_node_whose_launch_failed",
         [View(NOW, pool(g0=gone("g0", "a", -9))),
          View(NOW + 1, (gone("g1", "b", -9), gone("g2", "c", -9)),
               launch_failures=(LaunchFailure("g3", "d", NOW + 0.5, "OSError: fork"),))],
         [[("failed", "g0", "exit", "counted", "blamed"), ("drain", "a", "exit"), ("launch", "d", "spare", "spare")],
          [("failed", "g3", "launch", "counted", "blamed"), ("drain", "d", "launch"),
           ("failed", "g1", "exit", "counted", "blamed"), ("drain", "b", "exit"),
           ("failed", "g2", "exit", "counted", "blamed"), ("drain", "c", "exit"), ("restart", 40, ("a", "b", "c")),
           ("launch", "e", "active", "restart"), ("launch", "a", "active", "restart"),
           ("launch", "b", "spare", "restart")]]),
    # Review 12, F3: a launch config the head could not write (ENOSPC on the supervisor's disk) was
    # blamed on the node: a node drained per poll, and 3 "fresh nodes" stopped a healthy job in ~4 s.
    Case("a_launch_config_the_head_cannot_write_blames_no_node_and_spends_no_budget",
         [View(NOW + i, pool(NOW + i)[:2], launch_failures=(LaunchFailure("g3", "c", NOW + i - 0.5, ENOSPC,
                                                                          on_node=False),)) for i in range(4)],
         [[("launch", "c", "spare", "spare")]] * 4, cfg=budget(max_failures=2, crash_loop_limit=2)),
    Case("a_first_launch_the_head_cannot_write_is_launched_again_not_restarted",
         [View(NOW), View(NOW + 1, launch_failures=tuple(LaunchFailure(f"g{i}", n, NOW + 0.1, ENOSPC, on_node=False)
                                                         for i, n in enumerate("abc")))],
         [[("launch", "a", "active", "initial"), ("launch", "b", "active", "initial"),
           ("launch", "c", "spare", "initial")]] * 2, state=PolicyState()),
    Case("bad_drain_names_are_rejected_once_and_touch_nothing",
         [View(NOW, pool(), drain_requests=("..", "", "a/../b", "zz")),
          View(NOW + 1, pool(NOW + 1), drain_requests=("..", "", "a/../b", "zz"))],
         [[("rejected", ".."), ("rejected", ""), ("rejected", "a/../b"), ("rejected", "zz")], []]),
    Case("every_group_finished_stops_done",
         [View(NOW, pool(g0=gone("g0", "a", 0, step=300), g1=gone("g1", "b", 0, step=300),
                         g2=gone("g2", "c", 0, step=300)))],
         [[("finished", "g0"), ("finished", "g1"), ("finished", "g2"),
           ("stop", 0, "all groups finished at step 300")]]),
    Case("a_finishing_job_is_not_refilled", [View(NOW, pool(g0=gone("g0", "a", 0)))], [[("finished", "g0")]]),
    Case("a_group_that_survived_its_kill_is_killed_again_not_failed_twice",
         [View(NOW, pool() + (grp("g3", "d", launched=NOW - 5),))], [[("kill", "g1", "hang")]],
         state=replace(STARTED, ended=frozenset({"g1"}), failures=(failed(NOW - 5, "g1", "b", FailureKind.HANG),))),
    Case("the_exit_of_a_group_the_policy_killed_is_not_a_second_failure",
         [View(NOW, pool(g1=gone("g1", "b", -9)) + (grp("g3", "d", launched=NOW - 5),))], [[]],
         state=replace(STARTED, ended=frozenset({"g1"}), failures=(failed(NOW - 5, "g1", "b", FailureKind.HANG),))),
    # issue 14, item 2: a critical loss spike every contributing group agrees on (remediation.py)
    Case("an_agreed_spike_rewinds_every_group_blaming_no_node_and_spending_no_budget",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)), checkpoints=(80, 100, 120))],
         [[("kill", "g0", "rewind"), ("failed", "g0", "rewind", "free", "-"), ("kill", "g1", "rewind"),
           ("failed", "g1", "rewind", "free", "-"), ("kill", "g2", "rewind"), ("failed", "g2", "rewind", "free", "-"),
           ("rewind", 120, 100, 120, 124), ("restart", 40, ()), ("launch", "d", "active", "restart"),
           ("launch", "e", "active", "restart"), ("exhausted", "restart", 1)]], cfg=REWIND),
    Case("a_rewind_with_no_other_nodes_waits_for_its_groups_to_exit_instead_of_stopping",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)), checkpoints=(100, 110, 120)),
          View(NOW + 1, (gone("g0", "a", -9), gone("g1", "b", -9), gone("g2", "c", -9)))],
         [[("kill", "g0", "rewind"), ("failed", "g0", "rewind", "free", "-"), ("kill", "g1", "rewind"),
           ("failed", "g1", "rewind", "free", "-"), ("kill", "g2", "rewind"), ("failed", "g2", "rewind", "free", "-"),
           ("rewind", 120, 110, 120, 124)],
          [("restart", 40, ()), ("launch", "a", "active", "restart"), ("launch", "b", "active", "restart"),
           ("launch", "c", "spare", "restart")]], cfg=replace(REWIND, nodes=("a", "b", "c"))),
    Case("one_groups_spike_is_not_the_runs_nor_is_a_spares_or_a_disagreement",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120))),
          View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=130))),
          View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g2=grp("g2", "c", role=Role.SPARE, spike_step=120)))], [[], [], []], cfg=REWIND),
    Case("with_page_an_agreed_spike_is_recorded_once_and_pages_as_before",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)))] * 2,
         [[("declined", 120, 'remediation.loss_spike = "page"')], []]),
    # review 14b, N1: remediation.json could not be written (the shell says why): declined, nothing
    # killed, no rewind spent (the old policy never heard of it and killed every group)
    Case("a_rewind_the_shell_could_not_record_is_declined_and_kills_nothing",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)), checkpoints=(80, 100, 120),
               rewind_refused="remediation.json could not be written: no space")],
         [[("declined", 120, "remediation.json could not be written")]], cfg=REWIND),
    Case("past_max_rewinds_a_new_spike_only_pages",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=180),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=180)))],
         [[("declined", 180, "max_rewinds = 1 already spent")]], cfg=REWIND,
         state=replace(STARTED, rewinds=1, spikes_seen=frozenset({120}))),
    # review of issue 14, F2: a rewind past every kept checkpoint restarted the run from step 0
    Case("a_rewind_with_no_checkpoint_old_enough_is_declined_and_keeps_every_group",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)), checkpoints=(112, 116, 120))] * 2,
         [[("declined", 120, "no committed checkpoint at or before step 110 (oldest kept")], []], cfg=REWIND),
    # review of issue 14, F7: after a rewind the run goes through the same step numbers again; a
    # spike there (a skip too short) was dropped as "seen": no second rewind, no record
    Case("a_spike_at_the_same_step_after_a_rewind_rewinds_again",
         SAME_STEP_AGAIN, [*REWOUND_AND_RESTARTED, [
             ("kill", "g3", "rewind"), ("failed", "g3", "rewind", "free", "-"), ("kill", "g4", "rewind"),
             ("failed", "g4", "rewind", "free", "-"), ("kill", "g5", "rewind"), ("failed", "g5", "rewind", "free", "-"),
             ("rewind", 120, 100, 120, 124)]],
         cfg=replace(REWIND, nodes=("a", "b", "c"), remediation=replace(REWIND.remediation, max_rewinds=2))),
    Case("a_spike_at_the_same_step_after_the_last_rewind_allowed_is_recorded",
         SAME_STEP_AGAIN, [*REWOUND_AND_RESTARTED, [("declined", 120, "max_rewinds = 1 already spent")]],
         cfg=replace(REWIND, nodes=("a", "b", "c"))),
    Case("a_rewind_waits_for_the_checkpoint_listing_and_kills_nothing_before_it",
         [View(NOW, pool(g0=grp("g0", "a", role=Role.ACTIVE, spike_step=120),
                         g1=grp("g1", "b", role=Role.ACTIVE, spike_step=120)))],
         [[]], cfg=REWIND),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_policy_table(case: Case):
    state, got = case.state, []
    for view in case.polls:
        state, actions = decide(state, view, case.cfg)
        got.append([brief(a) for a in actions])
    assert got == case.want


def test_the_table_covers_at_least_twenty_situations():
    assert len({c.name for c in CASES}) == len(CASES) >= 20


def test_node_states_show_a_drain_while_its_group_winds_down():
    state, _ = decide(STARTED, View(NOW, pool(), drain_requests=("b",)), CFG)
    states = node_states(state, View(NOW, pool()), CFG)  # the kill has not been carried out yet
    assert states == {"a": NodeState.BUSY, "b": NodeState.DRAINING, "c": NodeState.BUSY, "d": NodeState.FREE,
                      "e": NodeState.FREE}
    after = node_states(state, View(NOW + 1, pool(NOW + 1, g1=gone("g1", "b", -9))), CFG)
    assert after["b"] is NodeState.DRAINED


def test_a_crash_loop_of_failed_launches_names_the_error():
    """The stop a person is paged for says what the launcher said, not only "launch"."""
    case = next(c for c in CASES if c.name == "a_launcher_failing_everywhere_stops_as_a_crash_loop_not_a_tight_loop")
    state = case.state
    for view in case.polls:
        state, actions = decide(state, view, case.cfg)
    assert actions[-1] == Stop(3, "crash loop: the same failure (launch) on 3 fresh nodes (a, b, c); not spending "
                                  "more spares; last error: OSError: fork")


def test_budget_verdict_counts_only_counted_failures_inside_its_window():
    """Judged alone (the policy also forgets old failures): outside the window or uncounted is spent on nothing."""
    two = FailureBudget(max_failures=2)
    old, recent = failed(NOW - 3601, "g0", "a", FailureKind.HANG), failed(NOW - 10, "g1", "b", FailureKind.EXIT, 1)
    planned = replace(failed(NOW - 5, "g2", "c", FailureKind.DRAINED), counted=False, blamed=False)
    assert budget_verdict((old, recent, planned), NOW, two) is None
    assert budget_verdict((replace(old, at=NOW - 3599), recent), NOW, two).startswith("crash loop: 2 failures")


@pytest.mark.parametrize("make,field", [
    (lambda: FailureBudget(max_failures=1), "max_failures"),
    (lambda: FailureBudget(failure_window_s=0), "failure_window_s"),
    (lambda: FailureBudget(crash_loop_limit=1), "crash_loop_limit"),
    (lambda: PolicyConfig(nodes=("a", "../b")), "nodes[1]"),
    (lambda: PolicyConfig(nodes=("a",), lighthouse_grace_s=-1), "lighthouse_grace_s"),
])
def test_bad_policy_config_names_its_key(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.field == field


def test_policy_import_contract():
    """A head or login node decides without torch: the policy loads nothing but the stdlib and itself."""
    code = ("import sys, watchtower.supervisor.policy\n"
            "mine = {'watchtower', 'watchtower.validation', 'watchtower.supervisor', 'watchtower.supervisor.policy',"
            " 'watchtower.supervisor.policy_types', 'watchtower.supervisor.failure_budget',"
            " 'watchtower.supervisor.pool', 'watchtower.supervisor.hangs', 'watchtower.supervisor.policy_view',"
            " 'watchtower.supervisor.remediation'}\n"
            "heavy = ('torch', 'torchft', 'numpy', 'prometheus_client')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy"
            " or (m.startswith('watchtower') and m not in mine))\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
