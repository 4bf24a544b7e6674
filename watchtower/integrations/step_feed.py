"""A framework's callback events turned into the monitor's steps, for loops Watchtower does not own.

The bundled trainer writes `with monitor.step() as s:` around its step; a framework's loop owns that
code, so its callbacks open the step when the framework begins one and close it when it ends.
Between the two they hand over batches (token counts), micro-batch losses and the grad norm; all
of them stay on the device, summed there, and reach the host with the monitor's interval copy.

What it costs per optimizer step: an attention mask's `sum()` per micro-batch and one tensor
addition per micro-batch loss, both queued on the device; nothing is read on the host. Every call
is guarded: a failure is counted in `watchtower_hook_errors_total`, never raised into the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

import torch

from watchtower.hooks import Monitor, MonitorConfig, RankIdentity

log = logging.getLogger("watchtower.integrations")


def count_tokens(batch: Any) -> torch.Tensor | int:
    """The real tokens of a batch: its attention mask's sum, not its padded size.

    A mapping with `attention_mask` counts the mask on its device (a 0-d tensor, no host read); one
    with only `input_ids` (nothing padded) or a bare tensor counts its elements, known on the host
    from the shape; a tuple or list counts its first item (the inputs, by convention); else 0.

    >>> count_tokens({"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    tensor(5)
    >>> count_tokens((torch.zeros(3, 8), torch.zeros(3)))
    24
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.sum()
        return count_tokens(batch.get("input_ids"))
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)) and batch:
        return count_tokens(batch[0])
    return 0


def make_monitor(config: MonitorConfig | None, run: str | None, device: Any, model_name: str) -> Monitor:
    """A monitor labelled from the launcher's environment (torchrun and accelerate set RANK and
    LOCAL_RANK; WATCHTOWER_RUN, WATCHTOWER_REPLICA_GROUP and WATCHTOWER_NODE as for our trainer);
    /metrics on the config's port + LOCAL_RANK."""
    return Monitor(config, RankIdentity.from_env(run), device=device, model_name=model_name)


class StepFeed:
    """One optimizer step at a time: `begin`, any number of `batch`/`loss`, `grad_norm`, `end`.

    Example (what a framework's callbacks do, here by hand):
        >>> monitor = Monitor(MonitorConfig(port=0, log_interval=2))
        >>> feed = StepFeed(monitor)
        >>> for step in (1, 2):
        ...     feed.begin(step)
        ...     feed.batch({"attention_mask": torch.tensor([[1, 1, 0]])}); feed.loss(torch.tensor(0.5))
        ...     feed.batch({"attention_mask": torch.tensor([[1, 0, 0]])}); feed.loss(torch.tensor(0.25))
        ...     feed.grad_norm(torch.tensor(1.0)); feed.end(lr=1e-3)
        >>> monitor.close(); monitor.state.tokens_total, monitor.state.loss
        (6.0, 0.75)
    """

    def __init__(self, monitor: Monitor, count: Callable[[Any], Any] = count_tokens):
        self.monitor, self._count = monitor, count
        self._handle = None
        self._tokens = self._loss = self._norm = None

    @property
    def open(self) -> bool:
        return self._handle is not None

    def begin(self, step: int) -> None:
        """A new optimizer step; a step still open (the framework skipped its end) is closed first."""
        if self._handle is not None:
            self.end()
        with self.monitor.errors.guard("integration"):
            self._tokens = self._loss = self._norm = None
            self._handle = self.monitor.step(step=step)
            self._handle.__enter__()

    def batch(self, batch: Any) -> None:
        """A micro-batch of the open step: its tokens add to the step's (on the device)."""
        if self._handle is None:
            return
        with self.monitor.errors.guard("integration"):
            n = self._count(batch)
            self._tokens = n if self._tokens is None else self._tokens + n

    def loss(self, loss: Any) -> None:
        """A micro-batch's contribution to the step's loss (already divided by the accumulation
        steps, as the frameworks report it): the step's loss is their sum."""
        if self._handle is None or loss is None:
            return
        with self.monitor.errors.guard("integration"):
            loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
            self._loss = loss if self._loss is None else self._loss + loss

    def grad_norm(self, norm: Any) -> None:
        if self._handle is not None and norm is not None:
            self._norm = norm

    def end(self, lr: Any = None) -> None:
        """Close the open step: the monitor gets its loss, grad norm, lr and tokens, all at once."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        with self.monitor.errors.guard("integration"):
            handle.record(loss=self._loss, grad_norm=self._norm, lr=lr, tokens=self._tokens)
            handle.__exit__(None, None, None)

    def close(self) -> None:
        """End of training: an open step is closed, buffers are flushed, /metrics stops."""
        self.end()
        self.monitor.close()


class FeedingCallback:
    """What both frameworks' callbacks share: their settings, and the feed they open at train start.

    config: the monitor's settings (port, detectors, ...); run: the `run` label (default:
    $WATCHTOWER_RUN, else "default"); count: tokens of a batch (default: its attention mask's sum).
    """

    def __init__(self, config: MonitorConfig | None = None, run: str | None = None,
                 count: Callable[[Any], Any] = count_tokens):
        self.config, self.run, self.count = config, run, count
        self.feed: StepFeed | None = None
        self._lr: Any = None  # the lr of the update in progress, read before the optimizer steps

    @property
    def monitor(self) -> Monitor | None:
        """The live monitor during training; None before it and after it."""
        return self.feed.monitor if self.feed else None

    def open_feed(self, device: Any, model_name: str) -> bool:
        """Start the monitor (and /metrics); a failure (e.g. a malformed RANK) leaves the run
        training, unobserved, with a warning: never an exception into the loop."""
        try:
            self.feed = StepFeed(make_monitor(self.config, self.run, device, model_name), self.count)
        except Exception as err:  # noqa: BLE001
            log.warning("watchtower is off for this run: %s", err)
            return False
        return True

    def close_feed(self) -> None:
        if self.feed:
            self.feed.close()
            self.feed = None
