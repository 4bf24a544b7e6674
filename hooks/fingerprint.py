"""Parameter fingerprints and the TP / DP checks built on them.

A fingerprint is three float64 numbers per parameter, computed on the device: the sum, the sum of
squares, and a position-weighted sum (element i of n weighs 1 + i/(n-1), so a permuted or
transposed shard does not pass for equal). Float64 keeps the sums from rounding two different
tensors to the same value.

What a check costs: one small all-gather per group (TP, DP) and one host read per check interval,
never per step. The float64 arithmetic runs over pieces of at most `CHUNK_ELEMENTS` elements, so a
check needs two float64 buffers of one piece each (16 MB) whatever the largest parameter (a
whole-tensor float64 copy of a 50M-element embedding would be 400 MB, on a device that may have none).

Every rank of a group enters each all-gather or none does: the structure (which parameters, which
are sharded) is the same on every rank, and a rank whose numbers fail (an error, out of memory)
still enters with a "failed" flag in its row, so every rank sees it and skips that check together.
A rank that left the gather out would leave its peers blocked in it forever.

Which parameters are sharded is read from DTensor placements (`Shard(dim)`); everything else is
treated as replicated across the TP group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from watchtower.hooks.detectors.parallel import compare_replicated, compare_shards

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
GroupLike = Union[dist.ProcessGroup, Gather, None]

CHUNK_ELEMENTS = 1 << 20  # float64 pieces of 8 MB: bounded memory, few enough kernel launches


def is_sharded(p: torch.Tensor) -> bool:
    placements = getattr(p, "placements", None)
    return placements is not None and any(pl.is_shard() for pl in placements)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _pieces(t: torch.Tensor, limit: int) -> Iterator[torch.Tensor]:
    """`t` in row-major order as views of at most `limit` elements each (nothing is copied).

    A contiguous tensor is sliced flat; a strided one (a transposed weight) along its first
    dimension, one level further down where a single slice is still too big.
    """
    if t.numel() == 0:
        return
    if t.is_contiguous():
        flat = t.view(-1)
        for start in range(0, flat.numel(), limit):
            yield flat[start:start + limit]
        return
    rows_per_piece = max(limit // t[0].numel(), 1)
    for start in range(0, t.shape[0], rows_per_piece):
        part = t[start:start + rows_per_piece]
        if part.numel() <= limit:
            yield part
        else:  # one row longer than a piece
            yield from _pieces(part[0], limit)


def _one(t: torch.Tensor, scratch: torch.Tensor, ramp: torch.Tensor) -> torch.Tensor:
    """(3,) float64: sum, sum of squares and position-weighted sum of `t`, one piece at a time.

    Each piece is converted into `scratch` (a float64 buffer reused for every piece, so the loop
    allocates nothing but scalars). With w_i = 1 + i*step, the weighted sum is
    sum(x) + step * sum(i * x_i), and each piece's share of sum(i * x_i) is its own
    sum(j * x_j) plus its offset times its sum: one ramp j = 0, 1, 2, ... serves every piece.
    """
    n = t.numel()
    parts, offset = [], 0
    for piece in _pieces(t, scratch.numel()):
        k = piece.numel()
        x = scratch[:k]
        x.view(piece.shape).copy_(piece)
        total = x.sum()
        parts.append(torch.stack((total, torch.dot(x, x), torch.dot(x, ramp[:k]) + offset * total)))
        offset += k
    if not parts:
        return torch.zeros(3, dtype=torch.float64, device=t.device)
    s, sq, positional = torch.stack(parts).sum(0).unbind()
    step = 1.0 / (n - 1) if n > 1 else 0.0
    return torch.stack((s, sq, s + positional * step))


@torch.no_grad()
def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 3) float64 on the tensors' device (see the module docstring for its cost)."""
    if not tensors:
        return torch.zeros((0, 3), dtype=torch.float64)
    locals_ = [_local(t).detach() for t in tensors]
    size = max(min(max(t.numel() for t in locals_), CHUNK_ELEMENTS), 1)
    buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device: scratch, ramp
    rows = []
    for t in locals_:
        if t.device not in buffers:
            buffers[t.device] = (torch.empty(size, dtype=torch.float64, device=t.device),
                                 torch.arange(size, dtype=torch.float64, device=t.device))
        rows.append(_one(t, *buffers[t.device]))
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
    skipped: set[str] = field(default_factory=set)  # due, but some rank had no numbers: every rank skips it
    errors: list[Exception] = field(default_factory=list)  # this rank's own failures (counted by the caller)


