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

if TYPE_CHECKING:  # `X as X`: an explicit re-export, as mypy --strict requires of a package's names
    from watchtower.hooks.config import MonitorConfig as MonitorConfig
    from watchtower.hooks.detectors import DetectorEvent as DetectorEvent
    from watchtower.hooks.identity import RankIdentity as RankIdentity
    from watchtower.hooks.monitor import Monitor as Monitor, StepHandle as StepHandle

_HOMES = {"DetectorEvent": "watchtower.hooks.detectors", "Monitor": "watchtower.hooks.monitor",
          "MonitorConfig": "watchtower.hooks.config", "RankIdentity": "watchtower.hooks.identity",
          "StepHandle": "watchtower.hooks.monitor"}  # public name -> the module that defines it

__all__ = ["DetectorEvent", "Monitor", "MonitorConfig", "RankIdentity", "StepHandle"]  # a literal: type checkers read it; == sorted(_HOMES) (tests/test_monitor.py)


def __getattr__(name: str) -> Any:
    """`watchtower.hooks.Monitor` and `from watchtower.hooks import Monitor`: the defining module is
    imported the first time, then the name is bound here (later reads cost a dict lookup). A
    submodule (`watchtower.hooks.monitor`) is imported as an eagerly importing package would have."""
    if name not in _HOMES:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # binds it here as well
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
