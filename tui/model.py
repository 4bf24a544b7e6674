"""What the TUI shows, independent of where it came from (ranks' /metrics or Prometheus) and of Textual.

A source turns one poll into a `Snapshot`: one `RankRow` per rank it knows (a rank that stopped
answering stays, marked down, with its last labels), the alerts firing, the supervisor's events, and
each run's goodput (from its supervisor's /metrics).
`History` keeps a short per-run series of loss and throughput for the sparklines.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from watchtower.compute_budget import COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER

# metric name -> RankRow field, for the per-rank gauges both sources read
RANK_GAUGES = {
    "watchtower_train_step": "step",
    "watchtower_loss": "loss",
    "watchtower_tokens_per_second": "tokens_per_s",
    "watchtower_mfu_ratio": "mfu",
    "watchtower_data_wait_ratio": "data_wait",
    "watchtower_step_time_seconds": "step_time",
    "watchtower_heartbeat_timestamp_seconds": "heartbeat",
    "watchtower_replica_participating": "participating",
    "watchtower_tokens_per_parameter": "tokens_per_param",
    "watchtower_planned_tokens_per_parameter": "planned_tokens_per_param",
}
# per-GPU gauges (and the allocator's two counters, as their totals), reduced over a rank's GPUs (a
# rank normally drives one)
GPU_GAUGES = {
    "watchtower_gpu_utilization_ratio": ("gpu_util", max),
    "watchtower_gpu_memory_used_bytes": ("gpu_mem_used", sum),
    "watchtower_gpu_memory_total_bytes": ("gpu_mem_total", sum),
    "watchtower_gpu_temperature_celsius": ("gpu_temp", max),
    "watchtower_gpu_memory_peak_allocated_bytes": ("gpu_peak_allocated", sum),
    "watchtower_gpu_memory_peak_reserved_bytes": ("gpu_peak_reserved", sum),
    "watchtower_gpu_allocator_retries_total": ("gpu_alloc_retries", sum),
    "watchtower_gpu_allocator_ooms_total": ("gpu_ooms", sum),
}
RANK_KEY = ("run", "replica_group", "rank", "node")
# the supervisor's goodput ledger (per run), for the run view's goodput line
GOODPUT = ("watchtower_goodput_ratio", "watchtower_badput_seconds_total")
STALE_HEARTBEAT_S = 60.0  # no finished step for this long reads as a possible hang


@dataclass
class RankRow:
    run: str
    replica_group: str
    rank: str
    node: str
    target: str = ""
    up: bool = True
    step: float | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    data_wait: float | None = None
    step_time: float | None = None
    heartbeat: float | None = None
    participating: float | None = None
    tokens_per_param: float | None = None
    planned_tokens_per_param: float | None = None
    gpu_util: float | None = None
    gpu_mem_used: float | None = None
    gpu_mem_total: float | None = None
    gpu_temp: float | None = None
    gpu_peak_allocated: float | None = None  # the CUDA allocator's high-water marks and trouble counters
    gpu_peak_reserved: float | None = None
    gpu_alloc_retries: float | None = None
    gpu_ooms: float | None = None
    step_ratio: float | None = None  # step time ÷ the run's median, set by Snapshot.finish()
    heartbeat_age: float | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.run, self.replica_group, self.rank, self.node)

    @property
    def gpu_mem(self) -> float | None:
        if self.gpu_mem_used is None or not self.gpu_mem_total:
            return None
        return self.gpu_mem_used / self.gpu_mem_total

    def memory_line(self) -> str | None:
        """The allocator's view of the rank's GPU memory, one line under the table (fits 80 columns);
        None on a rank without CUDA.

        >>> RankRow("r", "0", "1", "n0", gpu_peak_allocated=61.2e9, gpu_peak_reserved=70.1e9,
        ...         gpu_mem_total=80e9, gpu_alloc_retries=3, gpu_ooms=0).memory_line()
        'g0 r1 n0  GPU peak 61.2G alloc / 70.1G reserved of 80.0G  retries 3  OOMs 0'
        """
        if self.gpu_peak_reserved is None and self.gpu_peak_allocated is None:
            return None
        gb = lambda v: "-" if v is None else f"{v / 1e9:.1f}G"  # noqa: E731
        return (f"g{self.replica_group} r{self.rank} {self.node[:9]}  GPU peak {gb(self.gpu_peak_allocated)} alloc / "
                f"{gb(self.gpu_peak_reserved)} reserved of {gb(self.gpu_mem_total)}  "
                f"retries {self.gpu_alloc_retries or 0:.0f}  OOMs {self.gpu_ooms or 0:.0f}")

    def badness(self) -> tuple:
        """Sort key for "worst first": down, then a stale heartbeat, then the slowest step."""
        age = self.heartbeat_age or 0.0
        return (not self.up, age if age > STALE_HEARTBEAT_S else 0.0, self.step_ratio or 0.0)


@dataclass
class Alert:
    name: str
    severity: str
    summary: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def run(self) -> str:
        return self.labels.get("run", "")


@dataclass
class Goodput:
    """A run's goodput from its supervisor: productive share of wall time, seconds lost by cause."""

    ratio: float | None = None
    badput: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        if name == GOODPUT[0]:
            self.ratio = value
        elif name == GOODPUT[1] and "cause" in labels:
            self.badput[labels["cause"]] = value

    def line(self, causes: int = 4) -> str:
        """One line for the run view: the ratio and the largest causes of lost time.

        >>> Goodput(0.62, {"startup": 40.0, "idle_spare": 12.5, "recovery": 0.0}).line()
        'goodput 62%   lost: startup 40s, idle_spare 12s'
        """
        worst = sorted(((c, s) for c, s in self.badput.items() if s >= 0.5), key=lambda cs: -cs[1])[:causes]
        lost = ", ".join(f"{c} {s:.0f}s" for c, s in worst) or "nothing yet"
        ratio = "-" if self.ratio is None else f"{self.ratio:.0%}"
        return f"goodput {ratio}   lost: {lost}"


