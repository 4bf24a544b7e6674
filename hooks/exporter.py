"""/metrics for one rank: a custom Collector that reads the monitor's state at scrape time.

Nothing is pushed into prometheus-client objects from the training loop; a scrape builds the
families from plain numbers the monitor keeps, on a registry of our own (never the global one).
Family definitions come from `watchtower.metric_catalog`, the single list of names.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from watchtower.metric_catalog import ALL_METRICS

if TYPE_CHECKING:
    from watchtower.hooks.monitor import Monitor

log = logging.getLogger("watchtower.hooks")


class Families:
    """Builds families by catalog name, so a typo is a KeyError in tests, not a silent new series."""

    def __init__(self, base_labels: tuple[str, ...]):
        self.base = base_labels
        self.families: dict[str, Metric] = {}

    def add(self, name: str, value: float | None, *extra: str) -> None:
        if value is None:
            return
        spec = ALL_METRICS[name]
        fam = self.families.get(name)
        if fam is None:
            cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            fam = cls(spec.family, spec.help, labels=list(spec.labels))
            self.families[name] = fam
        fam.add_metric(list(self.base) + [str(v) for v in extra], float(value))


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


def serve_metrics(registry: CollectorRegistry, port: int, bind: str, tries: int = 100):
    """Start /metrics on `port`, or on the next free port after it (with a warning); returns
    (server, port). A port outside range or no free port in `tries` raises OSError."""
    last_err: OSError | None = None
    for candidate in range(port, min(port + tries, 65536)):
        try:
            server, _thread = start_http_server(candidate, addr=bind, registry=registry)
        except OSError as err:
            if err.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last_err = err
            continue
        if candidate != port:
            log.warning("port %d is taken; serving /metrics on %s:%d instead", port, bind, candidate)
        return server, candidate
    raise OSError(f"no free port for /metrics in {port}..{port + tries - 1}: {last_err}")
