"""Fault injection: fire drills for the pager and the spares, and how the e2e tests prove each path.

Spec grammar, one fault per `--inject`:  KIND[@STEP][:VALUE][:group=G][:rank=R]
(G >= 0; 0 <= R < train.tp; a spec that could never fire, or a spike factor that is not a finite
number > 0, is refused when the config is built)

    loss_spike@120          multiply the loss of step 120 by `value` (default 25); it is also
                            back-propagated, so the grad norm spikes too (clipping bounds the damage)
    nonfinite@200           make the loss of step 200 NaN
    stall@50:3s             the batch for step 50 arrives 3 s late
    slow_data@100:0.2s      from step 100 the data wait grows by 0.2 s every 10 steps (a leaking index)
    bad_data@120:5          poison the data steps 120..124 read (their targets scrambled), where it
                            lies: a rerun over the same windows spikes again, one that skips them
                            (data.skip_steps) does not. LEN (default 1) counts steps; the windows are
                            those a run from the start reads with every active group participating
    crash@80:group=1        SIGKILL this rank at step 80 (only in replica group 1)
    hang@80                 stop making progress at step 80, forever (a deadlocked collective)
    tp_seed_bug             initialise every TP rank's weight shards from the same seed
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from watchtower.validation import ConfigError

KINDS = {"loss_spike", "nonfinite", "stall", "slow_data", "crash", "hang", "tp_seed_bug", "bad_data"}
NEEDS_STEP = KINDS - {"tp_seed_bug"}
NEEDS_SECONDS = {"stall", "slow_data"}
SPEC = re.compile(r"^(?P<kind>[a-z_]+)(?:@(?P<step>\d+))?(?P<rest>(?::[^:]+)*)$")
SECONDS = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int = 0
    value: float = 0.0  # seconds for stall/slow_data, a factor for loss_spike, steps for bad_data
    group: int | None = None  # None: every replica group
    rank: int | None = None  # None: every rank of the group

    def applies_to(self, group: int, rank: int) -> bool:
        return (self.group is None or self.group == group) and (self.rank is None or self.rank == rank)


def parse_fault(spec: str, field: str = "faults.inject") -> Fault:
    """Parse one spec; raises ConfigError naming `field` and the grammar."""
    grammar = ("expected KIND[@STEP][:VALUE][:group=G][:rank=R] with KIND one of "
               + ", ".join(sorted(KINDS)) + " (e.g. loss_spike@120, stall@50:3s, crash@80:group=1)")
    m = SPEC.match(spec.strip())
    if not m or m.group("kind") not in KINDS:
        raise ConfigError(field, spec, grammar)
    kind = m.group("kind")
    step = int(m.group("step")) if m.group("step") else 0
    if kind in NEEDS_STEP and step <= 0:
        raise ConfigError(field, spec, f"{kind} needs a step >= 1, e.g. {kind}@100")
    value = {"loss_spike": 25.0, "bad_data": 1.0}.get(kind, 0.0)
    group = rank = None
    for part in filter(None, m.group("rest").split(":")):
        key, _, val = part.partition("=")
        try:
            if key == "group" and val:
                group = int(val)
            elif key == "rank" and val:
                rank = int(val)
            elif not val and kind in NEEDS_SECONDS:
                sec = SECONDS.match(key)
                if not sec:
                    raise ValueError
                value = float(sec.group(1)) / (1000.0 if sec.group(2) == "ms" else 1.0)
            elif not val and kind == "loss_spike":
                value = float(key)
            elif not val and kind == "bad_data":
                value = float(int(key))
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(field, spec, f"cannot read {part!r}; " + grammar) from None
    if kind == "bad_data" and value < 1:
        raise ConfigError(field, spec, f"bad_data needs LEN >= 1 steps, e.g. bad_data@{step}:5")
    if kind in NEEDS_SECONDS and value <= 0:
        raise ConfigError(field, spec, f"{kind} needs a duration, e.g. {kind}@{step}:2s")
    # A fault aimed at no group or rank would silently never fire; a NaN "spike" is nonfinite's job.
    for name, target in (("group", group), ("rank", rank)):
        if target is not None and target < 0:
            raise ConfigError(field, spec, f"{name}={target} matches nothing: {name}s count from 0")
    if kind == "loss_spike" and not (math.isfinite(value) and value > 0):
        raise ConfigError(field, spec, f"the spike factor must be a finite number > 0 (e.g. loss_spike@{step}:25); "
                          f"for a NaN loss use nonfinite@{step}")
    return Fault(kind, step, value, group, rank)


class FaultPlan:
    """The faults that apply to one rank, asked about at the points of the step where they act."""

    def __init__(self, faults: list[Fault], group: int, rank: int):
        self.faults = [f for f in faults if f.applies_to(group, rank)]

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.faults)

    def loss_factor(self, step: int) -> float | None:
        """Factor for this step's loss: a spike multiplier, NaN, or None (leave it alone)."""
        for f in self.faults:
            if f.step == step and f.kind == "loss_spike":
                return f.value
            if f.step == step and f.kind == "nonfinite":
                return float("nan")
        return None

    def bad_data(self) -> list[tuple[int, int]]:
        """(first step, steps) of each bad_data fault."""
        return [(f.step, int(f.value)) for f in self.faults if f.kind == "bad_data"]

    def data_delay_s(self, step: int) -> float:
        delay = 0.0
        for f in self.faults:
            if f.kind == "stall" and f.step == step:
                delay += f.value
            elif f.kind == "slow_data" and step >= f.step:
                delay += f.value * (step - f.step + 1) / 10.0
        return delay

    def before_step(self, step: int) -> None:
        """Process-level faults: a real SIGKILL, or a hang that never returns."""
        for f in self.faults:
            if f.step == step and f.kind == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.step == step and f.kind == "hang":
                while True:
                    time.sleep(3600)


