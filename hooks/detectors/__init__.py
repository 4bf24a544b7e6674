"""Pure detectors: a series in, events out. No torch, no I/O, no clocks."""

from watchtower.hooks.detectors.data_stall import DataStallConfig, DataStallDetector
from watchtower.hooks.detectors.events import DetectorEvent
from watchtower.hooks.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector
from watchtower.hooks.detectors.parallel import compare_replicated, compare_shards
from watchtower.hooks.detectors.throughput import ThroughputConfig, ThroughputDropDetector

__all__ = [
    "DataStallConfig", "DataStallDetector", "DetectorEvent", "LossSpikeConfig", "LossSpikeDetector",
    "ThroughputConfig", "ThroughputDropDetector", "compare_replicated", "compare_shards",
]
