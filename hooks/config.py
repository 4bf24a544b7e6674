"""The monitor's configuration: the `[monitor]` table of a job file, or built in code.

Example:
    >>> cfg = MonitorConfig(port=0, log_interval=5)
    >>> cfg.loss_spike.z_threshold
    6.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

from watchtower.hooks.detectors.data_stall import DataStallConfig
from watchtower.hooks.detectors.loss_spike import LossSpikeConfig
from watchtower.hooks.detectors.throughput import ThroughputConfig
from watchtower.validation import require


@dataclass
class MonitorConfig:
    """enabled: false turns every hook into a no-op (for A/B overhead runs).
    port: base port of /metrics; rank with local rank L serves on port + L. 0: no HTTP exporter.
        A taken port is a warning and the next free one is used.
    bind: address /metrics listens on; 0.0.0.0 so a Prometheus on another host can scrape it.
    log_interval: steps between copies of the device-side loss/grad-norm buffers to the host.
        Raise it if even one non-blocking copy per interval shows in a profile; the detectors still
        see every step's value, only later.
    parallel_check_interval: steps between TP/DP fingerprint checks (one small all-gather each);
        the first check runs after step 1 so a seed bug is caught before it costs anything.
    nonfinite_action: "count" (default, never syncs) or "skip_step": `StepHandle.should_step()`
        reads the finite flag on the host, one sync per step, and tells the loop to skip the
        optimizer step. Pick skip_step when one NaN step would ruin the run (no loss scaling).
    peak_flops: the device's peak FLOP/s for MFU; 0 looks the GPU up in a table of known parts
        (bf16 dense). CPUs are not in the table: MFU is not exported unless this is set.
    system_interval_s: seconds between GPU (NVML) and host (psutil) samples, taken on a
        background thread.
    linger_s: keep /metrics up this long after `close()`, so Prometheus scrapes the final values
        of a short run (its scrape interval is a good value).
    """

    enabled: bool = True
    port: int = 9400
    bind: str = "0.0.0.0"
    log_interval: int = 10
    parallel_check_interval: int = 50
    nonfinite_action: str = "count"
    peak_flops: float = 0.0
    system_interval_s: float = 5.0
    linger_s: float = 0.0
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    data_stall: DataStallConfig = field(default_factory=DataStallConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", self.port, "must be a TCP port (0 turns the exporter off)")
        require(self.log_interval >= 1, "log_interval", self.log_interval, "must be >= 1 step")
        require(self.parallel_check_interval >= 0, "parallel_check_interval", self.parallel_check_interval,
                "must be >= 0 steps (0 turns the checks off)")
        require(self.nonfinite_action in ("count", "skip_step"), "nonfinite_action", self.nonfinite_action,
                "must be count or skip_step")
        require(self.peak_flops >= 0, "peak_flops", self.peak_flops, "must be >= 0 FLOP/s (0: look it up)")
        require(self.linger_s >= 0, "linger_s", self.linger_s, "must be >= 0 seconds")
        require(self.system_interval_s > 0, "system_interval_s", self.system_interval_s, "must be > 0 seconds")
