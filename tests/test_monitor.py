"""The monitor's promises, through its public API: never raises, never blocks the port, one import."""

from __future__ import annotations

import logging
import math
import random
import socket
import subprocess
import sys

import pytest
import torch

from conftest import free_port_pair, samples, scrape_text, value
from watchtower.hooks import Monitor, MonitorConfig, RankIdentity


def make(**kw) -> Monitor:
    kw.setdefault("port", 0)
    kw.setdefault("log_interval", 3)
    return Monitor(MonitorConfig(**kw), RankIdentity(run="t", node="n0"))


GARBAGE = [None, "abc", b"\x00", object(), [1, 2], {"a": 1}, float("nan"), float("inf"), -float("inf"),
           1e308, -1e308, 0, -1, True, torch.ones(3), torch.tensor(float("nan")), torch.tensor([]),
           torch.tensor(1, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.bool), 10 ** 400]


def test_fuzzed_inputs_never_raise():
    rng = random.Random(0)
    monitor = make()
    pick = lambda: rng.choice(GARBAGE)  # noqa: E731
    for _ in range(500):
        with monitor.step(tokens=pick(), step=rng.choice([None, 1, -5, "x", 2 ** 70])) as s:
            s.record(loss=pick(), grad_norm=pick(), lr=pick())
            assert s.should_step() in (True, False)
    monitor.check_parallel(pick())
    monitor.watch(pick(), tp_group=pick())
    assert monitor.wrap(5) == 5  # not iterable: handed back untouched
    monitor.close()
    assert sum(monitor.errors.counts.values()) > 0, "bad input must be counted"


def test_hook_errors_are_counted_and_logged_once(caplog):
    monitor = make()
    with caplog.at_level(logging.WARNING, logger="watchtower.hooks"):
        for step in range(1, 6):
            with monitor.step(step=step) as s:
                s.record(loss="not a number")
    assert monitor.errors.counts["record"] == 5
    assert sum("'record' failed" in r.getMessage() for r in caplog.records) == 1


def test_trainer_exceptions_pass_through_untouched():
    monitor = make()
    with pytest.raises(ZeroDivisionError):
        with monitor.step():
            1 / 0
    loader = monitor.wrap(iter([]))
    with pytest.raises(StopIteration):
        next(loader)
    assert monitor.state.steps_total == 0


def test_nonfinite_detected_without_reading_per_step_and_skip_is_opt_in():
    monitor = make(log_interval=4)
    for step in range(1, 5):
        with monitor.step(step=step) as s:
            s.record(loss=torch.tensor(float("nan") if step == 2 else 1.0))
            assert s.should_step()  # "count" never reads the device and never skips
        if step < 4:
            assert not monitor.events, "values are read only at the log interval"
    assert [(e.detector, e.step) for e in monitor.events] == [("nonfinite", 2)]
    skipper = make(nonfinite_action="skip_step")
    with skipper.step(step=1) as s:
        s.record(loss=torch.tensor(float("inf")), grad_norm=torch.tensor(1.0))
        assert not s.should_step()


def test_taken_port_warns_and_uses_the_next(caplog):
    # a pair: base + 1 must be free too, or the monitor rightly moves on to base + 2 (a client's
    # TIME_WAIT from the other test lane's scrapes holds even ports for 60 s)
    port = free_port_pair()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        with caplog.at_level(logging.WARNING, logger="watchtower.hooks"):
            monitor = Monitor(MonitorConfig(port=port, bind="127.0.0.1"), RankIdentity(run="p"))
        assert monitor.port == port + 1
        assert f"port {port} is taken" in caplog.text
        with monitor.step(tokens=10) as s:
            s.record(loss=2.0)
        scraped = samples(scrape_text(monitor.port))
        assert value(scraped, "watchtower_steps_total", run="p") == 1
        monitor.close()
    finally:
        blocker.close()


