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
"""

from watchtower.hooks.config import MonitorConfig
from watchtower.hooks.detectors import DetectorEvent
from watchtower.hooks.identity import RankIdentity
from watchtower.hooks.monitor import Monitor, StepHandle

__all__ = ["DetectorEvent", "Monitor", "MonitorConfig", "RankIdentity", "StepHandle"]
