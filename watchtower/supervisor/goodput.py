"""Goodput: the job's wall time split into productive step time and badput by cause, as pure functions.

    ledger = Ledger.begin(started)
    ledger = advance(ledger, Tick(now, phase, spare_share, ranks))   # every poll
    ledger = detected(ledger, onset)                                  # when a failure is decided

Every wall second goes to exactly one cause, so the causes always add up to the wall time (the
tests hold every row to it). Where each cause is measured, and why there:

Supervisor-side, from its own timeline (no rank can see these: a rank does not know it is a spare
being paid for, that its peer died, or that the steps it runs were run once before):
  startup      the job's start until its first finished step
  detection    a failure's onset (the hung group's last sign of life; for an exit, the poll interval
               it died in) until the supervisor's decision
  recovery     the decision until a full quorum finishes a step again
  recompute    after a restart from a checkpoint (or a rewind): until the job is past the highest
               step it had reached, every step is one it already paid for
  idle_spare   while running, the share of the groups holding nodes that contribute nothing (hot
               spares in sync, a refilled spare still starting): capacity paid as insurance
  checkpoint   also the tail: the last step until the job ends (the final save and the exits)
Rank-side, from each participating group's rank 0 Monitor counters (the supervisor scrapes every
0.5 s and cannot tell a slow step from a wait inside it; the rank's own clocks can): the rest of
the running time is split in the proportions its step time had over the same span:
  data_wait    waiting for the next batch             (watchtower_data_wait_seconds_total)
  checkpoint   saving a checkpoint                    (watchtower_checkpoint_save_seconds_total)
  collective   waiting on the other replica groups    (watchtower_collective_wait_seconds_total)
  productive   what is left of the step time          (watchtower_step_seconds_total)
One job from several groups: what one group spends saving or waiting for data, its peers wait out in
the next collective. So data wait and checkpoint take the largest share any group reports, and
collective the smallest: only what every group spent in collectives is a stall of the collectives
themselves; the rest was a peer's save or data wait, already counted as that.

Running time in which no group finished a step is held (`pending_s`) until one does; if the phase
changes first (a hang decided, the last step done), it is detection from the failure's onset, and
otherwise collective: the ranks were alive but not finishing steps, and a collective is where a
rank blocks between steps. Cost: a few dict operations per poll.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable, Mapping


class Cause(Enum):
    PRODUCTIVE = "productive"
    STARTUP = "startup"
    DATA_WAIT = "data_wait"
    CHECKPOINT = "checkpoint"
    DETECTION = "detection"
    RECOVERY = "recovery"
    RECOMPUTE = "recompute"
    COLLECTIVE = "collective"
    IDLE_SPARE = "idle_spare"


BADPUT = tuple(c for c in Cause if c is not Cause.PRODUCTIVE)


class Phase(Enum):
    """What the job was doing over a poll interval, as the supervisor judged it at the interval's start."""
    STARTUP = "startup"
    RUNNING = "running"
    RECOVERY = "recovery"
    RECOMPUTE = "recompute"
    FINAL_SAVE = "final_save"


_WHOLE = {Phase.STARTUP: Cause.STARTUP, Phase.RECOVERY: Cause.RECOVERY, Phase.RECOMPUTE: Cause.RECOMPUTE,
          Phase.FINAL_SAVE: Cause.CHECKPOINT}


@dataclass(frozen=True)
class RankTimes:
    """Cumulative seconds one group's rank 0 reports (its Monitor's counters)."""

    step_s: float = 0.0
    data_wait_s: float = 0.0
    checkpoint_s: float = 0.0
    collective_s: float = 0.0

    def minus(self, other: RankTimes) -> RankTimes:
        return RankTimes(self.step_s - other.step_s, self.data_wait_s - other.data_wait_s,
                         self.checkpoint_s - other.checkpoint_s, self.collective_s - other.collective_s)


@dataclass(frozen=True)
class Tick:
    """One poll: `ranks` are the counters of the groups that contribute gradients, by replica id."""

    now: float
    phase: Phase
    spare_share: float = 0.0
    ranks: Mapping[str, RankTimes] = field(default_factory=dict)


@dataclass(frozen=True)
class Ledger:
    started: float
    at: float
    seconds: Mapping[Cause, float] = field(default_factory=lambda: {c: 0.0 for c in Cause})
    pending_s: float = 0.0  # running time not yet split: no group has finished a step in it
    pending_since: float | None = None
    marks: Mapping[str, RankTimes] = field(default_factory=dict)  # each group's counters where pending began

    @classmethod
    def begin(cls, started: float) -> Ledger:
        return cls(started, started)

    @property
    def wall_s(self) -> float:
        return self.at - self.started

    def goodput_ratio(self) -> float:
        """Productive seconds over wall seconds (0 before any time has passed)."""
        return self.seconds[Cause.PRODUCTIVE] / self.wall_s if self.wall_s > 0 else 0.0


