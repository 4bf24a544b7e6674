"""Host (psutil) and GPU (NVML) health, sampled on a background thread.

Sampling runs every `system_interval_s` on a daemon thread, away from the training loop, and
stores plain numbers that the exporter reads at scrape time. No NVML (a CPU machine, a driver
without it) is normal: the GPU half simply reports nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import psutil

log = logging.getLogger("watchtower.hooks")

THROTTLE_REASONS = {  # NVML clocks-event reason bits worth an alert
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}


@dataclass
class HostSample:
    cpu_ratio: float = 0.0
    memory_used_ratio: float = 0.0
    rss_bytes: float = 0.0
    disk_read_bytes: float | None = None
    disk_written_bytes: float | None = None
    net_received_bytes: float | None = None
    net_sent_bytes: float | None = None


@dataclass
class GpuSample:
    index: int
    utilization_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    sm_clock_hertz: float | None = None
    throttled: dict[str, int] = field(default_factory=dict)
    ecc_errors: dict[str, float] = field(default_factory=dict)
    xid_errors: Counter = field(default_factory=Counter)


def sample_host(process: psutil.Process) -> HostSample:
    s = HostSample(cpu_ratio=psutil.cpu_percent(interval=None) / 100.0,
                   memory_used_ratio=psutil.virtual_memory().percent / 100.0,
                   rss_bytes=float(process.memory_info().rss))
    disk = psutil.disk_io_counters()
    if disk is not None:
        s.disk_read_bytes, s.disk_written_bytes = float(disk.read_bytes), float(disk.write_bytes)
    net = psutil.net_io_counters()
    if net is not None:
        s.net_received_bytes, s.net_sent_bytes = float(net.bytes_recv), float(net.bytes_sent)
    return s


class NvmlGpu:
    """One GPU through NVML; `open` returns None where there is no NVML or no such GPU."""

    def __init__(self, nvml, handle, index: int):
        self.nvml, self.handle, self.index = nvml, handle, index
        self.xids: Counter = Counter()
        self.event_set = None
        try:
            self.event_set = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self.event_set)
        except Exception:  # noqa: BLE001 - XID events need a capable driver; the rest still works
            self.event_set = None

    @classmethod
    def open(cls, index: int, pci_bus_id: str | None = None) -> "NvmlGpu | None":
        try:
            import pynvml as nvml

            nvml.nvmlInit()
            handle = (nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id) if pci_bus_id
                      else nvml.nvmlDeviceGetHandleByIndex(index))
            return cls(nvml, handle, index)
        except Exception as err:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
            log.debug("no NVML for GPU %s: %s", index, err)
            return None

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except Exception:  # noqa: BLE001 - a field the driver does not support stays absent
            return None

    def sample(self) -> GpuSample:
        n = self.nvml
        s = GpuSample(self.index)
        util = self._try(n.nvmlDeviceGetUtilizationRates)
        if util is not None:
            s.utilization_ratio = util.gpu / 100.0
        mem = self._try(n.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            s.memory_used_bytes, s.memory_total_bytes = float(mem.used), float(mem.total)
        temp = self._try(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU)
        s.temperature_celsius = None if temp is None else float(temp)
        power = self._try(n.nvmlDeviceGetPowerUsage)
        s.power_watts = None if power is None else power / 1000.0
        clock = self._try(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM)
        s.sm_clock_hertz = None if clock is None else clock * 1e6
        reasons_fn = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        reasons = self._try(reasons_fn) if reasons_fn else None
        if reasons is not None:
            s.throttled = {name: int(bool(reasons & bit)) for name, bit in THROTTLE_REASONS.items()}
        for kind, const in (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                            ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")):
            count = self._try(n.nvmlDeviceGetTotalEccErrors, getattr(n, const), n.NVML_VOLATILE_ECC)
            if count is not None:
                s.ecc_errors[kind] = float(count)
        self._drain_xids()
        s.xid_errors = Counter(self.xids)
        return s

    def _drain_xids(self) -> None:
        if self.event_set is None:
            return
        while True:
            try:
                data = self.nvml.nvmlEventSetWait_v2(self.event_set, 0)
            except Exception:  # noqa: BLE001 - NVMLError_Timeout: no event pending
                return
            self.xids[str(data.eventData)] += 1


class SystemSampler:
    """Samples the host and (optionally) one GPU on a daemon thread."""

    def __init__(self, interval_s: float, gpu_index: int | None = None, pci_bus_id: str | None = None):
        self.interval_s = interval_s
        self.process = psutil.Process()
        psutil.cpu_percent(interval=None)  # first call primes the counter
        self.host = sample_host(self.process)
        self.gpu = NvmlGpu.open(gpu_index, pci_bus_id) if gpu_index is not None else None
        self.gpu_sample = self.gpu.sample() if self.gpu else None
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchtower-system", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.host = sample_host(self.process)
                if self.gpu:
                    self.gpu_sample = self.gpu.sample()
            except Exception as err:  # noqa: BLE001 - a failed sample keeps the previous one
                self.errors += 1
                if self.errors == 1:
                    log.warning("system sampling failed: %s", err)

    def close(self) -> None:
        self._stop.set()
