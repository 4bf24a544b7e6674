"""Who this rank is: the labels on every series it exports."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RankIdentity:
    run: str = "default"
    replica_group: int = 0
    rank: int = 0  # rank inside the replica group (the TP rank)
    local_rank: int = 0  # picks the /metrics port: base + local_rank
    node: str = ""

    @classmethod
    def from_env(cls, run: str | None = None) -> "RankIdentity":
        """From the launcher's environment: WATCHTOWER_RUN, WATCHTOWER_REPLICA_GROUP, RANK,
        LOCAL_RANK, WATCHTOWER_NODE (torchrun's RANK/LOCAL_RANK work as they are)."""
        env = os.environ
        return cls(
            run=run or env.get("WATCHTOWER_RUN", "default"),
            replica_group=int(env.get("WATCHTOWER_REPLICA_GROUP", "0")),
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            node=env.get("WATCHTOWER_NODE") or socket.gethostname(),
        )

    def label_values(self) -> tuple[str, str, str, str]:
        return (self.run, str(self.replica_group), str(self.rank), self.node or socket.gethostname())
