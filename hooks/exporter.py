"""/metrics for one rank: a custom Collector that reads the monitor's state at scrape time.

Nothing is pushed into prometheus-client objects from the training loop; a scrape builds the
families from plain numbers the monitor keeps, on a registry of our own (never the global one).
Family definitions come from `watchtower.metric_catalog`, the single list of names, through
`watchtower.exposition` (shared with the supervisor, which must not import torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client.core import Metric

from watchtower.exposition import Families, serve_metrics  # noqa: F401 - the monitor's imports of them

if TYPE_CHECKING:
    from watchtower.hooks.monitor import Monitor


class MonitorCollector:
    def __init__(self, monitor: "Monitor"):
        self.monitor = monitor

    def collect(self) -> Iterable[Metric]:
        f = Families(self.monitor.identity.label_values())
        try:
            self.monitor.describe(f)
        except Exception as err:  # noqa: BLE001 - a broken scrape must not kill the exporter thread
            self.monitor.errors.record("scrape", err)
        return list(f.families.values())
