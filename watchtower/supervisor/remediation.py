"""What the supervisor does about a loss spike: page (the default) or rewind. Pure: the policy asks.

    [remediation]
    loss_spike = "rewind"        # "page": the detector's alert pages, nothing else happens
    rewind_margin = 100          # restart from the last checkpoint at or before spike_step - rewind_margin (>= 1)
    skip_batches_before = 0      # and skip the data steps spike_step - before .. spike_step + after read (< margin)
    skip_batches_after = 200
    max_rewinds = 1              # per run (kept in <output_dir>/remediation.json); past it a spike pages

A rewind needs every group that contributes gradients to report a critical loss spike (the
detector's own verdict) at the same step: one rank's opinion is not enough, and a spike seen by one
group only is that group's problem (its data shard), not the run's. The rewind restarts every group
(a planned loss: no node blamed, no failure budget spent) from the chosen checkpoint, and the groups
skip the data window exactly (`data.skip_steps`, see watchtower/trainer/data.py). PaLM's recipe
restarts ~100 steps before a spike and skips 200-500 batches. Risks: the skipped data is not trained
on in that epoch; a skip that misses the cause spikes again (max_rewinds bounds that, then pages).

No committed checkpoint at or before `spike_step - rewind_margin` (a supervisor that saw the spike
late, or interval_steps = 0; a config whose checkpoints never reach back that far is refused when
read, `checkpoints_problem`): the rewind is declined, and the spike
pages with the reason. Setting every checkpoint aside would restart the run from step 0, throwing its
whole progress away, and a checkpoint inside the margin may already hold the damage the margin is
there to avoid; so neither is done on the person's behalf. `rewind_margin` must be >= 1 (the
checkpoint of the spike step holds the spiked update) and `skip_batches_before` < `rewind_margin` (a
skip can only leave unread data the checkpoint loaded has not trained on yet).
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
        if self.loss_spike == "rewind":
            require(self.rewind_margin >= 1, "rewind_margin", self.rewind_margin,
                    "must be >= 1 with loss_spike = \"rewind\": the checkpoint of the spike step holds the spiked update")
            require(self.skip_batches_before < self.rewind_margin, "skip_batches_before", self.skip_batches_before,
                    f"must be < rewind_margin ({self.rewind_margin}): the checkpoint loaded has already trained on "
                    "the data of the steps up to spike_step - rewind_margin, so they cannot be skipped")


@dataclass(frozen=True)
class Rewind:
    """Restart every group from the committed checkpoint of step `checkpoint_step`, the last at or
    before `to_step`, skipping the data steps `skip_first`..`skip_last` read (the shell records the
    skip, then retires the later checkpoints)."""

    spike_step: int
    to_step: int
    skip_first: int
    skip_last: int
    checkpoint_step: int


@dataclass(frozen=True)
class RewindDeclined:  # a record: the spike pages as usual
    spike_step: int
    why: str


def checkpoints_problem(cfg: RemediationConfig, interval_steps: int, keep_last: int, patience: int = 1) -> str | None:
    """Why the trainer's checkpoints can never hold one old enough for a rewind (None: they can), so a
    job that asks for rewinds is refused when it is read instead of only paging at its spikes. The
    kept checkpoints reach (keep_last - 1) x interval_steps behind the newest, and the newest may be
    one save past the reported spike (saves go on while the detector's streak ends and the supervisor
    scrapes it); the rewind needs one at or before spike - (patience - 1) - rewind_margin. So the
    reach must cover rewind_margin + patience - 1 + interval_steps (`patience`: the trainers'
    monitor.loss_spike.patience). A floor for one save of lag: a supervisor that sees a spike later
    than that can still decline it, with the reason.

    >>> checkpoints_problem(RemediationConfig("rewind", rewind_margin=10), 20, 3) is None
    True
    >>> checkpoints_problem(RemediationConfig("rewind"), 20, 3).split(" (")[0]
    'checkpoint.keep_last = 3 saves every 20 steps reach 40 steps back, less than the 120 a rewind needs'
    """
    if cfg.loss_spike != "rewind":
        return None
    if interval_steps == 0:
        return ("checkpoint.interval_steps = 0 saves only at the end: a rewind has nothing to go back to; set "
                'checkpoint.interval_steps (job.train_overrides) or use loss_spike = "page"')
    depth, needed = (keep_last - 1) * interval_steps, cfg.rewind_margin + patience - 1 + interval_steps
    if depth < needed:
        need = -(-needed // interval_steps) + 1
        return (f"checkpoint.keep_last = {keep_last} saves every {interval_steps} steps reach {depth} steps back, "
                f"less than the {needed} a rewind needs (rewind_margin {cfg.rewind_margin} + patience - 1 = "
                f"{patience - 1} + one interval of saves past the spike {interval_steps}): raise "
                f"checkpoint.keep_last to {need} or lower remediation.rewind_margin")
    return None


def agreed_spike(steps: Iterable[int | None], active_groups: int) -> int | None:
    """The step of a critical loss spike every contributing group reports, if they all report the
    same one and there are enough of them for a full quorum; else None.

    >>> agreed_spike([120, 120], 2), agreed_spike([120, None], 2), agreed_spike([120, 130], 2), agreed_spike([120], 2)
    (120, None, None, None)
    """
    steps = list(steps)
    return steps[0] if len(steps) >= active_groups and steps[0] is not None and len(set(steps)) == 1 else None


def may_rewind(rewinds: int, cfg: RemediationConfig) -> bool:
    """Whether a spike now could be rewound, so the committed checkpoints must be known to decide it."""
    return cfg.loss_spike == "rewind" and rewinds < cfg.max_rewinds


def remedy(spike: int, rewinds: int, cfg: RemediationConfig, checkpoints: Iterable[int],
           patience: int = 1) -> Rewind | RewindDeclined:
    """What to do about an agreed spike reported at `spike` after `rewinds` rewinds this run, given the
    steps of the committed checkpoints (`checkpoints`). Declined when none is at or before
    `spike - rewind_margin`: rewinding past every checkpoint would restart from step 0 (module docstring).
    `patience`: the trainers' monitor.loss_spike.patience. The detector reports the last step of a
    streak that long, so the spike began `patience - 1` steps earlier: margin and skip count from
    there (else those poisoned steps were trained on again after the rewind, and too few to spike).

    >>> remedy(120, 0, RemediationConfig("rewind", rewind_margin=10, skip_batches_after=4), [80, 100, 120])
    Rewind(spike_step=120, to_step=110, skip_first=120, skip_last=124, checkpoint_step=100)
    >>> remedy(120, 1, RemediationConfig("rewind"), [20]).why
    'max_rewinds = 1 already spent: it pages'
    >>> remedy(1000, 0, RemediationConfig("rewind"), [940, 960, 980]).why.split(";")[0]
    'no committed checkpoint at or before step 900 (oldest kept: 940)'
    >>> remedy(122, 0, RemediationConfig("rewind", rewind_margin=10, skip_batches_after=4), [100, 110], patience=3)
    Rewind(spike_step=122, to_step=110, skip_first=120, skip_last=124, checkpoint_step=110)
    """
    if cfg.loss_spike != "rewind":
        return RewindDeclined(spike, 'remediation.loss_spike = "page"')
    if rewinds >= cfg.max_rewinds:
        return RewindDeclined(spike, f"max_rewinds = {cfg.max_rewinds} already spent: it pages")
    onset = max(spike - (patience - 1), 1)
    to_step, kept = onset - cfg.rewind_margin, sorted(checkpoints)
    old_enough = [step for step in kept if step <= to_step]
    if not old_enough:
        oldest = f"oldest kept: {kept[0]}" if kept else "none committed yet"
        return RewindDeclined(spike, f"no committed checkpoint at or before step {to_step} ({oldest}); rewinding "
                              "would restart from step 0, so it pages; raise checkpoint.keep_last or lower "
                              "checkpoint.interval_steps / remediation.rewind_margin")
    return Rewind(spike, to_step, max(onset - cfg.skip_batches_before, 1), max(onset + cfg.skip_batches_after, spike),
                  old_enough[-1])