def test_disabled_monitor_is_a_no_op():
    monitor = make(enabled=False)
    data = [1, 2]
    assert monitor.wrap(data) is data
    with monitor.step(tokens=3) as s:
        s.record(loss=1.0)
    assert monitor.state.steps_total == 0


def test_detector_sees_every_step_despite_batched_copies():
    monitor = make(log_interval=7)
    for step in range(1, 61):
        with monitor.step(step=step) as s:
            s.record(loss=torch.tensor(8.0 if step == 45 else 3.0 - step * 0.001))
    monitor.close()
    assert [(e.detector, e.step) for e in monitor.events] == [("loss_spike", 45)]
    assert math.isclose(monitor.state.loss, 3.0 - 0.06, rel_tol=1e-6)


def test_hooks_import_contract():
    """watchtower.hooks pulls in neither textual, torchft, the supervisor nor the TUI. Its names load on
    first use (hooks/__init__.py), so the star import loads every one of them."""
    code = ("import sys\nfrom watchtower.hooks import *\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'torchft', 'grafana_client')"
            " or m.startswith(('watchtower.supervisor', 'watchtower.tui', 'watchtower.cli')))\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_hooks_lazy_names_are_its_public_names_and_its_submodules_still_resolve():
    """Review of bf3db0c: `__all__` must be a literal for type checkers, and `watchtower.hooks.monitor`
    after a plain `import watchtower.hooks` raised AttributeError once the package stopped importing
    its modules eagerly."""
    import watchtower.hooks as hooks

    assert hooks.__all__ == sorted(hooks._HOMES)
    code = "import watchtower.hooks as h\nprint(h.monitor.__name__, h.detectors.__name__, h.Monitor.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["watchtower.hooks.monitor", "watchtower.hooks.detectors", "Monitor"]
    with pytest.raises(AttributeError):
        hooks.no_such_name


class _EpochLoader(torch.utils.data.DataLoader):
    """A user's loader with its own `set_epoch` (as many training loops write it)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def test_wrapped_dataloader_yields_every_epoch_and_passes_len_sampler_set_epoch_through():
    """wrap() used to call iter() once: a wrapped DataLoader gave [4, 0, 0] over three epochs."""
    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    source = _EpochLoader(dataset, batch_size=2, sampler=sampler)
    monitor = make()
    loader = monitor.wrap(source)
    assert len(loader) == 4
    assert loader.sampler is sampler and loader.dataset is dataset and loader.batch_size == 2
    counts, waits, orders = [], [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert sampler.epoch == epoch
        seen = []
        for (batch,) in loader:
            with monitor.step(tokens=batch.numel()):
                seen.append(batch)
        counts.append(len(seen))
        orders.append(torch.cat(seen).tolist())
        waits.append(monitor.state.data_wait_total_s)
    monitor.close()
    assert counts == [4, 4, 4]
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert orders[0] != orders[1], "set_epoch reached the sampler: a new shuffle each epoch"
    assert 0 < waits[0] < waits[1] < waits[2], "every epoch's batch waits are timed"
    assert monitor.state.steps_total == 12


def test_wrapped_iterator_stays_a_timed_iterator():
    """A generator or iterator wrapped is still one: next() works and it is exhausted once."""
    monitor = make()
    loader = monitor.wrap(x for x in range(3))
    assert next(loader) == 0
    assert list(loader) == [1, 2] and list(loader) == []
    assert monitor.state.data_wait_total_s == 0 and monitor._pending_wait > 0
    assert monitor.errors.counts["wrap"] == 0
    monitor.close()


class _FakeClock:
    """Stands in for the monitor's `time` module: waits and compute advance it by exact amounts."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return 1e9 + self.now


class _ClockedLoader:
    """Each batch arrives after 1 s on the fake clock; re-iterable and sized, like a DataLoader."""

    def __init__(self, clock: _FakeClock, n: int = 4):
        self.clock, self.n = clock, n

    def __iter__(self):
        for i in range(self.n):
            self.clock.now += 1.0
            yield i

    def __len__(self) -> int:
        return self.n


def test_wrapping_a_wrapped_loader_times_each_data_wait_once(monkeypatch):
    """wrap(wrap(x)) timed every batch in both layers: 8 s of data wait for 4 s, and a ratio of 1.0."""
    import watchtower.hooks.monitor as monitor_module

    clock = _FakeClock()
    monkeypatch.setattr(monitor_module, "time", clock)
    other = make()  # another monitor's wrapper inside: each monitor times the wait once, in its own state

    def measured(wrapping) -> tuple[float, float]:
        monitor = make(log_interval=4)
        for _ in wrapping(monitor, _ClockedLoader(clock)):
            with monitor.step(tokens=1):
                clock.now += 1.0  # compute
        monitor.close()
        return monitor.state.data_wait_total_s, monitor.state.data_wait_ratio

    once = measured(lambda m, src: m.wrap(src))
    assert once[0] == 4.0
    assert measured(lambda m, src: m.wrap(m.wrap(src))) == once
    assert measured(lambda m, src: m.wrap(iter(m.wrap(src)))) == once  # an epoch's iterator wrapped again
    assert measured(lambda m, src: m.wrap(other.wrap(m.wrap(src)))) == once
    assert measured(lambda m, src: m.wrap(other.wrap(src))) == once
    assert other._pending_wait == 8.0, "the other monitor timed its two loops once each (it had no step)"
    other.close()


def test_wrapped_loader_can_be_copied_and_indexed():
    """copy.copy(wrap(x)) raised AttributeError: _source, deepcopy tried to copy the monitor's locks, and
    wrap(list)[1] raised TypeError. Copies are working wrappers on the same monitor; indexing passes
    through (untimed) when the loader has it, and fails as the loader's own does when it has not."""
    import copy

    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    source = torch.utils.data.DataLoader(dataset, batch_size=4)
    monitor = make()
    loader = monitor.wrap(source)
    shallow, deep = copy.copy(loader), copy.deepcopy(loader)
    assert shallow is not loader and shallow.dataset is dataset and len(shallow) == 2
    assert deep.dataset is not dataset and torch.equal(deep.dataset.tensors[0], dataset.tensors[0])
    for copied in (shallow, deep):
        before = monitor._pending_wait
        assert [b.tolist() for (b,) in copied] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
        assert monitor._pending_wait > before, "a copy still times its waits on the same monitor"
    assert not hasattr(loader, "__getitem__"), "a DataLoader has no indexing, so neither has its wrapper"
    with pytest.raises(TypeError):
        loader[0]

    batches = [torch.zeros(2), torch.ones(2)]
    wrapped = monitor.wrap(batches)
    assert torch.equal(wrapped[1], batches[1]) and wrapped[-1] is batches[-1] and wrapped[:1] == batches[:1]
    assert [b.sum().item() for b in copy.copy(wrapped)] == [0.0, 2.0]
    stream = monitor.wrap(iter(batches))
    assert next(copy.copy(stream)) is batches[0] and next(stream) is batches[0], "a copied iterator is its own"
    assert monitor.errors.counts["wrap"] == 0
    monitor.close()


def test_token_counts_given_as_tensors_are_read_at_the_interval_not_per_step():
    """A framework integration counts tokens from the attention mask on the device; `step(tokens=...)`
    used to call float() on it, a host sync per step. Now the count stays a tensor until the
    interval's copy, like the loss, and adds up to the same totals as numbers would."""
    monitor = make(log_interval=4)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding: 13 real tokens of 16
    for step in range(1, 9):
        late = step % 2 == 0  # half the steps hand their count over inside the step, as the callbacks do
        with monitor.step(step=step, tokens=None if late else mask.sum()) as s:
            s.record(loss=torch.tensor(2.0), tokens=mask.sum() if late else None)
        if step in (3, 7):
            assert monitor.state.tokens_total == 13 * (step - 3), "read only at the log interval"
    monitor.close()
    assert monitor.state.tokens_total == 8 * 13 and monitor.state.steps_total == 8
    assert monitor.state.tokens_per_s > 0 and sum(monitor.errors.counts.values()) == 0


def test_tokens_per_parameter_counts_the_steps_before_a_resume_and_plans_to_the_last_step():
    """D/N from the step number (a resumed process's counters start at 0, its step does not), the
    job's tokens per step (data_parallel ranks see different data) and the configured total steps."""
    from watchtower.compute_budget import ComputeBudget

    monitor = make(log_interval=2)
    assert samples_of(monitor).get("watchtower_tokens_per_parameter") is None, "no budget: not exported"
    monitor.set_compute_budget(parameters=1000, total_steps=500, data_parallel=2)
    for step in (101, 102):  # resumed at step 100
        with monitor.step(step=step, tokens=50):
            pass
    monitor.close()
    scraped = samples_of(monitor)
    assert scraped["watchtower_tokens_per_parameter"] == 102 * 50 * 2 / 1000
    assert scraped["watchtower_planned_tokens_per_parameter"] == 500 * 50 * 2 / 1000
    assert ComputeBudget(1000).tokens_per_parameter(step=3, tokens_total=0, steps_total=3) == (None, None)
    monitor.set_compute_budget(parameters=0)  # a bad budget is a counted hook error, never an exception
    assert monitor.errors.counts["set_compute_budget"] == 1


def samples_of(monitor: Monitor) -> dict[str, float]:
    """name -> value of each unlabelled-beyond-the-rank series the monitor exports now."""
    return {s.name: s.value for fam in monitor.registry.collect() for s in fam.samples if len(s.labels) == 4}


# ---- GPU memory: the allocator's counters (issue 16) ------------------------------------------------------

@pytest.mark.parametrize("stats, expected", [
    ({"allocated_bytes.all.peak": 5e9, "reserved_bytes.all.peak": 6e9, "num_alloc_retries": 3, "num_ooms": 1,
      "allocated_bytes.all.current": 1e9},
     {"watchtower_gpu_memory_peak_allocated_bytes": 5e9, "watchtower_gpu_memory_peak_reserved_bytes": 6e9,
      "watchtower_gpu_allocator_retries_total": 3.0, "watchtower_gpu_allocator_ooms_total": 1.0}),
    ({}, {}),  # what torch.cuda.memory_stats() returns before the allocator's first allocation: absent, not 0
    ({"num_alloc_retries": 0}, {"watchtower_gpu_allocator_retries_total": 0.0}),
])
def test_allocator_metrics_map_memory_stats_to_declared_per_gpu_metrics(stats, expected):
    from watchtower.hooks.allocator import allocator_metrics
    from watchtower.metric_catalog import ALL_METRICS, GPU_LABELS

    got = allocator_metrics(stats)
    assert got == expected
    assert all(ALL_METRICS[name].labels == GPU_LABELS for name in got)



def test_read_allocator_reads_nothing_off_cuda():
    from watchtower.hooks.allocator import read_allocator

    assert read_allocator(torch.device("cpu")) == {}


def test_a_scrape_that_reads_a_step_reads_that_steps_detector_verdicts():
    """Review of ebe73e3 (F1): the step number was published before the interval's flush judged the
    interval's losses, so a scrape between the two (the exporter's thread, at any moment) read the last
    step with none of its detector events: a test that waits for the last step could pass while a
    detector fired on every step. The flush now runs first."""
    monitor = make(log_interval=2)
    seen_during_flush = []
    judge = monitor._spike.update
    monitor._spike.update = lambda step, loss: (seen_during_flush.append((step, monitor.state.step)), judge(step, loss))[1]
    for step in range(1, 5):
        with monitor.step(step=step, tokens=8) as s:
            s.record(loss=2.0)
    monitor.close()
    assert [step for step, _ in seen_during_flush] == [1, 2, 3, 4]
    assert all(published < judged for judged, published in seen_during_flush if judged in (2, 4)), seen_during_flush
    assert monitor.state.step == 4
