"""Cross-rank fingerprint comparisons for TP and DP checks (pure: lists of numbers in, verdicts out).

A fingerprint is a few float64 numbers per parameter, computed on each rank (see
`watchtower.hooks.fingerprint`) and all-gathered. Two rules:
- replicated parameters (norms, embeddings, anything every TP rank holds whole) must be equal on
  every rank of the TP group, and every parameter must be equal across DP replica groups;
- sharded parameters must NOT be equal across TP ranks: equal shards mean every rank initialised
  its slice from the same seed (the Playbook's seed bug).
"""

from __future__ import annotations

import math
from typing import Sequence


def _close(a: Sequence[float], b: Sequence[float], rel_tol: float) -> bool:
    return all(math.isclose(x, y, rel_tol=rel_tol, abs_tol=rel_tol) for x, y in zip(a, b))


def compare_replicated(per_rank: Sequence[Sequence[Sequence[float]]], names: Sequence[str],
                       rel_tol: float = 1e-6) -> list[str]:
    """Names of parameters whose fingerprint differs between rank 0 and any other rank.

    per_rank[r][i] is rank r's fingerprint of parameter names[i].
    """
    reference = per_rank[0]
    return [name for i, name in enumerate(names)
            if any(not _close(reference[i], other[i], rel_tol) for other in per_rank[1:])]


def compare_shards(per_rank: Sequence[Sequence[Sequence[float]]], names: Sequence[str],
                   rel_tol: float = 1e-9) -> list[str]:
    """Names of sharded parameters whose shards are identical on two or more TP ranks."""
    identical = []
    for i, name in enumerate(names):
        prints = [rank[i] for rank in per_rank]
        if any(_close(prints[a], prints[b], rel_tol) for a in range(len(prints)) for b in range(a + 1, len(prints))):
            identical.append(name)
    return identical