def running_split(deltas: Iterable[RankTimes]) -> dict[Cause, float] | None:
    """The shares of running time by cause, from each group's counters over the same span; None when
    no group finished any step time in it.

    >>> saver = RankTimes(step_s=10, data_wait_s=1, checkpoint_s=2, collective_s=1)
    >>> waiter = RankTimes(step_s=10, data_wait_s=0.5, checkpoint_s=0, collective_s=3)
    >>> {c.value: round(s, 2) for c, s in running_split([saver, waiter]).items()}
    {'data_wait': 0.1, 'checkpoint': 0.2, 'collective': 0.1, 'productive': 0.6}
    """
    shares = [(d.data_wait_s / d.step_s, d.checkpoint_s / d.step_s, d.collective_s / d.step_s)
              for d in deltas if d.step_s > 0]
    if not shares:
        return None
    clip = lambda x: min(max(x, 0.0), 1.0)  # noqa: E731 - a counter read across a restart can step back
    wait, ckpt = max(clip(s[0]) for s in shares), max(clip(s[1]) for s in shares)
    coll = min(clip(s[2]) for s in shares)
    lost = wait + ckpt + coll
    scale = 1.0 / lost if lost > 1.0 else 1.0
    split = {Cause.DATA_WAIT: wait * scale, Cause.CHECKPOINT: ckpt * scale, Cause.COLLECTIVE: coll * scale}
    split[Cause.PRODUCTIVE] = max(1.0 - sum(split.values()), 0.0)
    return split


def _add(ledger: Ledger, seconds: Mapping[Cause, float]) -> Ledger:
    totals = dict(ledger.seconds)
    for cause, s in seconds.items():
        totals[cause] += s
    return replace(ledger, seconds=totals)


def _settle(ledger: Ledger, ranks: Mapping[str, RankTimes], final: bool) -> Ledger:
    """Split the pending running time by the groups' counters since it began; when `final` (the
    phase is changing) and nothing explains it, it is collective."""
    split = running_split(ranks[g].minus(mark) for g, mark in ledger.marks.items() if g in ranks)
    if split is not None:
        ledger = _add(ledger, {c: ledger.pending_s * share for c, share in split.items()})
    elif final:
        ledger = _add(ledger, {Cause.COLLECTIVE: ledger.pending_s})
    else:
        return ledger
    return replace(ledger, pending_s=0.0, pending_since=ledger.at, marks=dict(ranks))


def advance(ledger: Ledger, tick: Tick) -> Ledger:
    """Account the wall time from the last tick to this one to the interval's phase.

    >>> ledger = advance(Ledger.begin(0.0), Tick(10.0, Phase.STARTUP))
    >>> ledger = advance(ledger, Tick(12.0, Phase.RUNNING, 0.5, {"g0": RankTimes()}))
    >>> ledger = advance(ledger, Tick(14.0, Phase.RUNNING, 0.5, {"g0": RankTimes(step_s=4.0, data_wait_s=1.0)}))
    >>> {c.value: s for c, s in ledger.seconds.items() if s}
    {'productive': 1.5, 'startup': 10.0, 'data_wait': 0.5, 'idle_spare': 2.0}
    """
    dt = max(tick.now - ledger.at, 0.0)
    if tick.phase is not Phase.RUNNING:
        if ledger.pending_s:
            ledger = _settle(replace(ledger, at=tick.now), tick.ranks, final=True)
        ledger = _add(ledger, {_WHOLE[tick.phase]: dt})
        return replace(ledger, at=tick.now, pending_s=0.0, pending_since=None, marks=dict(tick.ranks))
    spare = min(max(tick.spare_share, 0.0), 1.0)
    marks = {g: ledger.marks.get(g, times) for g, times in tick.ranks.items()}  # a new group: from now on
    ledger = replace(_add(ledger, {Cause.IDLE_SPARE: dt * spare}), at=tick.now, marks=marks,
                     pending_s=ledger.pending_s + dt * (1.0 - spare),
                     pending_since=ledger.at if ledger.pending_since is None else ledger.pending_since)
    return _settle(ledger, tick.ranks, final=False)


def detected(ledger: Ledger, onset: float) -> Ledger:
    """A failure decided now, that began at `onset`: the pending running time since then was spent
    detecting it; what was pending before the onset is collective (nobody finished a step).

    >>> waiting = advance(advance(Ledger.begin(0.0), Tick(0.0, Phase.RUNNING)), Tick(30.0, Phase.RUNNING))
    >>> {c.value: round(s, 6) for c, s in detected(waiting, onset=10.0).seconds.items() if s}
    {'detection': 20.0, 'collective': 10.0}
    """
    if not ledger.pending_s or ledger.pending_since is None:
        return ledger  # no running time open: a recovery or the startup already holds it
    span = ledger.at - ledger.pending_since
    share = 1.0 if span <= 0 else min(max((ledger.at - onset) / span, 0.0), 1.0)
    ledger = _add(ledger, {Cause.DETECTION: ledger.pending_s * share,
                           Cause.COLLECTIVE: ledger.pending_s * (1.0 - share)})
    return replace(ledger, pending_s=0.0, pending_since=ledger.at)
