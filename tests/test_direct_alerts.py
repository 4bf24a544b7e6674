"""The supervisor's own pages, below the HTTP post: what is posted, and when (in-process, no server).

The posts themselves, through a real Alertmanager merging with the rule, are in tests/test_alerts.py.
Here every post is taken off the queue the posting thread would read, with the clock given.
"""

from __future__ import annotations

import queue

import pytest

from watchtower.supervisor.actions import Executor
from watchtower.supervisor.alert_contract import CRASH_LOOP, GROUP_FAILED
from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.direct_alerts import DirectAlerts, SupervisorPages
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.policy_types import Failure, FailureKind
from watchtower.supervisor.remediation import Rewind
from watchtower.toml_dataclasses import build


def _posts_kept() -> tuple[DirectAlerts, queue.Queue]:
    """DirectAlerts whose posts stay on a queue the test reads (its posting thread is let go)."""
    alerts = DirectAlerts("http://127.0.0.1:9", StageErrors().record)
    posting, alerts._queue = alerts._queue, queue.Queue()
    posting.put(None)  # the thread ends: nothing is posted for real
    return alerts, alerts._queue


def _taken(posts: queue.Queue) -> list[tuple[str, str]]:
    out = []
    while not posts.empty():
        out += [(a["labels"]["alertname"], a["endsAt"]) for a in posts.get_nowait()]
    return out


def test_a_direct_group_failed_page_expires_at_its_end_and_is_never_posted_resolved():
    """Review of issue 14, F11: the GroupFailed the supervisor posts was posted again at its end,
    resolved (endsAt = now). The rule still fires for a scrape and an evaluation after that, and
    Alertmanager's merge takes a younger resolved update's end: the page resolved, then fired again
    at Prometheus's next resend (a second notification). Now it is posted once and left to expire."""
    alerts, posts = _posts_kept()
    labels = {"run": "r", "reason": "exit"}
    alerts.fire(GROUP_FAILED, 1000.0, labels, "g0 failed", ends_at=1300.0)
    assert _taken(posts) == [("WatchtowerGroupFailed", "1970-01-01T00:21:40.000Z")]  # endsAt = 1300
    for now in (1100.0, 1299.0, 1300.0, 1301.0, 2000.0):
        alerts.poll(now)
    assert _taken(posts) == [], "posted again at its end: resolved while the rule still fires"
    assert not alerts.active(GROUP_FAILED, labels)


@pytest.mark.parametrize("kind, counted, paged", [
    (FailureKind.EXIT, True, True),
    (FailureKind.EXIT, False, True),  # excused by a Lighthouse outage: the rule pages it, so does the direct path
    (FailureKind.HANG, False, True),
    (FailureKind.DRAINED, False, False),  # planned: no rule pages it
    (FailureKind.REWIND, False, False),
])
def test_a_group_failure_excused_by_a_lighthouse_outage_pages_directly_as_the_rule_pages_it(kind, counted, paged):
    """The rule pages every failure of a paged reason from watchtower_supervisor_failures_total, which
    counts excused ones too; the direct path skipped those, so on a loaded machine (a slow Lighthouse
    probe read as an outage) the page came late, through the rule, without its description."""
    alerts, posts = _posts_kept()
    pages = SupervisorPages("r", 1, alerts)
    pages.group_failed(Failure(1000.0, "g0000", "n0", kind, -9, 5, 990.0, counted=counted, blamed=False), "g0000 died")
    assert bool(_taken(posts)) is paged


def test_a_condition_page_is_still_posted_resolved_when_it_clears():
    """The other kind of direct page (a crash loop, spares exhausted) has no end of its own: it is
    refreshed while it holds and posted resolved when the supervisor says it cleared."""
    alerts, posts = _posts_kept()
    alerts.fire(CRASH_LOOP, 1000.0, {"run": "r"}, "stopped")
    alerts.poll(1031.0)  # past RESEND_S: refreshed, endsAt TTL_S ahead
    assert [name for name, _ in _taken(posts)] == ["WatchtowerCrashLoop"] * 2
    alerts.resolve(CRASH_LOOP, 1040.0, {"run": "r"})
    assert _taken(posts) == [("WatchtowerCrashLoop", "1970-01-01T00:17:20.000Z")]  # endsAt = 1040: resolved


def test_a_rewind_pages_directly_with_its_event_as_description(tmp_path):
    """Review of issue 14, A1: the supervisor posts its own pages for node failures, spares exhausted,
    a crash loop, and (item 4) a rewind; no alert was posted for a rewind, and no rule raised one.
    Now the rewind posts WatchtowerRewind (alerts/rules.yml raises the same from the remediation
    counter; tests/test_alerts.py holds the two to one contract)."""
    job = build(JobConfig, {"job": {"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                            "cluster": {"nodes": ["a", "b"]}})
    (tmp_path / "checkpoints" / "step-00000100").mkdir(parents=True)  # one to rewind to: else it fails (14c, C4)
    (tmp_path / "checkpoints" / "step-00000100" / "manifest.json").write_text("{}")
    ex = Executor(job, {"train": {"tp": 1}, "data": {"skip_steps": []}}, str(tmp_path / "checkpoints"),
                  launcher=None, lighthouse=lambda: None, groups={}, events=EventLog(tmp_path / "events.jsonl"),
                  stats=JobStats(0.0, 1, 200), errors=StageErrors())
    ex.pages.alerts, posts = _posts_kept()
    ex.run([Rewind(spike_step=120, to_step=110, skip_first=120, skip_last=124, checkpoint_step=100)], 0.0)
    (page,) = posts.get_nowait()
    assert page["labels"] == {"alertname": "WatchtowerRewind", "severity": "page", "run": "rw"}, page
    assert "restarting from the checkpoint of step 100" in page["annotations"]["description"], page
    assert page["annotations"]["runbook_url"] == "docs/runbooks.md#rewind"
