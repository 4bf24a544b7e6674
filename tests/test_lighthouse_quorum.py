"""The supervisor's Lighthouse settings against torchft's real quorum logic (its Rust server, its
client), with three simulated replica groups: 2 active + 1 hot spare, so any 2 can form a quorum."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from watchtower.supervisor.lighthouse import Lighthouse
from watchtower.supervisor.supervisor_section import SupervisorSection
from watchtower.validation import ConfigError
from waiting import wait_until

GROUPS = ("g0000", "g0001", "g0002")


def quorums_with_one_late_group(section: SupervisorSection, step_s: float, late_s: float, rounds: int) -> list[tuple]:
    """Each group heartbeats every 100 ms (as a Manager does), asks for a quorum, then "steps" for
    step_s (plus a few ms per group: they never ask at the same instant); g0000 is late by late_s
    once, after the second quorum (a checkpoint save). Returns each quorum's members, in order."""
    lighthouse = Lighthouse("127.0.0.1:0", 2, section.lighthouse_heartbeat_timeout_ms,
                            section.join_timeout_ms())
    from torchft.coordination import LighthouseClient  # imports torch: only in the tests that need it

    stop, seen, lock, beating = threading.Event(), {}, threading.Lock(), set()

    def heartbeat(group: str) -> None:
        client = LighthouseClient(lighthouse.url, timedelta(seconds=5))
        while not stop.is_set():
            client.heartbeat(group)
            beating.add(group)
            time.sleep(0.1)

    def replica(group: str) -> None:
        client = LighthouseClient(lighthouse.url, timedelta(seconds=5))
        for step in range(rounds + 2):
            try:
                quorum = client.quorum(replica_id=group, timeout=timedelta(seconds=section.ft_timeout_s),
                                       address=group, store_address=group, step=step, world_size=1)
            except Exception:  # noqa: BLE001 - the Lighthouse is stopped at the end, mid-request
                return
            with lock:
                seen[quorum.quorum_id, quorum.created.seconds, quorum.created.nanos] = tuple(
                    sorted(p.replica_id for p in quorum.participants))
            late = late_s if group == "g0000" and step == 1 else 0.0
            if stop.wait(step_s + 0.02 * GROUPS.index(group) + late):
                return

    beats = [threading.Thread(target=heartbeat, args=(g,), daemon=True) for g in GROUPS]
    asks = [threading.Thread(target=replica, args=(g,), daemon=True) for g in GROUPS]
    try:
        for t in beats:
            t.start()
        wait_until(lambda: len(beating) == len(GROUPS), "every group's first heartbeat", interval=0.05)
        for t in asks:  # as the Managers do: heartbeats first, so the first quorum waits for all three
            t.start()
        wait_until(lambda: len(seen) >= rounds, f"{rounds} quorums", interval=0.05)
    finally:
        stop.set()
        lighthouse.stop()
        for t in beats + asks:
            t.join(timeout=10)
    return [members for _, members in sorted(seen.items(), key=lambda kv: kv[0][1:])][:rounds]


def test_a_group_late_once_for_a_save_is_waited_for_not_left_out_of_every_later_quorum():
    """A group that asks later than the join timeout is left out of that quorum; torchft re-adds it
    with a fresh join time and it waits there a whole step, so with steps longer than the join timeout
    the next quorum can form as soon as one other group asks, leaving the third out, and so on every
    step (a heal from a peer each time; at the end the group left out timed out and its healthy node
    was drained: /work/notes/repro-lighthouse). The join timeout was 1000 ms, then 800: a group late by
    1.5 s (a checkpoint save) was left out (on this test's own settings, once). With the supervisor's
    defaults it is waited for, and every quorum has all three groups."""
    quorums = quorums_with_one_late_group(SupervisorSection(), step_s=1.1, late_s=1.5, rounds=5)
    assert all(members == GROUPS for members in quorums), quorums


def test_the_join_timeout_defaults_to_half_the_quorum_timeout_and_must_stay_below_it():
    assert SupervisorSection().join_timeout_ms() == 5000
    raised = SupervisorSection(lighthouse_grace_s=90)
    raised.ft_timeout_s = 60  # derived where it is used, never stored: a later ft_timeout_s moves it too
    assert raised.join_timeout_ms() == 30000 and raised.lighthouse_join_timeout_ms == 0
    assert SupervisorSection(lighthouse_join_timeout_ms=2000).join_timeout_ms() == 2000


@pytest.mark.parametrize("settings,field", [
    # a quorum that waits as long as the groups' quorum requests fails every survivor (review of e6146fe, F2)
    ({"lighthouse_heartbeat_timeout_ms": 15000}, "lighthouse_heartbeat_timeout_ms"),
    ({"lighthouse_join_timeout_ms": 10000}, "lighthouse_join_timeout_ms"),
    ({"ft_timeout_s": 5, "lighthouse_join_timeout_ms": 6000}, "lighthouse_join_timeout_ms"),
    ({"lighthouse_heartbeat_timeout_ms": 50}, "lighthouse_heartbeat_timeout_ms"),
])
def test_a_lighthouse_timeout_the_quorum_requests_would_outlast_is_refused_naming_it(settings, field):
    with pytest.raises(ConfigError) as err:
        SupervisorSection(**settings)
    assert err.value.field == field and "ft_timeout_s" in str(err.value)
