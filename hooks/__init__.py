"""Watchtower's hook library: observe any PyTorch training loop in a few lines.

    from watchtower.hooks import Monitor, MonitorConfig
    monitor = Monitor.from_env(MonitorConfig(port=9400))
    loader = monitor.wrap(loader)
    for batch in loader:
        with monitor.step(tokens=batch.numel()) as s:
            loss = ...; s.record(loss=loss, grad_norm=gn, lr=lr)
    monitor.close()

This package imports torch, prometheus_client, psutil and pynvml (lazily) only: never textual,
torchft, the supervisor or the TUI (a test checks it in a fresh interpreter).

The names above are imported on first use (PEP 562): `watchtower.hooks.config` is read by every
process that validates a trainer config (the TP launcher, a supervisor, a config error's exit 2),
and importing this package's Monitor there would cost torch's import (~4 s) before anything starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watchtower.hooks.config import MonitorConfig
    from watchtower.hooks.detectors import DetectorEvent
    from watchtower.hooks.identity import RankIdentity
    from watchtower.hooks.monitor import Monitor, StepHandle

_HOMES = {"DetectorEvent": "watchtower.hooks.detectors", "Monitor": "watchtower.hooks.monitor",
          "MonitorConfig": "watchtower.hooks.config", "RankIdentity": "watchtower.hooks.identity",
          "StepHandle": "watchtower.hooks.monitor"}  # public name -> the module that defines it

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """`watchtower.hooks.Monitor` and `from watchtower.hooks import Monitor`: the defining module is
    imported the first time, then the name is bound here (later reads cost a dict lookup)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
