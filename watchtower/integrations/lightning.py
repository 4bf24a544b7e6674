"""Watchtower for a PyTorch Lightning run: one line, `Trainer(callbacks=[WatchtowerCallback()])`.

    from watchtower.integrations.lightning import WatchtowerCallback
    trainer = Trainer(max_steps=10_000, callbacks=[WatchtowerCallback()])   # /metrics on 9400 + LOCAL_RANK
    trainer.fit(model, datamodule)

Where each value comes from (Lightning's public callback hooks, one private attribute):
- `on_train_batch_start`: the batch, on its device: tokens from its attention mask (no host read);
- `on_before_backward`: each micro-batch's loss, already divided by `accumulate_grad_batches`; under
  fp16 with a GradScaler Lightning hands it over already multiplied by the scale, which is divided
  back out on the device (else the loss read 65536x and each scale change looked like a spike);
- `on_before_optimizer_step`: the gradient norm before clipping (grads are unscaled by then under
  AMP), one fused norm over the grads queued on the device, and the lr of this update;
- `on_train_batch_end`: the step ends when `trainer.global_step` moved (after the last micro-batch);
- data wait: Lightning's loop reports each fetch of a training batch to `trainer.profiler` as the
  action `[_TrainingEpochLoop].train_dataloader_next` (what its profilers print). At train start the
  callback puts a timer in front of the trainer's profiler that times that action and passes every
  call on; the profiler is put back at the end. Only the fetch is timed: a checkpoint save or a
  validation run between batches is never counted as data wait. (The loaders cannot simply be
  wrapped: Lightning starts iterating them before any callback hook runs.)
The grad norm is this rank's: equal on every rank under DDP, one shard's under FSDP or TP.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

try:  # the `lightning` package's namespace first: where it is installed, its Trainer is the one in use
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

from watchtower.hooks import MonitorConfig
from watchtower.integrations.step_feed import FeedingCallback, count_tokens

DATA_FETCH = "train_dataloader_next"  # the end of Lightning's profiler action around a training batch's fetch


class WatchtowerCallback(FeedingCallback, Callback):
    """One monitor step per optimizer step of `trainer.fit`. Arguments: see `FeedingCallback`."""

    def __init__(self, config: MonitorConfig | None = None, run: str | None = None,
                 count: Callable[[Any], Any] = count_tokens):
        super().__init__(config, run, count)
        self._begun_at = 0  # trainer.global_step when the open step began

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.open_feed(pl_module.device, type(pl_module).__name__):
            return
        trainer.profiler = FetchTimer(trainer.profiler, self.feed.monitor)
        with self.feed.monitor.errors.guard("integration"):  # an unknown length (an endless loader) is no plan
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            self.feed.monitor.set_compute_budget(sum(p.numel() for p in pl_module.parameters()),
                                                 total if total != float("inf") else 0, max(trainer.world_size, 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.feed is None:
            return
        if not self.feed.open:
            self._begun_at = trainer.global_step
            self.feed.begin(trainer.global_step + 1)
        self.feed.batch(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.feed:
            with self.feed.monitor.errors.guard("integration"):
                self.feed.loss(unscaled(loss, trainer))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.feed is None:
            return
        with self.feed.monitor.errors.guard("integration"):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                self.feed.grad_norm(torch.nn.utils.get_total_norm(grads))  # a device tensor: no host read
            self._lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.feed and self.feed.open and trainer.global_step > self._begun_at:
            self.feed.end(lr=self._lr)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)  # /metrics and the sampler stop with the run, however it ended

    def _close(self, trainer) -> None:
        if isinstance(trainer.profiler, FetchTimer):
            trainer.profiler = trainer.profiler.inner
        self.close_feed()


def unscaled(loss: Any, trainer: Any) -> Any:
    """The loss as the model computed it: the precision plugin's GradScaler (fp16) has scaled the
    tensor Lightning passes to `on_before_backward`. Divided by the scale tensor the scaler used,
    on the device (its `get_scale()` would read it on the host every micro-batch)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return loss
    scale = getattr(scaler, "_scale", None)  # set by the scale() that scaled this loss
    return loss / (scale.reshape(()) if isinstance(scale, torch.Tensor) else scaler.get_scale())


class FetchTimer:
    """Stands in front of the trainer's profiler: times Lightning's batch-fetch action as data wait
    and hands every call (that one included) to the profiler it stands in for."""

    def __init__(self, inner: Any, monitor: Any):
        self.inner, self.monitor = inner, monitor
        self._started: float | None = None

    def start(self, action_name: str) -> None:
        self.inner.start(action_name)
        if action_name.endswith(DATA_FETCH):
            self._started = time.perf_counter()

    def stop(self, action_name: str) -> None:
        if action_name.endswith(DATA_FETCH) and self._started is not None:
            self.monitor.add_data_wait(time.perf_counter() - self._started)
            self._started = None
        self.inner.stop(action_name)

    def __getattr__(self, name: str) -> Any:  # profile(), describe(), setup(), ...: the profiler's own
        return getattr(self.inner, name)
