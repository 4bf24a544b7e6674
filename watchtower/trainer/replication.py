"""Data parallelism across replica groups: torchft's fault-tolerant Manager, or nothing.

The trainer talks to one small interface per step:
    start_step()            quorum (and, for a group that just joined, live healing from a peer)
    data_shard()            which slice of the global batch this group reads, or None for a spare
    reduce_gradients(ps)    average gradients across the participating groups
    all_agree(ok)           True only if every participating group says True (the skip verdict)
    should_commit()         whether every group got through the step (else the step is redone)
    step                    the job's step: torchft's, so a healed group jumps to its peers' step

`SingleGroup` is the do-nothing stand-in (one replica group, no torchft imported). `TorchFTGroup`
wraps `torchft.Manager`:
  - one Manager per TP rank (group rank r of world size tp); group rank 0 runs the Manager server;
  - gradients are all-reduced tensor by tensor with `manager.allreduce`, not through
    `torchft.DistributedDataParallel`, whose comm hook crashes the *healthy* replica when a peer dies
    mid-all-reduce (see shared TORCHFT.md); a failed all-reduce makes `should_commit` return False;
  - `WorldSizeMode.FIXED_WITH_SPARES`: groups ranked at or above `active_groups` are hot spares,
    kept in sync with zero gradients; the data a group reads follows its participating rank, so a
    promoted spare reads the shard of the rank it now holds.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.nn as nn

log = logging.getLogger("watchtower.train")


class SingleGroup:
    """One replica group: every step commits, the group reads the whole global batch."""

    active = False

    def __init__(self) -> None:
        self.step = 0

    def start_step(self) -> None:
        pass

    def data_shard(self) -> tuple[int, int] | None:
        return 0, 1

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        pass

    def all_agree(self, ok: bool) -> bool:
        return ok

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def participants(self) -> int:
        return 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def dp_gather(self) -> None:
        return None

    def shutdown(self) -> None:
        pass


class TorchFTGroup:
    """This TP rank's seat in a fault-tolerant data-parallel job (see the module docstring)."""

    active = True

    def __init__(self, replica_id: str, group_rank: int, group_world_size: int, active_groups: int,
                 lighthouse: str, store_addr: str, store_port: int, device: torch.device,
                 state_dict: Callable[[], dict[str, Any]], load_state_dict: Callable[[dict[str, Any]], None],
                 timeout_s: float = 10.0):
        from torchft import Manager
        from torchft.manager import WorldSizeMode
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        logging.getLogger("torchft").setLevel(logging.WARNING)
        os.environ["TORCHFT_LIGHTHOUSE"] = lighthouse
        self.device = device
        timeout = timedelta(seconds=timeout_s)
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(
            pg=pg, min_replica_size=active_groups, load_state_dict=load_state_dict, state_dict=state_dict,
            replica_id=replica_id, rank=group_rank, world_size=group_world_size,
            world_size_mode=WorldSizeMode.FIXED_WITH_SPARES, store_addr=store_addr, store_port=store_port,
            use_async_quorum=False,  # heal before the forward pass; the quorum RPC is ~ms on a LAN
            timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout, hostname=socket.gethostname())
        self.active_groups = active_groups
        self._works: list[Any] = []

    @property
    def step(self) -> int:
        return self.manager.current_step()

    def start_step(self) -> None:
        self.manager.start_quorum()

    def data_shard(self) -> tuple[int, int] | None:
        rank = self.manager.participating_rank()
        return None if rank is None else (rank, self.manager.num_participants())

    def participants(self) -> int:
        return self.manager.num_participants()

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        works = []
        for p in params:
            if p.grad is None:  # a spare skipped its backward: it contributes zeros
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            works.append(self.manager.allreduce(grad))
        for work in works:
            work.wait()

    def all_agree(self, ok: bool) -> bool:
        """True only if every participating group passes True: one scalar all-reduce of vetoes.
        torchft zeroes a spare's contribution, so a spare follows the participants' verdict. If the
        all-reduce fails, this group's `should_commit` returns False and the step is redone."""
        vetoes = torch.tensor([0.0 if ok else 1.0], device=self.device)
        self.manager.allreduce(vetoes).wait()  # the average of the vetoes: > 0 when any group vetoed
        return vetoes.item() == 0

    def should_commit(self) -> bool:
        return self.manager.should_commit()

    def state_dict(self) -> dict[str, int]:
        return self.manager.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.manager.load_state_dict(state)

    def dp_gather(self) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """For the DP drift check: [mine, the average over participants]. Equal iff all agree."""

        def gather(fingerprint: torch.Tensor) -> list[torch.Tensor]:
            average = fingerprint.clone()
            self.manager.allreduce(average).wait()  # a spare's copy is zeroed: it is compared, not counted
            return [fingerprint, average]

        return gather

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
