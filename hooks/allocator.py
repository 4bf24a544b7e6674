"""The CUDA caching allocator's memory counters: peaks, retries and OOMs, read at each log interval.

Why: memory-efficient training lives by these. A peak near the card's size is the margin left; an
allocator *retry* means no cached block fit, so it freed its whole cache and called cudaMalloc again
(fragmentation: slow, and the usual prelude to a throughput drop or an OOM); an OOM that the loop
survived (it caught the error) still counts.

Cost: `torch.cuda.memory_stats()` reads counters the allocator keeps on the host: no device sync, no
kernel. It builds a dict of a few hundred entries (tens of microseconds), so the monitor reads it
once per log interval, never per step. Peaks are since the process started or the loop's own last
`torch.cuda.reset_peak_memory_stats()`: the monitor never resets them (the loop's own
`max_memory_allocated()` stays the loop's). On a rank without CUDA there is nothing to read and the
metrics are absent, not zero: a zero would claim a GPU that never retried.

Example (the pure half: a stats dict in, catalog names out):
    >>> stats = {"allocated_bytes.all.peak": 2**30, "reserved_bytes.all.peak": 3 * 2**30,
    ...          "num_alloc_retries": 4, "num_ooms": 0, "active.all.current": 7}
    >>> for name, value in allocator_metrics(stats).items():
    ...     print(name, value)
    watchtower_gpu_memory_peak_allocated_bytes 1073741824.0
    watchtower_gpu_memory_peak_reserved_bytes 3221225472.0
    watchtower_gpu_allocator_retries_total 4.0
    watchtower_gpu_allocator_ooms_total 0.0
"""

from __future__ import annotations

from typing import Mapping

import torch

# torch.cuda.memory_stats() key -> the catalog's name for it
ALLOCATOR_STATS = {
    "allocated_bytes.all.peak": "watchtower_gpu_memory_peak_allocated_bytes",
    "reserved_bytes.all.peak": "watchtower_gpu_memory_peak_reserved_bytes",
    "num_alloc_retries": "watchtower_gpu_allocator_retries_total",
    "num_ooms": "watchtower_gpu_allocator_ooms_total",
}


def allocator_metrics(stats: Mapping[str, float]) -> dict[str, float]:
    """Catalog name -> value for each counter `stats` holds; one it lacks stays absent (an empty
    dict, what torch returns before the allocator's first allocation, gives nothing)."""
    return {name: float(stats[key]) for key, name in ALLOCATOR_STATS.items() if key in stats}


def read_allocator(device: torch.device) -> dict[str, float]:
    """This rank's allocator counters on `device`; {} off CUDA or before CUDA was ever used."""
    if device.type != "cuda" or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return allocator_metrics(torch.cuda.memory_stats(device))
