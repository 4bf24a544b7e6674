"""Watchtower for a Hugging Face `transformers.Trainer` run: one line, `watch(trainer)`.

    from watchtower.integrations.transformers import watch
    trainer = Trainer(model=model, args=args, train_dataset=data)
    watch(trainer)          # /metrics on port 9400 + LOCAL_RANK, labels from torchrun/accelerate
    trainer.train()

Why a function and not only `trainer.add_callback(WatchtowerCallback())`: the Trainer hands its
callbacks neither the batch, the loss nor the grad norm. It exposes them in three methods of its
own, which `watch` wraps on this one instance (the class is untouched):
- `training_step` returns each micro-batch's loss as a detached device tensor (what the Trainer
  sums into the loss it logs): handed over as is, with the batch's attention mask for tokens/s;
- `get_batch_samples` pulls the step's batches from the epoch iterator: that iterator is timed
  through `Monitor.wrap`, exactly as the bundled trainer times its loader (data wait);
- `_get_grad_norm` returns the gradient norm before clipping (a device tensor);
- `train` closes the monitor when it raises: the Trainer has no exception event, and an open
  monitor would keep its /metrics port, so the process's next watched Trainer served on port + 1.
The callback's events open and close the monitor's step. Nothing reads a device value per step.
A callback added without `watch` still exports step time, system metrics and heartbeats, and
warns once that loss, tokens, data wait and grad norm need `watch(trainer)`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from transformers import TrainerCallback

from watchtower.hooks import MonitorConfig
from watchtower.integrations.step_feed import FeedingCallback, count_tokens

log = logging.getLogger("watchtower.integrations")

# the Trainer's methods `watch` wraps, each with what it hands over (see the module docstring)
WRAPPED = ("training_step", "get_batch_samples", "_get_grad_norm", "train")


class WatchtowerCallback(FeedingCallback, TrainerCallback):
    """Opens the monitor at train begin, one monitor step per optimizer step, closes it at the end.
    Arguments: see `FeedingCallback`."""

    def __init__(self, config: MonitorConfig | None = None, run: str | None = None,
                 count: Callable[[Any], Any] = count_tokens):
        super().__init__(config, run, count)
        self.attached = False

    def attach(self, trainer: Any) -> None:
        """Wrap the trainer's methods (once per trainer: a marker on the instance says it is done) so
        they hand their values to this callback."""
        if getattr(trainer, "_watchtower_callback", None) is self:
            return
        for name in WRAPPED:
            if not hasattr(trainer, name):
                log.warning("watchtower: this transformers has no Trainer.%s; its values are not exported", name)
                continue
            setattr(trainer, name, getattr(self, f"_around_{name.lstrip('_')}")(getattr(trainer, name)))
        trainer._watchtower_callback = self
        self.attached = True

    # ---- the wrappers: each calls the Trainer's own method and hands over what passes through ----

    def _around_training_step(self, original):
        def training_step(model, inputs, *args, **kwargs):
            if self.feed:
                self.feed.batch(inputs)
            loss = original(model, inputs, *args, **kwargs)
            if self.feed:
                self.feed.loss(loss)
            return loss
        return training_step

    def _around_get_batch_samples(self, original):
        def get_batch_samples(epoch_iterator, *args, **kwargs):
            if self.feed:
                epoch_iterator = self.feed.monitor.wrap(epoch_iterator)  # every next() timed as data wait
            return original(epoch_iterator, *args, **kwargs)
        return get_batch_samples

    def _around_train(self, original):
        def train(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except BaseException:
                self.close_feed()  # a normal end closes it in on_train_end
                raise
        return train

    def _around_get_grad_norm(self, original):
        def get_grad_norm(*args, **kwargs):
            norm = original(*args, **kwargs)
            if self.feed:
                self.feed.grad_norm(norm)
            return norm
        return get_grad_norm

    # ---- the callback's events -----------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        name = getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__
        if self.feed is None and not self.open_feed(args.device, name):
            return
        if model is not None:
            # every rank of a DDP/FSDP run sees other data: the job's tokens per step are world_size times a rank's
            self.feed.monitor.set_compute_budget(sum(p.numel() for p in model.parameters()), state.max_steps,
                                                 max(args.world_size, 1))
        if not self.attached:
            log.warning("watchtower: the callback was added without watch(trainer): loss, tokens, data wait "
                        "and grad norm are not exported (use watchtower.integrations.transformers.watch)")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.feed:
            self.feed.begin(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = getattr(optimizer, "param_groups", None)
        if self.feed and groups:
            self._lr = groups[0].get("lr")  # the lr this update uses (the scheduler moves it after)

    def on_step_end(self, args, state, control, **kwargs):
        if self.feed:
            self.feed.end(lr=self._lr)

    def on_train_end(self, args, state, control, **kwargs):
        self.close_feed()


def watch(trainer: Any, config: MonitorConfig | None = None, run: str | None = None,
          count: Callable[[Any], Any] = count_tokens) -> WatchtowerCallback:
    """The one line: add a `WatchtowerCallback` to `trainer` and wrap its loss, batch and grad-norm
    methods (see the module docstring). Returns the callback; its `monitor` is live during `train()`.

    Idempotent per trainer: a second call (a notebook cell run again), or a call on a trainer that
    already has a `WatchtowerCallback`, attaches and returns that one; two would wrap the methods
    twice and start a second monitor on port + 1, the next local rank's port."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, WatchtowerCallback)), None)
    if callback is None:
        callback = WatchtowerCallback(config, run, count)
        trainer.add_callback(callback)
    elif (config, run) != (None, None) and (config, run) != (callback.config, callback.run):
        log.warning("watchtower: this trainer is already watched; the new config/run are ignored")
    callback.attach(trainer)
    return callback
