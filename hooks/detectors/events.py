"""What a detector reports: one event per incident, with the step it was seen at."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetectorEvent:
    detector: str  # loss_spike, nonfinite, data_stall, data_wait_rising, throughput_drop, tp_*, dp_drift
    step: int
    severity: str  # "warning" (worth a ticket) or "critical" (worth a page)
    value: float  # the observation that fired it (the loss, the wait in seconds, the ratio, ...)
    detail: str = ""
