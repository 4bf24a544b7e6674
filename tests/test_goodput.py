"""The goodput ledger as a table: polls (phase, spare share, the ranks' counters) and decided failures
in, seconds by cause out. Every row also holds the ledger to its invariant: the causes add up to the
wall time. Pure: no process, no clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from watchtower.supervisor.events import EventLog
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.goodput import Cause, Ledger, Phase, RankTimes, Tick, advance, detected, running_split
from watchtower.supervisor.timeline import judge_phase

S, RUN, REC, RECOMP, FINAL = Phase.STARTUP, Phase.RUNNING, Phase.RECOVERY, Phase.RECOMPUTE, Phase.FINAL_SAVE


def t(step=0.0, wait=0.0, ckpt=0.0, coll=0.0) -> RankTimes:
    return RankTimes(step, wait, ckpt, coll)


def tick(now, phase, spare=0.0, **ranks) -> Tick:
    return Tick(now, phase, spare, ranks)


CASES = {
    "startup, then one group's steps with a tenth of data wait": (
        [tick(10, S), tick(11, RUN, g0=t()), tick(21, RUN, g0=t(step=10, wait=1))],
        {"startup": 10, "productive": 9.9, "data_wait": 1.1}),
    "a hot spare is a third of the allocation while running": (
        [tick(0, RUN, g0=t()), tick(30, RUN, 1 / 3, g0=t(step=30))],
        {"productive": 20, "idle_spare": 10}),
    "the saver's checkpoint counts, the waiter's wait for it is not a collective stall": (
        [tick(0, RUN, g0=t(), g1=t()),
         tick(10, RUN, g0=t(step=10, ckpt=2, coll=1), g1=t(step=10, coll=3))],
        {"productive": 7, "checkpoint": 2, "collective": 1}),
    "no step for a while: held until one finishes, then split by the counters of the whole span": (
        [tick(0, RUN, g0=t()), tick(5, RUN, g0=t()), tick(10, RUN, g0=t(step=10, wait=5))],
        {"productive": 5, "data_wait": 5}),
    "a group that joins mid-span is measured from when it was first seen": (
        [tick(0, RUN, g0=t()), tick(5, RUN, g0=t(), g1=t(step=100, coll=50)),
         tick(10, RUN, g0=t(step=10), g1=t(step=110, coll=60))],
        {"productive": 10}),
    "a hang: from the hung group's last step to the decision is detection, before it collective": (
        [tick(0, RUN, g0=t(), g1=t()), tick(10, RUN, g0=t(step=10), g1=t(step=10)),
         tick(40, RUN, g0=t(step=10), g1=t(step=10)), ("failed", 12.0), tick(50, REC, g1=t(step=10))],
        {"productive": 10, "collective": 2, "detection": 28, "recovery": 10}),
    "an exit: only the poll interval it died in is detection": (
        [tick(0, RUN, g0=t()), tick(10, RUN, g0=t(step=10)), tick(10.2, RUN, g0=t(step=10)), ("failed", 10.0),
         tick(15, REC)],
        {"productive": 10, "detection": 0.2, "recovery": 4.8}),
    "a second failure during a recovery adds no detection: the recovery already holds the time": (
        [tick(0, REC), tick(5, REC), ("failed", 1.0), tick(9, REC)],
        {"recovery": 9}),
    "a restart from a checkpoint: recovery, then the steps run again are recompute": (
        [tick(0, RUN, g0=t()), tick(10, RUN, g0=t(step=10)), tick(10.5, RUN), ("failed", 10.0), tick(20, REC),
         tick(26, RECOMP, g2=t(step=5)), tick(30, RUN, g2=t(step=9)), tick(35, RUN, g2=t(step=14))],
        {"productive": 19, "detection": 0.5, "recovery": 9.5, "recompute": 6}),
    "the tail after the last step is the final save; what was pending is split by the last counters": (
        [tick(0, RUN, g0=t()), tick(10, RUN, g0=t()), tick(14, FINAL, g0=t(step=10, wait=5))],
        {"productive": 5, "data_wait": 5, "checkpoint": 4}),
    "pending with nothing to explain it when the phase changes is collective": (
        [tick(0, RUN, g0=t()), tick(6, RUN, g0=t()), tick(8, FINAL)],
        {"collective": 6, "checkpoint": 2}),
    "shares that add up past the whole step are scaled down, never negative productive": (
        [tick(0, RUN, g0=t()), tick(10, RUN, g0=t(step=10, wait=8, ckpt=4, coll=8))],
        {"data_wait": 4, "checkpoint": 2, "collective": 4}),
}


def replay(steps) -> Ledger:
    ledger = Ledger.begin(0.0)
    for s in steps:
        ledger = detected(ledger, s[1]) if isinstance(s, tuple) else advance(ledger, s)
    return ledger


@pytest.mark.parametrize("steps,expected", CASES.values(), ids=CASES.keys())
def test_ledger(steps, expected):
    ledger = replay(steps)
    got = {c.value: round(s, 6) for c, s in ledger.seconds.items() if round(s, 6)}
    assert got == pytest.approx(expected), got
    assert sum(ledger.seconds.values()) + ledger.pending_s == pytest.approx(ledger.wall_s), "causes != wall time"
    assert ledger.goodput_ratio() == pytest.approx(expected.get("productive", 0) / ledger.wall_s)


def test_no_step_time_explains_nothing():
    assert running_split([t(), t(step=0, wait=3)]) is None


@pytest.mark.parametrize("stepped,recovering,step,until,expected", [
    (False, False, 0, 0, S),  # before the first step, whatever else
    (True, True, 50, 0, REC),
    (True, False, 50, 0, RUN),
    (True, False, 45, 50, RECOMP),
    (True, False, 50, 50, RECOMP),  # step 50 itself was run before the restart
    (True, False, 51, 50, RUN),
    (True, False, 100, 0, FINAL),
])
def test_phase(stepped, recovering, step, until, expected):
    assert judge_phase(stepped, recovering, step, until, last_step=100) is expected


@pytest.mark.parametrize("poll_s", [0.2, 3.0])
def test_goodput_does_not_depend_on_the_poll_interval(tmp_path, poll_s):
    """Review 12, F4: JobStats credited at most 1 s of productive time per poll in which the step
    moved, so a job that stepped the whole time reported 24% goodput with poll_interval_s = 3. Now
    productive time is the ranks' own step time: a group stepping from the first poll on, with no
    waits, is productive for all but that first poll's startup, whatever the poll interval."""
    stats, events, wall = JobStats(0.0, active_target=1, last_step=10**6), EventLog(tmp_path / "events.jsonl"), 60.0
    for i in range(1, int(wall / poll_s) + 1):
        now = i * poll_s
        group = SimpleNamespace(running=True, participating=True, participants=1, step=i, heartbeat=now,
                                launched_at=0.0, times=t(step=now - poll_s))
        stats.track(now, {"g0000": group}, i, events)
    assert stats.goodput() == pytest.approx((wall - poll_s) / wall, abs=0.01)
