"""One way for tests to wait: poll the real condition, with a ceiling that only ends a stuck test.

A fixed sleep is a guess: too short on a loaded CI machine (the test fails), too long on an idle
one (the suite crawls). A per-wait budget ("within 60 s") is the same guess in another form. So a
test names the condition it needs (a file, a port, a rule's state in Prometheus) and polls it;
`WAIT_CEILING_S` is far above any healthy wait and exists only to end a test whose condition will
never hold, with a message saying what it waited for and what it saw last.

Example:
    >>> calls = iter([None, None, "ready"])
    >>> wait_until(lambda: next(calls), "the third call", interval=0)
    'ready'
"""

from __future__ import annotations

import time
from typing import Any, Callable

WAIT_CEILING_S = 240.0  # under pytest-timeout's 300 s per test (pyproject), so a stuck wait says what it waited for


def wait_until(check: Callable[[], Any], what: str, *, timeout: float = WAIT_CEILING_S, interval: float = 0.2,
               abort: Callable[[], None] | None = None) -> Any:
    """Call `check()` every `interval` s until it returns something truthy, and return that.

    An OSError from `check` (a server not listening yet, a file not written yet) counts as "not yet".
    `abort` runs each round and raises to fail at once when the condition can no longer come
    (e.g. the process that should produce it has exited). Cost: one `check()` per interval.
    """
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        if abort is not None:
            abort()
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:.0f}s for {what}; last seen: {last!r}")
        time.sleep(interval)


def wait_for_rule_evaluations(read_evaluations: Callable[[], dict[str, str]], n: int) -> None:
    """Wait until every rule group has been evaluated `n` more times (e.g. `AlertingStack.rule_evaluations`).

    Counts the distinct `lastEvaluation` stamps seen per group after the first read: a poll that
    misses an evaluation only makes the wait longer, never shorter, so at least `n` happened.
    """
    seen = {group: {stamp} for group, stamp in read_evaluations().items()}
    assert seen, "Prometheus has no rule groups loaded"

    def advanced() -> bool:
        for group, stamp in read_evaluations().items():
            seen.setdefault(group, set()).add(stamp)
        return all(len(stamps) > n for stamps in seen.values())

    try:
        wait_until(advanced, f"{n} more evaluations of every rule group", interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; evaluations seen per group: { {g: len(s) - 1 for g, s in seen.items()} }") from None


# ---- waits on a live alerting stack (watchtower.alerting_stack.AlertingStack) --------------------------

def wait_for_loss_spike_page(stack, run: str) -> dict:
    """The WatchtowerLossSpike page for `run`, waited for stage by stage, so a failure names the stage.

    The rule pages on `increase(watchtower_detector_events_total{...}[5m]) > 0`, which needs two scrapes
    of the same series: one reading 0 before the spike and one reading 1 after. A rank that spikes
    before Prometheus first scrapes it is first seen at 1, shows no increase, and never pages: so
    start a trainer only once `stack.scraping(address)`, or hold it before its first step until
    Prometheus has scraped it (held_start.HeldStart), and keep it serving (`monitor.linger_s`)
    for as long as the test waits. Given both scrapes, the rule fires at the next evaluation (it has
    no `for:`) and Alertmanager pages after its group_wait.
    """
    selector = f'watchtower_detector_events_total{{run="{run}", detector="loss_spike", severity="critical"}}'
    seen: list[list[float]] = []

    def zero_then_spike() -> bool:
        seen[:] = stack.scraped_values(selector)
        return any(values[0] == 0 and values[-1] >= 1 for values in seen if values)

    def too_late() -> None:
        if seen and all(values[0] >= 1 for values in seen):
            raise AssertionError(f"{run} can never page: Prometheus first scraped its loss-spike counter at "
                                 f"{[values[0] for values in seen]}, after the spike, so increase() sees none")

    wait_until(zero_then_spike, f"Prometheus to scrape {run}'s loss-spike counter at 0 and then at 1",
               abort=too_late)
    wait_until(lambda: [a for a in stack.prometheus_alerts(alertname="WatchtowerLossSpike", run=run)
                        if a["state"] == "firing"], f"WatchtowerLossSpike for {run} to fire in Prometheus")
    return wait_until(lambda: stack.pager.find("WatchtowerLossSpike", run=run),
                      f"Alertmanager to page WatchtowerLossSpike for {run}")
