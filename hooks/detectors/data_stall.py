"""Dataloader trouble, two shapes of it.

- A stall: one wait for the next batch far above the rolling median (a hung storage read, a
  worker restart). Fires on the step that waited.
- A creeping slowdown: the share of each step spent waiting for data rises steadily over a long window
  (the Playbook's incident where a growing index made every read a little slower). No single step
  looks bad; the least-squares trend over the window does.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from watchtower.hooks.detectors.events import DetectorEvent
from watchtower.validation import require


@dataclass
class DataStallConfig:
    """stall_factor: a wait this many times the rolling median is a stall, if it is also at least
    min_stall_s (so a 2 ms wait after 0.1 ms ones is not). window: steps in the median.
    trend_window: steps over which the wait share's trend is fitted; share_rise: the rise of the
    fitted share across that window that counts as creeping (0.15 = 15 points of step time).
    """

    window: int = 50
    stall_factor: float = 10.0
    min_stall_s: float = 1.0  # a shorter wait is never a stall; 10× it is a critical one
    trend_window: int = 100
    share_rise: float = 0.15
    min_share: float = 0.2  # a rising wait share counts only once it is at least this (0.2 = 20% of step time)

    def __post_init__(self) -> None:
        require(self.window >= 5, "window", self.window, "must be >= 5 steps")
        require(self.stall_factor > 1, "stall_factor", self.stall_factor, "must be > 1")
        require(self.min_stall_s >= 0, "min_stall_s", self.min_stall_s, "must be >= 0 seconds")
        require(self.trend_window >= 10, "trend_window", self.trend_window, "must be >= 10 steps")
        require(0 < self.share_rise < 1, "share_rise", self.share_rise, "must be in (0, 1)")
        require(0 <= self.min_share < 1, "min_share", self.min_share, "must be in [0, 1)")


def trend_rise(values: list[float]) -> float:
    """Rise of the least-squares line through `values` from the first to the last index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    sxy = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return sxy / sxx * (n - 1) if sxx else 0.0


class DataStallDetector:
    """update(step, wait_s, step_time_s) per step -> events.

    Example:
        >>> d = DataStallDetector(DataStallConfig())
        >>> _ = [d.update(s, 0.01, 0.1) for s in range(20)]
        >>> [e.detector for e in d.update(20, 3.0, 3.1)]
        ['data_stall']
    """

    def __init__(self, cfg: DataStallConfig):
        self.cfg = cfg
        self.waits: deque[float] = deque(maxlen=cfg.window)
        self.shares: deque[float] = deque(maxlen=cfg.trend_window)
        self.rising = False

    def update(self, step: int, wait_s: float, step_time_s: float) -> list[DetectorEvent]:
        events = []
        if len(self.waits) >= 5:
            median = statistics.median(self.waits)
            if wait_s >= self.cfg.min_stall_s and wait_s > self.cfg.stall_factor * max(median, 1e-6):
                severity = "critical" if wait_s >= 10 * self.cfg.min_stall_s else "warning"
                events.append(DetectorEvent("data_stall", step, severity, wait_s,
                                            f"waited {wait_s:.2f}s for a batch (median {median:.3f}s)"))
        self.waits.append(wait_s)
        share = min(max(wait_s / step_time_s, 0.0), 1.0) if step_time_s > 0 else 0.0
        self.shares.append(share)
        if len(self.shares) == self.cfg.trend_window:
            rise = trend_rise(list(self.shares))
            if not self.rising and rise >= self.cfg.share_rise and share >= self.cfg.min_share:
                self.rising = True
                events.append(DetectorEvent("data_wait_rising", step, "warning", share,
                                            f"data-wait share rose {rise:.2f} over {len(self.shares)} steps"))
            elif self.rising and (rise < self.cfg.share_rise / 2 or share < self.cfg.min_share / 2):
                self.rising = False  # hysteresis: re-arm only once clearly recovered, so noise cannot flap it
        return events
