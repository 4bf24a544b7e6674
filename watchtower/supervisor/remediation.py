"""What the supervisor does about a loss spike: page (the default) or rewind. Pure: the policy asks.

    [remediation]
    loss_spike = "rewind"        # "page": the detector's alert pages, nothing else happens
    rewind_margin = 100          # restart from the last checkpoint at or before spike_step - rewind_margin
    skip_batches_before = 0      # and skip the data steps spike_step - before .. spike_step + after read
    skip_batches_after = 200
    max_rewinds = 1              # per supervisor run; past it a spike pages as with "page"

A rewind needs every group that contributes gradients to report a critical loss spike (the
detector's own verdict) at the same step: one rank's opinion is not enough, and a spike seen by one
group only is that group's problem (its data shard), not the run's. The rewind restarts every group
(a planned loss: no node blamed, no failure budget spent) from the chosen checkpoint, and the groups
skip the data window exactly (`data.skip_steps`, see watchtower/trainer/data.py). PaLM's recipe
restarts ~100 steps before a spike and skips 200-500 batches. Risks: the skipped data is not trained
on in that epoch; a skip that misses the cause spikes again (max_rewinds bounds that, then pages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from watchtower.validation import require

ACTIONS = ("page", "rewind")


@dataclass(frozen=True)
class RemediationConfig:
    """loss_spike: "page" or "rewind"; the rest only matter with "rewind" (see the module docstring)."""

    loss_spike: str = "page"
    rewind_margin: int = 100
    skip_batches_before: int = 0
    skip_batches_after: int = 200
    max_rewinds: int = 1

    def __post_init__(self) -> None:
        require(self.loss_spike in ACTIONS, "loss_spike", self.loss_spike, f"must be one of {', '.join(ACTIONS)}")
        for name in ("rewind_margin", "skip_batches_before", "skip_batches_after", "max_rewinds"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass(frozen=True)
class Rewind:
    """Restart every group from the last checkpoint at or before `to_step`, skipping the data steps
    `skip_first`..`skip_last` read (the shell retires the later checkpoints and adds the skip)."""

    spike_step: int
    to_step: int
    skip_first: int
    skip_last: int


@dataclass(frozen=True)
class RewindDeclined:  # a record: the spike pages as usual
    spike_step: int
    why: str


def agreed_spike(steps: Iterable[int | None], active_groups: int) -> int | None:
    """The step of a critical loss spike every contributing group reports, if they all report the
    same one and there are enough of them for a full quorum; else None.

    >>> agreed_spike([120, 120], 2), agreed_spike([120, None], 2), agreed_spike([120, 130], 2), agreed_spike([120], 2)
    (120, None, None, None)
    """
    steps = list(steps)
    return steps[0] if len(steps) >= active_groups and steps[0] is not None and len(set(steps)) == 1 else None


def remedy(spike: int, rewinds: int, cfg: RemediationConfig) -> Rewind | RewindDeclined:
    """What to do about an agreed spike at `spike` after `rewinds` rewinds this run.

    >>> remedy(120, 0, RemediationConfig("rewind", rewind_margin=10, skip_batches_after=4))
    Rewind(spike_step=120, to_step=110, skip_first=120, skip_last=124)
    >>> remedy(120, 1, RemediationConfig("rewind")).why
    'max_rewinds = 1 already spent: it pages'
    """
    if cfg.loss_spike != "rewind":
        return RewindDeclined(spike, 'remediation.loss_spike = "page"')
    if rewinds >= cfg.max_rewinds:
        return RewindDeclined(spike, f"max_rewinds = {cfg.max_rewinds} already spent: it pages")
    return Rewind(spike, max(spike - cfg.rewind_margin, 0), max(spike - cfg.skip_batches_before, 1),
                  spike + cfg.skip_batches_after)
