"""Tokens per parameter: how far a run is along its data budget, beside the compute-optimal point.

Hoffmann et al. (2022, "Chinchilla") found that for a fixed compute budget the loss is lowest near
D/N ≈ 20 training tokens per parameter. That is the cheapest way to *reach* a loss, not the best
model to *serve*: small models are deliberately trained far past it (SmolLM's 135M-parameter model
saw about 600B tokens, D/N ≈ 4,400) because inference costs scale with N, and more data keeps
improving a small model. The number is information to read beside the plan, never an alert.

Used by the monitor (which exports both ratios), the dashboards and the TUI (which draw the
reference); this module imports nothing heavy, so the TUI can read the constant.

Example:
    >>> b = ComputeBudget(parameters=1_000_000, total_steps=1000)
    >>> b.tokens_per_parameter(step=100, tokens_total=100 * 4096, steps_total=100)
    (0.4096, 4.096)
"""

from __future__ import annotations

from dataclasses import dataclass

from watchtower.validation import require

COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER = 20.0  # Chinchilla's D/N at the compute-optimal frontier


@dataclass(frozen=True)
class ComputeBudget:
    """parameters: the whole model's (not one shard's). total_steps: the run's planned optimizer
    steps (0: unknown, no planned ratio). data_parallel: ranks (or replica groups) that each see
    different data, so the job's tokens per step are this rank's times it."""

    parameters: int
    total_steps: int = 0
    data_parallel: int = 1

    def __post_init__(self) -> None:
        require(self.parameters > 0, "parameters", self.parameters, "must be > 0 (the model's parameter count)")
        require(self.total_steps >= 0, "total_steps", self.total_steps, "must be >= 0 steps (0: unknown)")
        require(self.data_parallel >= 1, "data_parallel", self.data_parallel, "must be >= 1")

    def tokens_per_parameter(self, step: int, tokens_total: float,
                             steps_total: int) -> tuple[float | None, float | None]:
        """(now, planned at total_steps), from this rank's mean tokens per applied step.

        Tokens seen are the step number times that mean, not this process's token counter: a resumed
        run restarts its counters but not its step, and its earlier tokens still trained the model.
        None while no step with tokens was seen (e.g. a hot spare, which trains on nothing).
        """
        if steps_total <= 0 or tokens_total <= 0:
            return None, None
        per_step = tokens_total / steps_total * self.data_parallel
        planned = per_step * self.total_steps / self.parameters if self.total_steps else None
        return per_step * step / self.parameters, planned
