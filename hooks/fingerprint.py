"""Parameter fingerprints and the TP / DP checks built on them.

A fingerprint is three float64 numbers per parameter, computed on the device: the sum, the sum of
squares, and a position-weighted sum (so a permuted or transposed shard does not pass for equal).
Float64 keeps the sums from rounding two different tensors to the same value. Checking costs one
small all-gather and one host read per check interval, never per step.

Which parameters are sharded is read from DTensor placements (`Shard(dim)`); everything else is
treated as replicated across the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from watchtower.hooks.detectors.parallel import compare_replicated, compare_shards

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
GroupLike = Union[dist.ProcessGroup, Gather, None]


def is_sharded(p: torch.Tensor) -> bool:
    placements = getattr(p, "placements", None)
    return placements is not None and any(pl.is_shard() for pl in placements)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 3) float64 on the tensors' device."""
    rows = []
    for t in tensors:
        flat = _local(t).detach().reshape(-1).double()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        rows.append(torch.stack((flat.sum(), flat.pow(2).sum(), (flat * weights).sum())))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.float64)
    return torch.stack(rows)


def gather_from(group: GroupLike) -> Gather | None:
    """An all-gather over a process group, or the user's own gather function as it is."""
    if group is None:
        return None
    if callable(group) and not isinstance(group, dist.ProcessGroup):
        return group

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t.contiguous(), group=group)
        return out

    return gather


@dataclass
class ParallelCheckResult:
    tp_replicated_mismatch: list[str] = field(default_factory=list)
    tp_identical_shards: list[str] = field(default_factory=list)
    dp_drift: list[str] = field(default_factory=list)
    checked: set[str] = field(default_factory=set)  # which checks ran: tp_replicated, tp_shards_distinct, dp_replicas


def check_parallel(model: nn.Module, tp_group: GroupLike = None, dp_group: GroupLike = None,
                   rel_tol: float = 1e-6) -> ParallelCheckResult:
    """Run the TP and DP fingerprint checks. Every rank of each group must call it at the same step."""
    result = ParallelCheckResult()
    named = [(n, p) for n, p in model.named_parameters()]
    sharded = [(n, p) for n, p in named if is_sharded(p)]
    replicated = [(n, p) for n, p in named if not is_sharded(p)]
    tp_gather = gather_from(tp_group)
    if tp_gather is not None:
        rep = [g.tolist() for g in tp_gather(fingerprint([p for _, p in replicated]))]
        result.tp_replicated_mismatch = compare_replicated(rep, [n for n, _ in replicated], rel_tol)
        result.checked.add("tp_replicated")
        if sharded:
            shd = [g.tolist() for g in tp_gather(fingerprint([p for _, p in sharded]))]
            result.tp_identical_shards = compare_shards(shd, [n for n, _ in sharded])
            result.checked.add("tp_shards_distinct")
    dp_gather = gather_from(dp_group)
    if dp_gather is not None:
        allp = [g.tolist() for g in dp_gather(fingerprint([p for _, p in named]))]
        result.dp_drift = compare_replicated(allp, [n for n, _ in named], rel_tol)
        result.checked.add("dp_replicas")
    return result
