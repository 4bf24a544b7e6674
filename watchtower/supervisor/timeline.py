"""The job's timeline as the loop sees it: each incident's course, and the goodput ledger.

An incident opens at the first failure while none is open and gathers every failure until the job
is whole again: detected (the policy's decision; onset: the failed group's last sign of life for a
hang, else the poll interval it died in) → killed (the kill sent; an exit needs none) → quorum back
(a full quorum committed a step after the failure) → refilled (the newest replacement spare finished
a step) → recomputed (after a restart from a checkpoint, the job is past the step it had reached).
Then one `incident` event carries the timeline and the incident's badput by cause. An incident
still open when the job ends (a crash loop, a stop signal) leaves its `group_failed` events only.

The phase each poll interval is in (startup, running, recovery, recompute, final save) is judged
here, at the interval's start, and handed with the ranks' counters to `goodput.advance`; the split
itself, and why each cause is measured where it is, are in goodput.py. Cost per poll: a pass over
the groups and a few dict operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from watchtower.supervisor.events import EventLog
from watchtower.supervisor.goodput import BADPUT, Cause, Ledger, Phase, Tick, advance, detected

if TYPE_CHECKING:
    from watchtower.supervisor.observe import Group
    from watchtower.supervisor.policy_types import Failure

INCIDENT_CAUSES = (Cause.DETECTION, Cause.RECOVERY, Cause.RECOMPUTE)


def judge_phase(stepped: bool, recovering: bool, step: int, recompute_until: int, last_step: int) -> Phase:
    """The job's phase from what the loop knows now; `step`: the highest step a running group is at.

    >>> judge_phase(stepped=True, recovering=False, step=45, recompute_until=50, last_step=100).value
    'recompute'
    """
    if not stepped:
        return Phase.STARTUP
    if recovering:
        return Phase.RECOVERY
    if step >= last_step:
        return Phase.FINAL_SAVE
    return Phase.RECOMPUTE if step <= recompute_until else Phase.RUNNING


def idle_share(groups: list[Group]) -> float:
    """Of the running groups, the share contributing no gradients (hot spares, groups still starting)."""
    running = [g for g in groups if g.running]
    return sum(1 for g in running if not g.participating) / len(running) if running else 0.0


@dataclass
class Incident:
    replica_id: str
    reason: str
    onset: float
    detected: float
    killed: float | None = None
    quorum_back: float | None = None
    baseline: dict[str, int] = field(default_factory=dict)  # each running group's step when it began
    opened: Mapping[Cause, float] | None = None  # the ledger's totals at its detection


class Timeline:
    """Kept by the loop; `track` once per poll, after the actions. `last_step`: the trainer's train.steps."""

    def __init__(self, started: float, active_target: int, last_step: int):
        self.active_target, self.last_step = active_target, last_step
        self.ledger = Ledger.begin(started)
        self.phase, self.spare_share = Phase.STARTUP, 0.0
        self.stepped = False  # a group has finished a step: the startup is over
        self.recovery_s: float | None = None
        self.open: Incident | None = None
        self.recompute_until = 0  # the highest step before the last restart: redoing up to it is recompute
        self._onsets: list[float | None] = []  # failures decided this poll, applied to the ledger in `track`
        self._kills: dict[str, float] = {}
        self._refill_since: float | None = None
        self._refill_group: str | None = None
        self._refilled: float | None = None
        self._prev = started
        self._ranks: dict = {}  # the participating groups' counters at the last poll

    # ---- what the executor reports ----------------------------------------------------------------

    def failed(self, failure: Failure, onset: float | None, groups: Mapping[str, Group]) -> None:
        """A lost group; `onset` None: it was lost since the previous poll."""
        self._onsets.append(onset)
        if self.open is None:
            self.open = Incident(failure.replica_id, failure.kind.value, onset if onset is not None else self._prev,
                                 failure.at, self._kills.get(failure.replica_id),
                                 baseline={r: g.step for r, g in groups.items() if g.running})
            self._refilled = None

    def killed(self, replica_id: str, at: float) -> None:
        self._kills[replica_id] = at  # the policy orders the kill just before it records the failure

    def refilling(self, replica_id: str, at: float) -> None:
        self._refill_since = self._refill_since or at
        self._refill_group = replica_id

    def restarted(self, step: int) -> None:
        self.recompute_until = max(self.recompute_until, step)

    # ---- once per poll ------------------------------------------------------------------------------

    def track(self, now: float, groups: Mapping[str, Group], events: EventLog) -> None:
        ranks = self._ranks = {r: g.times for r, g in groups.items() if g.running and g.participating}
        self.ledger = advance(self.ledger, Tick(now, self.phase, self.spare_share, ranks))
        for onset in self._onsets:
            if self.open is not None and self.open.opened is None:
                self.open.opened = dict(self.ledger.seconds)
            self.ledger = detected(self.ledger, onset if onset is not None else self._prev)
        self._onsets.clear()
        self._kills.clear()
        self._note_quorum(now, groups, events)
        self._note_refill(now, groups, events)
        step = max((g.step for g in groups.values() if g.running), default=0)
        if self.open is not None and self.open.quorum_back is not None and self._refill_since is None \
                and step > self.recompute_until:
            self._close(now, events)
        self.stepped = self.stepped or any(g.heartbeat is not None for g in groups.values())
        self.phase = judge_phase(self.stepped, self.open is not None and self.open.quorum_back is None, step,
                                 self.recompute_until, self.last_step)
        self.spare_share = idle_share(list(groups.values()))
        self._prev = now

    def _note_quorum(self, now: float, groups: Mapping[str, Group], events: EventLog) -> None:
        """Back when every active seat is filled by a group in a full quorum and one of them
        committed a step since the incident began (a group new since then: any step at all)."""
        inc = self.open
        if inc is None or inc.quorum_back is not None:
            return
        active = [(r, g) for r, g in groups.items() if g.running and g.participating]
        if len(active) < self.active_target or any(g.participants < self.active_target for _, g in active):
            return
        if not any(g.step > inc.baseline.get(r, 0) for r, g in active):
            return
        inc.quorum_back = now
        self.recovery_s = now - inc.detected
        events.emit("recovered", f"quorum back at {self.active_target} groups after {self.recovery_s:.1f}s",
                    seconds=round(self.recovery_s, 3), step=max(g.step for _, g in active))

    def _note_refill(self, now: float, groups: Mapping[str, Group], events: EventLog) -> None:
        newest = groups.get(self._refill_group or "")
        if self._refill_since is not None and newest is not None and newest.running \
                and newest.heartbeat is not None and newest.heartbeat > newest.launched_at:
            events.emit("spares_refilled", f"spare pool full again after {now - self._refill_since:.1f}s",
                        seconds=round(now - self._refill_since, 3))
            self._refilled, self._refill_since, self._refill_group = now, None, None

    def _close(self, now: float, events: EventLog) -> None:
        inc, self.open = self.open, None
        opened = inc.opened or self.ledger.seconds
        badput = {c.value: round(self.ledger.seconds[c] - opened[c], 3) for c in INCIDENT_CAUSES}
        timeline = {"onset": inc.onset, "detected": inc.detected, "killed": inc.killed,
                    "quorum_back": inc.quorum_back, "refilled": self._refilled, "closed": now}
        course = ", ".join(f"{k} +{v - inc.onset:.1f}s" for k, v in timeline.items() if v is not None and k != "onset")
        events.emit("incident", f"{inc.replica_id} {inc.reason}: {course}; badput "
                    + ", ".join(f"{c} {s:.1f}s" for c, s in badput.items()),
                    replica_id=inc.replica_id, reason=inc.reason, badput_seconds=badput,
                    timeline={k: None if v is None else round(v, 3) for k, v in timeline.items()})

    # ---- what /metrics and the summary show -----------------------------------------------------------

    def finish(self, now: float) -> None:
        """Account up to `now` at the job's end: running time is the tail (final save, exits), and
        what was pending is split by the last counters (or is collective), so the causes add up to
        the wall time exactly."""
        tail = Phase.FINAL_SAVE if self.phase is Phase.RUNNING else self.phase
        self.ledger = advance(self.ledger, Tick(now, tail, ranks=self._ranks))

    def breakdown(self) -> dict[str, float]:
        """Seconds by cause, productive first; running time not split yet (no step finished in it)
        is in none of them until it is."""
        return {c.value: self.ledger.seconds[c] for c in (Cause.PRODUCTIVE, *BADPUT)}
