"""The Monitor: the few lines a training loop adds to be observed.

Example (a complete loop; runs on CPU):
    >>> import torch
    >>> from watchtower.hooks import Monitor, MonitorConfig, RankIdentity
    >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = Monitor(MonitorConfig(port=0, log_interval=2), RankIdentity(run="doc"))
    >>> loader = monitor.wrap([torch.randn(8, 4) for _ in range(4)])
    >>> for x in loader:
    ...     with monitor.step(tokens=x.shape[0]) as s:
    ...         loss = model(x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
    ...         s.record(loss=loss, lr=0.1)
    >>> monitor.close(); monitor.state.step
    4

What each part costs:
- `wrap`: two `perf_counter` calls per batch.
- `step`: two `perf_counter` calls, on GPU two CUDA events, and appending 0-d tensors to a list:
  loss and grad norm stay on the device, and so does a token count given as a tensor (e.g. an
  attention mask's sum: it is counted when the interval's copy arrives). Every `log_interval` steps they are stacked and copied to
  the host without blocking; the detectors then see every step's value. No host sync per step.
- parallel checks: one small all-gather every `parallel_check_interval` steps.
- GPU memory (CUDA only): one `torch.cuda.memory_stats()` per log interval, host-side counters
  (peaks, allocator retries, OOMs; see hooks/allocator.py), never a sync.
- system metrics: a background thread; scrapes: the exporter's thread.
Any exception inside these is counted in `watchtower_hook_errors_total` and logged once.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from prometheus_client import CollectorRegistry

from watchtower import __version__
from watchtower.compute_budget import ComputeBudget
from watchtower.hooks.allocator import read_allocator
from watchtower.hooks.config import MonitorConfig
from watchtower.hooks.detectors import (DataStallDetector, DetectorEvent, LossSpikeDetector,
                                        ThroughputDropDetector)
from watchtower.hooks.device_series import DeviceSeries
from watchtower.hooks.exporter import Families, MonitorCollector, serve_metrics
from watchtower.hooks.fingerprint import GroupLike, ParallelCheckResult, check_parallel
from watchtower.hooks.flops import peak_flops_for
from watchtower.hooks.identity import RankIdentity
from watchtower.hooks.safety import HookErrors
from watchtower.hooks.system import SystemSampler
from watchtower.metric_catalog import ALL_METRICS, RANK_LABELS

log = logging.getLogger("watchtower.hooks")

PARALLEL_CHECKS = ("tp_replicated", "tp_shards_distinct", "dp_replicas")


@dataclass
class MonitorState:
    """Plain numbers the exporter reads at scrape time."""

    step: int = 0
    steps_total: int = 0  # applied steps; a skipped one goes to skipped_steps_total
    skipped_steps_total: int = 0
    uncommitted_steps_total: int = 0  # attempts the replicas did not commit (redone): neither of the above
    step_time_s: float | None = None
    step_time_total_s: float = 0.0
    tokens_total: float = 0.0
    tokens_per_s: float | None = None
    mfu: float | None = None
    data_wait_total_s: float = 0.0
    data_wait_ratio: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    heartbeat: float | None = None
    event_counts: Counter = field(default_factory=Counter)  # (detector, severity) -> n
    last_event_step: dict[str, int] = field(default_factory=dict)
    parallel_ok: dict[str, int] = field(default_factory=dict)
    parallel_checks: Counter = field(default_factory=Counter)
    extra_gauges: dict[str, float] = field(default_factory=dict)
    extra_counters: dict[str, float] = field(default_factory=dict)
    allocator: dict[str, float] = field(default_factory=dict)  # CUDA allocator counters, catalog name -> value


@dataclass
class _StepRecord:
    step: int
    seconds: float
    wait_s: float
    tokens: float | None  # None: a device count still on its way (see Monitor._take_ready_records)


class StepHandle:
    """What `with monitor.step() as s` gives: `s.record(...)`, `s.should_step()` and the two marks."""

    def __init__(self, monitor: "Monitor", step: int, tokens: float | torch.Tensor):
        self.monitor, self.step, self.tokens = monitor, step, tokens
        self._loss = self._grad_norm = None
        self.skipped = False  # set by should_step(): the loop was told not to apply this step
        self.committed = True  # cleared by mark_uncommitted(): the attempt is dropped and redone

    def __enter__(self) -> "StepHandle":
        with self.monitor.errors.guard("step_enter"):
            self.monitor._step_started(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            with self.monitor.errors.guard("step_exit"):
                self.monitor._step_finished(self)
            # apart from the bookkeeping above: a failure there must not make this rank alone
            # leave out a collective its peers are waiting in
            with self.monitor.errors.guard("check_parallel"):
                self.monitor._check_parallel_if_due(self.step)
        return False  # the trainer's own exceptions are its own: never swallowed

    def record(self, loss: Any = None, grad_norm: Any = None, lr: Any = None, tokens: Any = None) -> None:
        """Hand over this step's loss and grad norm (tensors stay on the device) and the lr.

        tokens: this step's token count when it is known only inside the step (a framework's loop
        hands the batch over after the step began); it replaces `step(tokens=...)`. A tensor stays
        on the device, like the loss.
        """
        with self.monitor.errors.guard("record"):
            self.monitor._record(self, loss, grad_norm, lr)
            if tokens is not None:
                self.tokens = _token_count(tokens)

    def should_step(self) -> bool:
        """False when the step's loss or grad norm is not finite and nonfinite_action=skip_step.

        With the default nonfinite_action=count this is always True and reads nothing from the
        device; with skip_step it costs one host sync per step (that is the price of skipping).
        A step it answers False for is exported as skipped, not as a step, and its tokens are not
        counted (the loop is expected to follow the answer).
        """
        try:
            ok = self.monitor._should_step(self)
        except Exception as err:  # noqa: BLE001
            self.monitor.errors.record("should_step", err)
            ok = True
        self.skipped = not ok
        return ok

    def mark_skipped(self) -> None:
        """Tell the monitor this step's update was not applied although `should_step()` said to
        (e.g. replica groups voted to skip it): it counts as skipped, not as a step or tokens."""
        self.skipped = True

    def mark_uncommitted(self) -> None:
        """Tell the monitor this attempt was thrown away and the loop will run the same step again
        (torchft's `should_commit()` was False: a peer failed mid-step).

        The attempt counts in `watchtower_uncommitted_steps_total` only: not as a step, not as a skip
        (whatever `should_step()` said) and not as tokens, so the redo is counted once, as what it
        turns out to be. Its wall time still counts as step time, so tokens/s and MFU show the redo as
        lost throughput. The step number does not move; the heartbeat does (the rank is alive).
        Costs one attribute write: nothing is read from the device.
        """
        self.committed = False


def _token_count(tokens: Any) -> float | torch.Tensor:
    """A tensor stays on its device (reading it here would be a host sync); anything else is a float."""
    if isinstance(tokens, torch.Tensor):
        return tokens.detach()
    return float(tokens or 0)


class _NullStep:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, *args, **kwargs) -> None:
        pass

    def should_step(self) -> bool:
        return True

    def mark_skipped(self) -> None:
        pass

    def mark_uncommitted(self) -> None:
        pass


class _PassThrough:
    """Reads, writes, `len()` and copies reach the wrapped loader, as if it were not wrapped at all.

    A copy is a new wrapper around a copy of the loader, timing into the same monitor (the monitor
    itself, with its threads and locks, is never copied).
    """

    __slots__ = ("_source", "_monitor")

    def __init__(self, source: Any, monitor: "Monitor"):
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_monitor", monitor)

    def __copy__(self):
        # copy's default path rebuilds the slots through __setattr__, which would write to the
        # loader of a copy that has none yet
        return type(self)(copy.copy(self._source), self._monitor)

    def __deepcopy__(self, memo: dict):
        return type(self)(copy.deepcopy(self._source, memo), self._monitor)

    def __getattr__(self, name: str):  # only for names the wrapper itself lacks: sampler, set_epoch, ...
        if name in _PassThrough.__slots__:  # half-built (copy, pickle): no endless recursion
            raise AttributeError(name)
        return getattr(self._source, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._source, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._source, name)

    def __len__(self) -> int:
        return len(self._source)  # the loader's own TypeError when it has no length

    def __bool__(self) -> bool:
        return bool(self._source)

    def __repr__(self) -> str:
        return f"<timed {self._source!r}>"


class _TimedIterator(_PassThrough):
    """An iterator whose every `next()` is timed as data wait."""

    __slots__ = ()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        item = next(self._source)  # StopIteration and the loader's own errors pass through untouched
        self._monitor._add_wait(time.perf_counter() - start)
        return item


class _TimedLoader(_PassThrough):
    """A re-iterable loader (a DataLoader, a list): every `iter()` is a fresh timed iterator."""

    __slots__ = ()

    def __iter__(self) -> Iterator:
        start = time.perf_counter()
        it = iter(self._source)  # a DataLoader starts its workers here: waiting on that is data wait too
        self._monitor._add_wait(time.perf_counter() - start)
        return _TimedIterator(it, self._monitor)


class _TimedIndexedLoader(_TimedLoader):
    """A re-iterable loader that can also be indexed (a list of batches): `loader[i]` passes through.

    A class of its own so that a wrapper has `__getitem__` exactly when its loader has (code that
    asks `hasattr(loader, "__getitem__")` gets the loader's answer). Indexing is not timed: a
    DataLoader indexes a dataset inside its own `next()`, which may already be timed, and a
    per-index timer there would count that wait twice.
    """

    __slots__ = ()

    def __getitem__(self, key):
        return self._source[key]


class Monitor:
    """Observes one training rank; see the module docstring for a complete loop."""

    def __init__(self, config: MonitorConfig | None = None, identity: RankIdentity | None = None, *,
                 registry: CollectorRegistry | None = None, flops_per_token: float = 0.0,
                 model_name: str = "", config_hash: str = "", device: torch.device | str | None = None):
        self.cfg = config or MonitorConfig()
        self.identity = identity or RankIdentity()
        self.errors = HookErrors()
        self.state = MonitorState()
        self.events: deque[DetectorEvent] = deque(maxlen=1000)
        self.info = {"model": model_name, "config_hash": config_hash, "version": __version__}
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.port: int | None = None
        self._server = None
        self._sampler: SystemSampler | None = None
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._gpu_index: int | None = None  # the CUDA device's index: the `gpu` label of its metrics
        self._flops_per_token = flops_per_token
        self._peak_flops = self.cfg.peak_flops
        self._losses, self._grad_norms, self._token_counts = DeviceSeries(), DeviceSeries(), DeviceSeries()
        self._records: list[_StepRecord] = []
        self._cuda_events: deque[tuple[int, Any, Any]] = deque()
        self._pending_wait = 0.0
        self._last_exit: float | None = None
        self._watched: tuple[Any, GroupLike, GroupLike] | None = None
        self._first_step: int | None = None  # the first step's parallel check, whatever its number
        self._skip_logged = False
        self._spike = LossSpikeDetector(self.cfg.loss_spike)
        self._stall = DataStallDetector(self.cfg.data_stall)
        self._throughput = ThroughputDropDetector(self.cfg.throughput)
        self._nonfinite_steps: set[int] = set()
        self._budget: ComputeBudget | None = None
        if not self.cfg.enabled:
            return
        with self.errors.guard("start"):
            self._start()

    @classmethod
    def from_env(cls, config: MonitorConfig | None = None, **kwargs) -> "Monitor":
        """A monitor labelled from the launcher's environment (see `RankIdentity.from_env`)."""
        return cls(config, RankIdentity.from_env(), **kwargs)

    def _start(self) -> None:
        gpu_index = pci = None
        if self._device.type == "cuda" and torch.cuda.is_available():
            gpu_index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            self._gpu_index = gpu_index
            props = torch.cuda.get_device_properties(gpu_index)
            if not self._peak_flops:
                self._peak_flops = peak_flops_for(props.name)
            if hasattr(props, "pci_bus_id"):
                pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        self._sampler = SystemSampler(self.cfg.system_interval_s, gpu_index, pci)
        self.registry.register(MonitorCollector(self))
        if self.cfg.port:
            try:
                self._server, self.port = serve_metrics(self.registry, self.cfg.port + self.identity.local_rank,
                                                        self.cfg.bind)
            except OSError as err:
                log.warning("watchtower /metrics is off for this rank: %s", err)

    # ---- the loop's API ------------------------------------------------------------------

    def wrap(self, iterable: Iterable) -> Iterable:
        """Wrap a data loader so every wait for the next batch is timed; otherwise it is the loader.

        A re-iterable loader (a DataLoader, a list) stays re-iterable: each `for` gets a fresh timed
        iterator, so every epoch is seen. An iterator or generator stays an iterator (`next()` works).
        `len()`, indexing, `copy`, attributes (`sampler`, `dataset`, `set_epoch`, ...) and attribute
        writes reach the loader. Costs two `perf_counter` calls per batch and per epoch.

        Wrapping what this monitor already times (wrap(wrap(x)), or an epoch's iterator of a wrapped
        loader) returns it unchanged: every wait is counted once. A loader another monitor wrapped
        is wrapped again; each monitor then times each wait once, in its own metrics.
        """
        if not self.cfg.enabled or self._times(iterable):
            return iterable
        kind = type(iterable)
        if hasattr(kind, "__next__"):
            return _TimedIterator(iterable, self)
        if hasattr(kind, "__getitem__"):
            return _TimedIndexedLoader(iterable, self)
        if hasattr(kind, "__iter__"):
            return _TimedLoader(iterable, self)
        # not iterable: the loop's problem, not ours; counted and handed back untouched
        self.errors.record("wrap", TypeError(f"{kind.__name__} is not iterable"))
        return iterable

    def _times(self, iterable: Any) -> bool:
        """Whether a wrapper of this monitor is anywhere in `iterable`'s chain of wrappers."""
        while isinstance(iterable, _PassThrough):
            if iterable._monitor is self:
                return True
            iterable = iterable._source
        return False

    def step(self, tokens: Any = 0, step: int | None = None) -> StepHandle | _NullStep:
        """Context manager around one optimizer step. `step`: the global step (default: count).

        tokens: the step's tokens on this rank; a 0-d tensor (e.g. `attention_mask.sum()`) is fine
        and stays on the device: tokens_total and tokens/s then count it at the next log interval.
        """
        if not self.cfg.enabled:
            return _NullStep()
        try:
            number = int(step) if step is not None else self.state.step + 1
            return StepHandle(self, number, _token_count(tokens))
        except Exception as err:  # noqa: BLE001
            self.errors.record("step", err)
            return _NullStep()

    def watch(self, model: Any, tp_group: GroupLike = None, dp_group: GroupLike = None) -> None:
        """Check `model` across TP ranks and DP replicas every parallel_check_interval steps."""
        self._watched = (model, tp_group, dp_group)

    def check_parallel(self, model: Any = None, tp_group: GroupLike = None,
                       dp_group: GroupLike = None) -> ParallelCheckResult | None:
        """Run the TP/DP fingerprint checks now (every rank of the groups must call it together).

        A rank that cannot fingerprint its parameters counts a `check_parallel` hook error; every
        rank of the group then skips that check (it neither passes nor fails), and none hangs.
        """
        if model is None and self._watched:
            model, tp_group, dp_group = self._watched
        if model is None:
            return None
        with self.errors.guard("check_parallel"):
            result = check_parallel(model, tp_group, dp_group)
            for err in result.errors:
                self.errors.record("check_parallel", err)
            if result.skipped:
                level = logging.DEBUG if self._skip_logged else logging.WARNING
                self._skip_logged = True
                log.log(level, "watchtower skipped the %s check(s) at step %d: a rank of the group could not "
                        "fingerprint its parameters", ", ".join(sorted(result.skipped)), self.state.step)
            failures = {"tp_replicated": result.tp_replicated_mismatch,
                        "tp_shards_distinct": result.tp_identical_shards,
                        "dp_replicas": result.dp_drift}
            events = {"tp_replicated": "tp_replicated_divergence", "tp_shards_distinct": "tp_identical_shards",
                      "dp_replicas": "dp_drift"}
            for check in result.checked:
                bad = failures[check]
                self.state.parallel_checks[check] += 1
                self.state.parallel_ok[check] = 0 if bad else 1
                if bad:
                    self._emit(DetectorEvent(events[check], self.state.step, "critical", float(len(bad)),
                                             ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")))
            return result
        return None

    def set_gauge(self, name: str, value: float) -> None:
        """Export a declared per-rank gauge the loop knows best (e.g. replica participants)."""
        with self.errors.guard("set_gauge"):
            spec = ALL_METRICS[name]
            if spec.kind != "gauge" or spec.labels != RANK_LABELS:
                raise ValueError(f"{name} is not a per-rank gauge")
            self.state.extra_gauges[name] = float(value)

    def count(self, name: str, amount: float) -> None:
        """Add to a declared per-rank counter the loop knows best (e.g. seconds spent saving a
        checkpoint); `count(name, 0)` exports it at zero before the first real amount."""
        with self.errors.guard("count"):
            spec = ALL_METRICS[name]
            if spec.kind != "counter" or spec.labels != RANK_LABELS:
                raise ValueError(f"{name} is not a per-rank counter")
            if amount < 0:
                raise ValueError(f"{name} cannot go down (amount {amount})")
            self.state.extra_counters[name] = self.state.extra_counters.get(name, 0.0) + float(amount)

    def add_data_wait(self, seconds: float) -> None:
        """Count `seconds` the loop spent waiting for its next batch, for a loop that times its own
        fetches (a framework's loop, where `wrap` cannot reach the loader); it lands on the step
        that is running or about to run, as a `wrap`ped loader's wait does. Costs one addition."""
        with self.errors.guard("add_data_wait"):
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"a data wait of {seconds} s")
            self._add_wait(float(seconds))

    def set_compute_budget(self, parameters: int, total_steps: int = 0, data_parallel: int = 1) -> None:
        """Export tokens per parameter, now and planned at `total_steps` (see watchtower.compute_budget).

        parameters: the whole model's count (under TP, not one shard's). data_parallel: ranks or
        replica groups that see different data. Call it again when the plan changes. Costs nothing
        per step: the ratios are worked out at scrape time.
        """
        with self.errors.guard("set_compute_budget"):
            self._budget = ComputeBudget(int(parameters), int(total_steps), int(data_parallel))

    def close(self) -> None:
        """Flush what is buffered (waiting for in-flight copies) and stop the background threads."""
        if not self.cfg.enabled:
            return
        with self.errors.guard("close"):
            self._flush(wait=True)
        if self._sampler:
            self._sampler.close()
        if self._server is not None:
            if self.cfg.linger_s:
                time.sleep(self.cfg.linger_s)
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- internals -------------------------------------------------------------------------

    def _add_wait(self, seconds: float) -> None:
        self._pending_wait += seconds

    def _step_started(self, handle: StepHandle) -> None:
        handle._start = time.perf_counter()
        if self._device.type == "cuda":
            handle._cuda_start = torch.cuda.Event(enable_timing=True)
            handle._cuda_start.record()

    def _record(self, handle: StepHandle, loss: Any, grad_norm: Any, lr: Any) -> None:
        if loss is not None:
            handle._loss = loss
            self._losses.append(handle.step, loss)
        if grad_norm is not None:
            handle._grad_norm = grad_norm
            self._grad_norms.append(handle.step, grad_norm)
        if lr is not None:
            self.state.lr = float(lr)

    def _should_step(self, handle: StepHandle) -> bool:
        if self.cfg.nonfinite_action != "skip_step":
            return True
        values = [v for v in (handle._loss, handle._grad_norm) if v is not None]
        finite = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)  # the host sync
        return finite

    def _step_finished(self, handle: StepHandle) -> None:
        now = time.perf_counter()
        start = self._last_exit if self._last_exit is not None else getattr(handle, "_start", now)
        seconds = max(now - start, 1e-9)  # iteration time: includes the wait for this step's batch
        self._last_exit = now
        wait, self._pending_wait = self._pending_wait, 0.0
        if self._device.type == "cuda" and hasattr(handle, "_cuda_start"):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_events.append((handle.step, handle._cuda_start, end))
        s = self.state
        tokens = self._count_attempt(handle)
        s.step_time_total_s += seconds  # wall time of every attempt: skipped, redone or applied
        if isinstance(tokens, torch.Tensor):
            self._token_counts.append(handle.step, tokens)
            tokens = None  # counted when the interval's copy arrives
        else:
            s.tokens_total += tokens
        s.data_wait_total_s += wait
        s.heartbeat = time.time()
        self._records.append(_StepRecord(handle.step, seconds, wait, tokens))
        attempts = s.steps_total + s.skipped_steps_total + s.uncommitted_steps_total
        if attempts % self.cfg.log_interval == 0:
            self._flush(wait=False)
        if handle.committed:  # published after the flush: a scrape that reads this step reads its detectors
            s.step = handle.step

    def _count_attempt(self, handle: StepHandle) -> float | torch.Tensor:
        """Count the attempt as exactly one of applied, skipped or uncommitted; its applied tokens.

        Only a committed attempt is a step: a skipped one still moves the step number (it is done,
        without an update; _step_finished moves it, after the interval's flush); an uncommitted one is
        redone under the same number, so it moves nothing.
        """
        s = self.state
        if not handle.committed:
            s.uncommitted_steps_total += 1
            return 0.0
        if handle.skipped:
            s.skipped_steps_total += 1
            return 0.0
        s.steps_total += 1
        return handle.tokens

    def _check_parallel_if_due(self, step: int) -> None:
        """The watched model's TP/DP checks, at the first step this monitor sees and every
        parallel_check_interval-th step.

        Whether a check is due depends on the step number only (and the first one, which every rank
        of a group shares), never on what succeeded on this rank: every rank enters the collectives.
        """
        interval = self.cfg.parallel_check_interval
        if not (self._watched and interval):
            return
        if self._first_step is None:
            self._first_step = step
        periodic = step % interval == 0
        if periodic or step == self._first_step:
            model, tp_group, dp_group = self._watched
            # TP checks stay inside this group; the DP check is a collective across replica groups,
            # so it runs only on global-step multiples, where every group is at the same point
            # (a group that just joined must not start one on its own first step).
            self.check_parallel(model, tp_group, dp_group if periodic else None)

    def _flush(self, wait: bool) -> None:
        """Turn the interval's records and the device buffers into metrics and detector events."""
        records = self._take_ready_records(wait)
        if records:
            elapsed = sum(r.seconds for r in records)
            self.state.step_time_s = elapsed / len(records)
            self.state.tokens_per_s = sum(r.tokens for r in records) / elapsed
            self.state.data_wait_ratio = min(sum(r.wait_s for r in records) / elapsed, 1.0)
            if self._peak_flops and self._flops_per_token:
                self.state.mfu = self.state.tokens_per_s * self._flops_per_token / self._peak_flops
            for r in records:
                for event in self._stall.update(r.step, r.wait_s, r.seconds):
                    self._emit(event)
                for event in self._throughput.update(r.step, r.tokens / r.seconds):
                    self._emit(event)
        self._harvest_cuda_times()
        self._losses.flush()
        self._grad_norms.flush()
        for step, loss in self._losses.harvest(wait):
            self.state.loss = loss
            self._check_finite(step, "loss", loss)
            for event in self._spike.update(step, loss):
                self._emit(event)
        for step, norm in self._grad_norms.harvest(wait):
            self.state.grad_norm = norm
            self._check_finite(step, "grad_norm", norm)
        if self._gpu_index is not None:
            self.state.allocator = read_allocator(torch.device("cuda", self._gpu_index))

    def _take_ready_records(self, wait: bool) -> list[_StepRecord]:
        """The records whose tokens are known, oldest first; the rest wait for the next flush.

        Device token counts arrive in step order, one per record that has none yet: each is filled
        in and counted in tokens_total. On CPU all of them arrive at once; on GPU an interval's
        counts usually arrive at the next flush, so its tokens/s is reported one interval late.
        """
        self._token_counts.flush()
        arrived = iter([n for _, n in self._token_counts.harvest(wait)])
        ready = 0
        for r in self._records:
            if r.tokens is None:
                r.tokens = next(arrived, None)
                if r.tokens is None:
                    break
                self.state.tokens_total += r.tokens
            ready += 1
        records, self._records = self._records[:ready], self._records[ready:]
        return records

    def _harvest_cuda_times(self) -> None:
        """GPU-side step times from CUDA events whose end has already passed (never waits)."""
        times = []
        while self._cuda_events and self._cuda_events[0][2].query():
            _, start, end = self._cuda_events.popleft()
            times.append(start.elapsed_time(end) / 1000.0)
        if times:
            self.state.step_time_s = sum(times) / len(times)

    def _check_finite(self, step: int, what: str, value: float) -> None:
        if math.isfinite(value) or step in self._nonfinite_steps:
            return
        self._nonfinite_steps.add(step)
        if len(self._nonfinite_steps) > 10_000:
            self._nonfinite_steps.clear()
        self._emit(DetectorEvent("nonfinite", step, "critical", value, f"{what} is {value}"))

    def _emit(self, event: DetectorEvent) -> None:
        self.events.append(event)
        self.state.event_counts[(event.detector, event.severity)] += 1
        self.state.last_event_step[event.detector] = event.step
        log.warning("watchtower %s at step %d (%s): %s", event.detector, event.step, event.severity, event.detail)

    def describe(self, f: Families) -> None:
        """Everything this rank exports, built at scrape time by the exporter."""
        s = self.state
        f.add("watchtower_run_info", 1, self.info["model"], self.info["config_hash"], self.info["version"])
        f.add("watchtower_train_step", s.step)
        f.add("watchtower_steps_total", s.steps_total)
        f.add("watchtower_skipped_steps_total", s.skipped_steps_total)
        f.add("watchtower_uncommitted_steps_total", s.uncommitted_steps_total)
        f.add("watchtower_step_time_seconds", s.step_time_s)
        f.add("watchtower_step_seconds_total", s.step_time_total_s)
        f.add("watchtower_tokens_total", s.tokens_total)
        f.add("watchtower_tokens_per_second", s.tokens_per_s)
        if self._budget is not None:
            now, planned = self._budget.tokens_per_parameter(s.step, s.tokens_total, s.steps_total)
            f.add("watchtower_tokens_per_parameter", now)
            f.add("watchtower_planned_tokens_per_parameter", planned)
        f.add("watchtower_mfu_ratio", s.mfu)
        f.add("watchtower_data_wait_seconds_total", s.data_wait_total_s)
        f.add("watchtower_data_wait_ratio", s.data_wait_ratio)
        f.add("watchtower_loss", s.loss)
        f.add("watchtower_grad_norm", s.grad_norm)
        f.add("watchtower_learning_rate", s.lr)
        f.add("watchtower_heartbeat_timestamp_seconds", s.heartbeat)
        for detector in ("loss_spike", "nonfinite", "data_stall", "data_wait_rising", "throughput_drop",
                         "tp_replicated_divergence", "tp_identical_shards", "dp_drift"):
            for severity in ("warning", "critical"):
                f.add("watchtower_detector_events_total", s.event_counts[(detector, severity)], detector, severity)
        for detector, step in s.last_event_step.items():
            f.add("watchtower_detector_last_event_step", step, detector)
        for check, ok in s.parallel_ok.items():
            f.add("watchtower_parallel_check_ok", ok, check)
            f.add("watchtower_parallel_checks_total", s.parallel_checks[check], check)
        for name, v in (s.extra_gauges | s.extra_counters).items():
            f.add(name, v)
        for name, v in s.allocator.items():
            f.add(name, v, str(self._gpu_index))
        for hook, n in sorted(self.errors.counts.items()):
            f.add("watchtower_hook_errors_total", n, hook)
        if self._sampler is not None:
            self._describe_system(f, self._sampler)

    @staticmethod
    def _describe_system(f: Families, sampler: SystemSampler) -> None:
        h = sampler.host
        f.add("watchtower_host_cpu_utilization_ratio", h.cpu_ratio)
        f.add("watchtower_host_memory_used_ratio", h.memory_used_ratio)
        f.add("watchtower_process_resident_memory_bytes", h.rss_bytes)
        f.add("watchtower_host_disk_read_bytes_total", h.disk_read_bytes)
        f.add("watchtower_host_disk_written_bytes_total", h.disk_written_bytes)
        f.add("watchtower_host_network_received_bytes_total", h.net_received_bytes)
        f.add("watchtower_host_network_sent_bytes_total", h.net_sent_bytes)
        g = sampler.gpu_sample
        if g is None:
            return
        gpu = str(g.index)
        f.add("watchtower_gpu_utilization_ratio", g.utilization_ratio, gpu)
        f.add("watchtower_gpu_memory_used_bytes", g.memory_used_bytes, gpu)
        f.add("watchtower_gpu_memory_total_bytes", g.memory_total_bytes, gpu)
        f.add("watchtower_gpu_temperature_celsius", g.temperature_celsius, gpu)
        f.add("watchtower_gpu_power_watts", g.power_watts, gpu)
        f.add("watchtower_gpu_sm_clock_hertz", g.sm_clock_hertz, gpu)
        for reason, on in g.throttled.items():
            f.add("watchtower_gpu_throttled", on, gpu, reason)
        for kind, n in g.ecc_errors.items():
            f.add("watchtower_gpu_ecc_errors_total", n, gpu, kind)
        for xid, n in g.xid_errors.items():
            f.add("watchtower_gpu_xid_errors_total", n, gpu, xid)
