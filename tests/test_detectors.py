"""Detectors are pure: synthetic series with known incidents in, events out."""

from __future__ import annotations

import math
import random

from watchtower.hooks.detectors import (DataStallConfig, DataStallDetector, LossSpikeConfig, LossSpikeDetector,
                                        ThroughputConfig, ThroughputDropDetector, compare_replicated, compare_shards)


def training_curve(n: int, seed: int = 0) -> list[float]:
    """A pretraining-like loss: fast early fall, slow tail, multiplicative noise."""
    rng = random.Random(seed)
    return [(2.2 + 3.5 * math.exp(-s / 60)) * (1 + rng.gauss(0, 0.02)) for s in range(n)]


def run(detector, series):
    return [e for step, v in enumerate(series) for e in detector.update(step, v)]


def test_no_false_spike_on_a_noisy_falling_curve():
    for seed in range(5):
        assert run(LossSpikeDetector(LossSpikeConfig()), training_curve(2000, seed)) == []


def test_spike_detected_at_its_step_with_severity():
    curve = training_curve(400)
    curve[300] *= 3.0
    curve[350] *= 1.5
    events = run(LossSpikeDetector(LossSpikeConfig()), curve)
    assert [(e.step, e.severity) for e in events] == [(300, "critical"), (350, "warning")]


def test_patience_ignores_one_step_blips():
    curve = training_curve(400)
    curve[300] *= 3.0
    for s in (350, 351, 352):
        curve[s] *= 3.0
    events = run(LossSpikeDetector(LossSpikeConfig(patience=3)), curve)
    assert [e.step for e in events] == [352]


def test_nan_is_left_to_the_nonfinite_detector():
    curve = training_curve(100)
    curve[50] = float("nan")
    assert run(LossSpikeDetector(LossSpikeConfig()), curve) == []


def test_stall_and_rising_wait():
    rng = random.Random(1)
    d = DataStallDetector(DataStallConfig(trend_window=50))
    waits = [0.01 + rng.random() * 0.005 for _ in range(200)]
    waits[100] = 4.0
    events = [e for s, w in enumerate(waits) for e in d.update(s, w, 0.2 + w)]
    assert [(e.detector, e.step) for e in events] == [("data_stall", 100)]
    d = DataStallDetector(DataStallConfig(trend_window=50))
    creeping = [0.01 + 0.004 * max(0, s - 100) for s in range(300)]
    events = [e for s, w in enumerate(creeping) for e in d.update(s, w, 0.2 + w)]
    assert [e.detector for e in events] == ["data_wait_rising"]
    assert 100 < events[0].step < 250  # after the creep starts, never before


def test_throughput_drop_sustained_not_blips():
    rng = random.Random(2)
    series = [1000 * (1 + rng.gauss(0, 0.03)) for _ in range(600)]
    for s in range(200, 203):
        series[s] = 100.0  # a checkpoint save: three slow steps
    for s in range(400, 600):
        series[s] *= 0.5
    events = run(ThroughputDropDetector(ThroughputConfig()), series)
    assert [e.detector for e in events] == ["throughput_drop"]
    assert 400 < events[0].step <= 420


def test_parallel_comparisons():
    names = ["norm", "wq"]
    same = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]] * 2
    assert compare_replicated(same, names) == []
    drifted = [same[0], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]]
    assert compare_replicated(drifted, names) == ["wq"]
    assert compare_shards(same, names) == ["norm", "wq"]
    assert compare_shards(drifted, names) == ["norm"]
