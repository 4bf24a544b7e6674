"""Tensor parallelism inside one replica group, with DTensor's `parallelize_module`.

Megatron's layout: in every block the q/k/v and w1/w3 projections are split by output column (each
rank computes some heads / some hidden units), wo and w2 by input row (each rank's partial sum is
all-reduced into the replicated residual stream). Embedding, norms and the tied output stay
replicated: their gradients come out identical on every TP rank because DTensor all-reduces the
input-gradient of each column-parallel layer in the backward pass.

The full model is initialised from one seed on every rank and then sharded, so a TP=N run starts
from exactly the weights of a TP=1 run (`distribute_tensor` takes each rank's slice of the full
tensor). `seed_bug_reinit` reproduces the classic mistake of initialising each shard locally with
the same seed on every rank, for the fire drill `--inject tp_seed_bug`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# DTensor's module, imported only where TP is on: its import costs ~1.2 s of CPU (it pulls in sympy),
# a quarter of a TP=1 trainer's start, and a start is on every refill's and restart's path
DTENSOR_MODULE = "torch.distributed.tensor"

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard every block's projections over `mesh` (1-D, the TP ranks of this replica group)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {name: ColwiseParallel() for name in COLUMN_PARALLEL}
    plan.update({name: RowwiseParallel() for name in ROW_PARALLEL})
    for block in model.layers:
        parallelize_module(block, mesh, plan)


def seed_bug_reinit(model: nn.Module, seed: int, std: float) -> None:
    """Re-initialise every sharded weight's local slice from the same seed on every TP rank.

    This is the bug, on purpose: the shards become identical across ranks, the model silently
    has 1/tp of its capacity, and only a cross-rank fingerprint check notices.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if is_dtensor(p):
                local = p.to_local()
                local.copy_(torch.randn(local.shape, generator=generator) * std)


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor, without importing DTensor's module: no DTensor exists before it is."""
    dtensor = getattr(sys.modules.get(DTENSOR_MODULE), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or state tensor (itself when it is not sharded)."""
    return t.to_local() if is_dtensor(t) else t


def grad_norm(params: list[nn.Parameter], tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global L2 norm of the gradients, kept on the device (no host sync).

    Sharded grads contribute their local sum of squares, summed over the TP group; replicated grads
    are equal on every rank and are counted once.
    """
    sharded, replicated = [], []
    for p in params:
        if p.grad is None:
            continue
        (sharded if is_dtensor(p.grad) else replicated).append(local_tensor(p.grad))
    device = params[0].device if params else torch.device("cpu")
    zero = torch.zeros((), device=local_tensor(params[0]).device if params else device)
    sharded_sq = sum((g.float().pow(2).sum() for g in sharded), zero.clone())
    if sharded and tp_group is not None:
        dist.all_reduce(sharded_sq, group=tp_group)
    replicated_sq = sum((g.float().pow(2).sum() for g in replicated), zero.clone())
    return (sharded_sq + replicated_sq).sqrt()


def clip_grads_(params: list[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their norm is at most `max_norm`, without reading the norm on the host."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            local_tensor(p.grad).mul_(coef.to(local_tensor(p.grad).dtype))
