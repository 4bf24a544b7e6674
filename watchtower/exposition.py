"""Building metric families by catalog name and serving them on /metrics, without torch.

Shared by a rank's exporter (`watchtower.hooks.exporter`) and the supervisor, which runs where
torch need not be imported. Every family comes from `watchtower.metric_catalog`, so a name that is
not declared is a KeyError in tests, never a silent new series.
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from watchtower.metric_catalog import ALL_METRICS

log = logging.getLogger("watchtower")


class Families:
    """Builds families by catalog name, so a typo is a KeyError in tests, not a silent new series.

    >>> f = Families(("demo",))
    >>> f.add("watchtower_supervisor_job_step", 12)
    >>> [(s.name, s.labels, s.value) for s in f.families["watchtower_supervisor_job_step"].samples]
    [('watchtower_supervisor_job_step', {'run': 'demo'}, 12.0)]
    """

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
