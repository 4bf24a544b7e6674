"""Sustained throughput drop against a rolling baseline (the Playbook's slow-storage incident).

The baseline is the median tokens/s over a long window that ends where the recent window begins;
the recent level is the median of the last `patience` steps, so one slow step (a checkpoint save,
a stall that the stall detector reports) does not count as a drop.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from watchtower.hooks.detectors.events import DetectorEvent
from watchtower.validation import require


@dataclass
class ThroughputConfig:
    """drop_ratio: recent / baseline below this is a drop (0.7 = lost 30%).
    patience: steps in the recent window; baseline_window: steps in the baseline before it."""

    baseline_window: int = 100
    patience: int = 20
    drop_ratio: float = 0.7

    def __post_init__(self) -> None:
        require(self.baseline_window >= 10, "baseline_window", self.baseline_window, "must be >= 10 steps")
        require(self.patience >= 3, "patience", self.patience, "must be >= 3 steps")
        require(0 < self.drop_ratio < 1, "drop_ratio", self.drop_ratio, "must be in (0, 1)")


class ThroughputDropDetector:
    """update(step, tokens_per_s) per step -> events; one event per episode.

    Example:
        >>> d = ThroughputDropDetector(ThroughputConfig(baseline_window=20, patience=5))
        >>> quiet = [e for s in range(40) for e in d.update(s, 1000.0)]
        >>> quiet, [e.step for s in range(40, 50) for e in d.update(s, 500.0)]
        ([], [42])
    """

    def __init__(self, cfg: ThroughputConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.baseline_window + cfg.patience)
        self.dropped = False

    def update(self, step: int, tokens_per_s: float) -> list[DetectorEvent]:
        if not tokens_per_s > 0:
            return []
        self.history.append(tokens_per_s)
        if len(self.history) < self.history.maxlen:
            return []
        values = list(self.history)
        baseline = statistics.median(values[: self.cfg.baseline_window])
        recent = statistics.median(values[self.cfg.baseline_window:])
        ratio = recent / baseline if baseline > 0 else 1.0
        if self.dropped:  # hysteresis: recovered only halfway back above the threshold
            self.dropped = ratio < self.cfg.drop_ratio + (1 - self.cfg.drop_ratio) / 2
            return []
        if ratio >= self.cfg.drop_ratio:
            return []
        self.dropped = True
        severity = "critical" if ratio < self.cfg.drop_ratio / 2 else "warning"
        return [DetectorEvent("throughput_drop", step, severity, ratio,
                              f"tokens/s {recent:.0f} is {ratio:.0%} of baseline {baseline:.0f}")]
