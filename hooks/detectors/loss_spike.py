"""Loss spikes: a robust z-score against a rolling median/MAD, and a ratio to the running mean.

Both must fire for `patience` consecutive steps. The z-score alone is too eager on a flat curve
(MAD → 0 makes tiny bumps look huge); the ratio alone misses spikes early in training when the loss
is still falling fast. Spiking values are kept out of the baseline so one spike does not hide the next.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from watchtower.hooks.detectors.events import DetectorEvent
from watchtower.validation import require

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution × this = its standard deviation


@dataclass
class LossSpikeConfig:
    """window: steps in the rolling baseline. warmup: steps seen before judging anything.
    z_threshold: robust z-score to call a spike; ratio_threshold: loss / running mean to call one.
    critical_ratio: a spike at or above this ratio is severity critical (pages), below it warning.
    patience: consecutive spiking steps before the event (raise it to ignore one-step blips).
    """

    window: int = 100
    warmup: int = 20
    z_threshold: float = 6.0
    ratio_threshold: float = 1.3
    critical_ratio: float = 2.0
    patience: int = 1
    mean_decay: float = 0.98  # decay of the running mean ratio_threshold compares with (0.98: ~50 steps)

    def __post_init__(self) -> None:
        require(self.window >= 5, "window", self.window, "must be >= 5 steps")
        require(1 <= self.warmup <= self.window, "warmup", self.warmup, "must be in [1, window]")
        require(self.z_threshold > 0, "z_threshold", self.z_threshold, "must be > 0")
        require(self.ratio_threshold > 1, "ratio_threshold", self.ratio_threshold, "must be > 1")
        require(self.critical_ratio >= self.ratio_threshold, "critical_ratio", self.critical_ratio,
                "must be >= ratio_threshold")
        require(self.patience >= 1, "patience", self.patience, "must be >= 1")
        require(0 < self.mean_decay < 1, "mean_decay", self.mean_decay, "must be in (0, 1)")


class LossSpikeDetector:
    """Feed it every step's loss in order; it returns the events that step caused.

    Example:
        >>> d = LossSpikeDetector(LossSpikeConfig(warmup=10))
        >>> events = [e for s in range(50) for e in d.update(s, 2.0 + 0.01 * (s % 3))]
        >>> events, [e.step for e in d.update(50, 6.0)]
        ([], [50])
    """

    def __init__(self, cfg: LossSpikeConfig):
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.running_mean: float | None = None
        self.streak = 0

    def update(self, step: int, loss: float) -> list[DetectorEvent]:
        if not math.isfinite(loss):
            return []  # non-finite values are the nonfinite detector's business
        if len(self.window) < self.cfg.warmup:
            self._accept(loss)
            return []
        median = statistics.median(self.window)
        mad = statistics.median(abs(x - median) for x in self.window)
        scale = MAD_TO_SIGMA * mad + 1e-3 * abs(median) + 1e-12  # floor: a flat curve is not infinitely sharp
        z = (loss - median) / scale
        ratio = loss / self.running_mean if self.running_mean and self.running_mean > 0 else 1.0
        if z > self.cfg.z_threshold and ratio > self.cfg.ratio_threshold:
            self.streak += 1
            if self.streak == self.cfg.patience:
                severity = "critical" if ratio >= self.cfg.critical_ratio else "warning"
                return [DetectorEvent("loss_spike", step, severity, loss,
                                      f"loss {loss:.4g} vs median {median:.4g} (z={z:.1f}, x{ratio:.2f} mean)")]
            return []
        self.streak = 0
        self._accept(loss)
        return []

    def _accept(self, loss: float) -> None:
        self.window.append(loss)
        d = self.cfg.mean_decay
        self.running_mean = loss if self.running_mean is None else d * self.running_mean + (1 - d) * loss