def _rows_or_failed(tensors: list[torch.Tensor], result: ParallelCheckResult) -> torch.Tensor:
    """This rank's (len(tensors) + 1, 3) contribution: the fingerprints, then a status row.

    The status row is (0, 0, 0), or (1, 0, 0) with NaN fingerprints when they could not be
    computed: the shape never depends on success, so the gather pairs up on every rank.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    try:
        prints = fingerprint(tensors).to(device)
        status = torch.zeros((1, 3), dtype=torch.float64, device=device)
    except Exception as err:  # noqa: BLE001 - counted by the caller; the gather must still happen
        result.errors.append(err)
        prints = torch.full((len(tensors), 3), math.nan, dtype=torch.float64, device=device)
        status = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, device=device)
    return torch.cat((prints, status))


def _gather_agreed(gather: Gather, tensors: list[torch.Tensor],
                   result: ParallelCheckResult) -> list[list[list[float]]] | None:
    """Every rank's fingerprints of `tensors`, or None when any rank failed (all ranks see that).

    One collective, entered whatever happened to this rank's numbers. A flag that is not 0 means a
    failure; a DP gather that averages (torchft) turns one participant's 1 into a fraction, still not 0.
    """
    mine = _rows_or_failed(tensors, result)
    try:
        per_rank = [g.tolist() for g in gather(mine)]  # the host read of this check
    except Exception as err:  # noqa: BLE001 - the collective itself failed here: nothing to compare
        result.errors.append(err)
        return None
    if any(rows[-1][0] != 0 for rows in per_rank):
        return None
    return [rows[:-1] for rows in per_rank]


def check_parallel(model: nn.Module, tp_group: GroupLike = None, dp_group: GroupLike = None,
                   rel_tol: float = 1e-6) -> ParallelCheckResult:
    """Run the TP and DP fingerprint checks. Every rank of each group must call it at the same step.

    One all-gather over the TP group (replicated and sharded parameters together) and one over the
    DP group. A failure on this rank is returned in `errors`, never raised, after both collectives:
    raising here would leave the peers waiting in a gather this rank never entered.
    """
    result = ParallelCheckResult()
    named = [(n, p) for n, p in model.named_parameters()]
    replicated = [(n, p) for n, p in named if not is_sharded(p)]
    sharded = [(n, p) for n, p in named if is_sharded(p)]
    tp_gather = gather_from(tp_group)
    if tp_gather is not None:
        due = {"tp_replicated"} | ({"tp_shards_distinct"} if sharded else set())
        per_rank = _gather_agreed(tp_gather, [p for _, p in replicated + sharded], result)
        if per_rank is None:
            result.skipped |= due
        else:
            k = len(replicated)
            result.tp_replicated_mismatch = compare_replicated([r[:k] for r in per_rank], [n for n, _ in replicated],
                                                               rel_tol)
            if sharded:
                result.tp_identical_shards = compare_shards([r[k:] for r in per_rank], [n for n, _ in sharded])
            result.checked |= due
    dp_gather = gather_from(dp_group)
    if dp_gather is not None:
        per_rank = _gather_agreed(dp_gather, [p for _, p in named], result)
        if per_rank is None:
            result.skipped.add("dp_replicas")
        else:
            result.dp_drift = compare_replicated(per_rank, [n for n, _ in named], rel_tol)
            result.checked.add("dp_replicas")
    return result
