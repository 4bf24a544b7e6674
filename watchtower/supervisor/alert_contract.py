"""The alerts the supervisor posts itself, and the Prometheus rules that raise the same ones.

With `[supervisor] alertmanager_url` set, a dead group pages within a poll instead of a scrape and
a rule evaluation later, and Prometheus still raises the same alert from the supervisor's /metrics
(the path that works when the supervisor itself is gone). Alertmanager merges the two only if their
label sets are equal, so this module is the one place they are written: each alert's name, severity,
the labels that tell its instances apart, and its annotations. alerts/rules.yml aggregates to exactly
those labels (`max by (run, ...)`, so the scrape target's instance, job and node do not make the two
differ) and repeats the annotations; tests/test_alerts.py holds the rules to this module, and a
promtool test shows each rule's alert carries these labels and no others.

Prometheus's `external_labels` are added to its alerts only: with any set, the two paths page twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL_REF = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


@dataclass(frozen=True)
class AlertSpec:
    alertname: str
    severity: str
    keys: tuple[str, ...]  # the labels besides alertname and severity
    summary: str  # the rule's summary template: only `{{ $labels.<key> }}` references
    runbook: str

    def labels(self, **values: str) -> dict[str, str]:
        """The full label set of one instance; every key and nothing else.

        >>> CRASH_LOOP.labels(run="demo")
        {'alertname': 'WatchtowerCrashLoop', 'severity': 'page', 'run': 'demo'}
        """
        if set(values) != set(self.keys):
            raise KeyError(f"{self.alertname} takes labels {self.keys}, got {tuple(values)}")
        return {"alertname": self.alertname, "severity": self.severity, **values}

    def annotations(self, labels: dict[str, str]) -> dict[str, str]:
        """summary and runbook_url as the rule's templates render them for `labels`.

        >>> GROUP_FAILED.annotations(GROUP_FAILED.labels(run="demo", reason="hang"))["summary"]
        'A replica group of run demo failed (hang): the supervisor replaces it'
        """
        return {"summary": _LABEL_REF.sub(lambda m: labels[m.group(1)], self.summary),
                "runbook_url": self.runbook}


GROUP_FAILED = AlertSpec(
    "WatchtowerGroupFailed", "page", ("run", "reason"),
    "A replica group of run {{ $labels.run }} failed ({{ $labels.reason }}): the supervisor replaces it",
    "docs/runbooks.md#group-failed")
GROUP_FAILED_WINDOW_S = 300.0  # the rule's increase(...[5m]): how long one failure keeps the alert firing
PAGED_REASONS = ("exit", "hang", "node_down", "deadlock")  # FailureKind values; not drains, not the Lighthouse

CRASH_LOOP = AlertSpec(
    "WatchtowerCrashLoop", "page", ("run",),
    "Run {{ $labels.run }} was stopped as a crash loop: the same failure on fresh nodes",
    "docs/runbooks.md#crash-loop")

SPARES_EXHAUSTED = AlertSpec(
    "WatchtowerSparesExhausted", "page", ("run",),
    "Run {{ $labels.run }} has no hot spare and no free node: the next failure costs a replica group",
    "docs/runbooks.md#spares-exhausted")

REWOUND = AlertSpec(
    "WatchtowerRewind", "page", ("run",),
    "Run {{ $labels.run }} was rewound after a critical loss spike in every group: restarted from an earlier "
    "checkpoint, skipping the data window",
    "docs/runbooks.md#rewind")
REWIND_WINDOW_S = 300.0  # the rule's increase(...[5m])

REWIND_FAILED = AlertSpec(
    "WatchtowerRewindFailed", "page", ("run",),
    "Run {{ $labels.run }} hit a critical loss spike and its rewind FAILED: the job stopped (exit 6); a start is "
    "refused until the checkpoints after the spike are set aside",
    "docs/runbooks.md#rewind-failed")

DIRECT_ALERTS = (GROUP_FAILED, CRASH_LOOP, SPARES_EXHAUSTED, REWOUND, REWIND_FAILED)