class DelayedBatches:
    """The data loader with the plan's stalls and slowdowns in front of it (once per step).

    Sits *inside* the monitor's `wrap`, so the injected delay is measured as data wait exactly as a
    slow filesystem's would be.
    """

    def __init__(self, source: Iterator, plan: FaultPlan, upcoming_step: Callable[[], int]):
        self.source, self.plan, self.upcoming_step = source, plan, upcoming_step
        self._delayed_step = -1

    def __iter__(self) -> "DelayedBatches":
        return self

    def __next__(self):
        step = self.upcoming_step()
        if step != self._delayed_step:
            self._delayed_step = step
            delay = self.plan.data_delay_s(step)
            if delay:
                time.sleep(delay)
        return next(self.source)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


class PoisonedBatches:
    """The data with bad_data's windows poisoned: each batch window whose (epoch, window id) is in
    `poisoned` gets its targets scrambled by a fixed permutation of the vocabulary, so the model
    is asked for nonsense there and the loss spikes (and its gradient with it).

    Sits between the data and the delays; reads which windows a batch holds from the data's
    `last_read`. Costs a set lookup per window; a poisoned window, one multiply-add over its targets.
    """

    SCRAMBLE = (101, 37)  # t -> (101 t + 37) mod vocab: a permutation for any vocab 101 does not divide

    def __init__(self, source, poisoned: set[tuple[int, int]], vocab: int):
        self.source, self.poisoned, self.vocab = source, poisoned, vocab

    def __iter__(self) -> "PoisonedBatches":
        return self

    def __next__(self):
        batch = next(self.source)
        epoch, ids = self.source.last_read
        bad = [i for i, w in enumerate(ids.tolist()) if (epoch, w) in self.poisoned]
        if bad:  # a new tensor: the targets are a view of the same windows as the inputs
            a, b = self.SCRAMBLE
            targets = batch.targets.clone()
            targets[bad] = (targets[bad] * a + b) % self.vocab
            batch = replace(batch, targets=targets)
        return batch

    def __getattr__(self, name: str):
        return getattr(self.source, name)