def _ratio(x: float) -> str:
    """Two significant digits below 10, whole numbers above: 0.012, 3.2, 64, 4,400."""
    return f"{x:.2g}" if x < 10 else f"{x:,.0f}"


@dataclass
class RunSummary:
    run: str
    ranks: int
    down: int
    groups: int
    step: float | None
    loss: float | None
    tokens_per_s: float | None
    alerts: int


@dataclass
class Snapshot:
    rows: list[RankRow] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    goodput: dict[str, Goodput] = field(default_factory=dict)  # run -> its supervisor's ledger
    source: str = ""
    error: str = ""  # the source itself failed (Prometheus unreachable): shown, never raised
    taken_at: float = 0.0

    def finish(self, now: float) -> "Snapshot":
        """Derived columns: heartbeat age, step time relative to the run's median."""
        self.taken_at = now
        for row in self.rows:
            row.heartbeat_age = None if row.heartbeat is None else max(now - row.heartbeat, 0.0)
        for run in self.runs():
            times = [r.step_time for r in self.rows if r.run == run and r.up and r.step_time]
            median = statistics.median(times) if times else None
            for r in self.rows:
                if r.run == run:
                    r.step_ratio = r.step_time / median if (median and r.step_time and r.up) else None
        return self

    def budget_line(self, run: str) -> str | None:
        """The run's tokens per parameter, now and planned, beside the compute-optimal reference (the
        busiest rank's: a hot spare reports none); None while no live rank reports it.

        >>> row = RankRow("r", "0", "0", "n0", tokens_per_param=3.21, planned_tokens_per_param=64.0)
        >>> Snapshot([row]).budget_line("r")
        'tokens/param 3.2 now, 64 planned   compute-optimal 20'
        """
        rows = [r for r in self.rows if r.run == run and r.up and r.tokens_per_param is not None]
        if not rows:
            return None
        now = max(r.tokens_per_param for r in rows)
        planned = [r.planned_tokens_per_param for r in rows if r.planned_tokens_per_param is not None]
        plan = f", {_ratio(max(planned))} planned" if planned else ""
        return f"tokens/param {_ratio(now)} now{plan}   compute-optimal {_ratio(COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER)}"

    def runs(self) -> list[str]:
        return sorted({r.run for r in self.rows} | {a.run for a in self.alerts if a.run})

    def summaries(self) -> list[RunSummary]:
        out = []
        for run in self.runs():
            rows = [r for r in self.rows if r.run == run]
            up = [r for r in rows if r.up]
            first = [r for r in up if r.rank == "0"]  # TP ranks of a group share tokens and loss
            losses = [r.loss for r in first if r.loss is not None]
            out.append(RunSummary(
                run, len(rows), len(rows) - len(up), len({r.replica_group for r in rows}),
                max((r.step for r in up if r.step is not None), default=None),
                statistics.fmean(losses) if losses else None,
                sum(r.tokens_per_s for r in first if r.tokens_per_s is not None) if first else None,
                sum(1 for a in self.alerts if a.run == run)))
        return out


class History:
    """Per-run series of the mean loss and total tokens/s, one point per poll, for sparklines."""

    def __init__(self, length: int = 120):
        self.length = length
        self.loss: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[float]] = {}

    def add(self, snapshot: Snapshot) -> None:
        for s in snapshot.summaries():
            if s.loss is not None:
                self.loss.setdefault(s.run, deque(maxlen=self.length)).append(s.loss)
            if s.tokens_per_s is not None:
                self.tokens.setdefault(s.run, deque(maxlen=self.length)).append(s.tokens_per_s)
