"""Watchtower inside the real Hugging Face Trainer and the real Lightning Trainer, on CPU.

A tiny Llama built from a config (nothing downloaded) trains for 200 steps on a padded corpus whose
step 150 has random labels (a loss spike, injected through the data) and whose step 60 is slow to
load (data wait). At the last step a probe scrapes the rank's /metrics and runs promtool on both
formats; the run must have counted exactly that spike, the tokens of the attention masks (not the
padded length), the wait, the loss and grad norm of every step, and no hook error.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import free_port, samples, scrape_text, value
from test_metrics import assert_promtool_clean
from watchtower.hooks import MonitorConfig

VOCAB, SEQ, BATCH, STEPS = 32, 16, 4, 200
SPIKE_STEP, STALL_STEP, STALL_S = 150, 60, 0.3


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small gains nothing from intra-op threads, and on a loaded 2-core machine their
    spinning made each step 15x slower; the setting is restored for the tests after these."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def example(i: int) -> dict[str, torch.Tensor]:
    """Sequence i: each token is the last + 1 or + 2 (a floor of ln 2 to learn down to), a padded
    tail of 0..7 positions; the batches of SPIKE_STEP get random labels."""
    g = torch.Generator().manual_seed(i)
    ids = (torch.randint(VOCAB, (1,), generator=g) + torch.cumsum(1 + torch.randint(2, (SEQ,), generator=g), 0)) % VOCAB
    mask = (torch.arange(SEQ) < SEQ - int(torch.randint(SEQ // 2, (1,), generator=g))).long()
    labels = torch.randint(VOCAB, (SEQ,), generator=g) if i // BATCH + 1 == SPIKE_STEP else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(mask == 0, -100)}


class Corpus(torch.utils.data.IterableDataset):
    """In order (no sampler to shuffle the spike elsewhere); the first example of STALL_STEP is slow."""

    def __iter__(self):
        for i in range(STEPS * BATCH):
            if i == (STALL_STEP - 1) * BATCH:
                time.sleep(STALL_S)  # the injected slow read: data wait, not compute
            yield example(i)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))


def monitor_config(port: int) -> MonitorConfig:
    return MonitorConfig(port=port, bind="127.0.0.1", system_interval_s=0.2)


def check_final_scrape(port: int) -> dict:
    """At the last step, while /metrics is up: promtool-clean in both formats; the samples."""
    assert_promtool_clean(port)
    return samples(scrape_text(port))


def assert_observed(s: dict, run: str) -> None:
    assert value(s, "watchtower_run_info", run=run, replica_group="3", node="n7") == 1, "labels from the environment"
    assert value(s, "watchtower_steps_total") == STEPS
    assert value(s, "watchtower_tokens_total") == sum(int(example(i)["attention_mask"].sum()) for i in range(STEPS * BATCH))
    assert value(s, "watchtower_tokens_total") < STEPS * BATCH * SEQ, "the padding is not counted"
    assert value(s, "watchtower_tokens_per_second") > 0
    assert value(s, "watchtower_data_wait_seconds_total") >= STALL_S
    assert value(s, "watchtower_loss") < 2.0 and value(s, "watchtower_grad_norm") > 0
    assert value(s, "watchtower_detector_events_total", detector="loss_spike", severity="critical") == 1
    assert value(s, "watchtower_detector_last_event_step", detector="loss_spike") == SPIKE_STEP
    assert value(s, "watchtower_tokens_per_parameter") > 0
    assert value(s, "watchtower_planned_tokens_per_parameter") == value(s, "watchtower_tokens_per_parameter")
    assert value(s, "watchtower_process_resident_memory_bytes") > 0
    assert not any(v for (name, _), v in s.items() if name == "watchtower_hook_errors_total")


def label_env(monkeypatch, run: str) -> None:
    """What a launcher sets (RANK/LOCAL_RANK are left alone: they would make the Trainers start a
    process group); Watchtower's own labels from the environment."""
    monkeypatch.setenv("WATCHTOWER_RUN", run)
    monkeypatch.setenv("WATCHTOWER_REPLICA_GROUP", "3")
    monkeypatch.setenv("WATCHTOWER_NODE", "n7")


def test_hf_trainer_run_exports_what_the_bundled_trainer_does(tmp_path, monkeypatch):
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from watchtower.integrations.transformers import watch

    label_env(monkeypatch, "hf")
    port, scraped = free_port(), {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS:
                scraped.update(check_final_scrape(port))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, warmup_steps=10, logging_steps=50, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Corpus(), data_collator=default_data_collator)
    callback = watch(trainer, monitor_config(port))
    trainer.add_callback(Probe())
    trainer.train()
    assert scraped, "the probe saw the last step"
    assert_observed(scraped, "hf")
    assert callback.monitor is None, "the monitor closed with the run"


def test_lightning_run_exports_what_the_bundled_trainer_does(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from watchtower.integrations.lightning import WatchtowerCallback

    label_env(monkeypatch, "pl")
    port, scraped = free_port(), {}

    class TinyLlama(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == STEPS:
                scraped.update(check_final_scrape(port))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         default_root_dir=str(tmp_path), callbacks=[WatchtowerCallback(monitor_config(port)), Probe()])
    trainer.fit(TinyLlama(), torch.utils.data.DataLoader(Corpus(), batch_size=BATCH))
    assert scraped, "the probe saw the last step"
    assert_observed(scraped, "pl")


def test_core_never_imports_the_frameworks():
    """The integrations are optional extras: the CLI, the hooks, the trainer and the supervisor
    import neither transformers nor Lightning (checked in a fresh interpreter)."""
    code = ("import sys, watchtower.cli, watchtower.hooks, watchtower.trainer.train, watchtower.supervisor.shell\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'pytorch_lightning', 'lightning', 'accelerate') or m.startswith('watchtower.integrations'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_a_failing_token_count_is_counted_never_raised():
    """A user's `count` that breaks on some batch must not stop training: the step is still counted,
    the failure lands in watchtower_hook_errors_total{hook="integration"}."""
    from watchtower.hooks import Monitor
    from watchtower.integrations.step_feed import StepFeed

    monitor = Monitor(MonitorConfig(port=0, log_interval=1))
    feed = StepFeed(monitor, count=lambda batch: 1 / 0)
    feed.begin(1)
    feed.batch({"input_ids": torch.zeros(1, 4)})
    feed.loss(torch.tensor(1.5))
    feed.end(lr=0.1)
    feed.close()
    assert monitor.state.steps_total == 1 and monitor.state.loss == 1.5
    assert monitor.errors.counts["integration"] == 1


class Rows(torch.utils.data.Dataset):
    """A map-style corpus of `example`s whose item `fail_at` raises (a corrupt sample)."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == self.fail_at:
            raise RuntimeError("corrupt sample")
        return example(i)


def hf_trainer(tmp_path, rows: Rows, steps: int):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    return Trainer(model=tiny_llama(), args=args, train_dataset=rows, data_collator=default_data_collator)


def test_watch_twice_attaches_one_callback_not_two_monitors(tmp_path):
    """watch() called twice (a notebook cell run again), or after add_callback(WatchtowerCallback()),
    gave a second callback and wrapped the methods again: two monitors, the second serving on
    port + 1, which is LOCAL_RANK 1's port. Now every call hands back the one callback."""
    from watchtower.integrations.transformers import WatchtowerCallback, watch

    trainer = hf_trainer(tmp_path, Rows(8), 2)
    watch(trainer, MonitorConfig(port=0))
    first = next(c for c in trainer.callback_handler.callbacks if isinstance(c, WatchtowerCallback))
    step_method = trainer.training_step
    assert watch(trainer, MonitorConfig(port=0)) is first
    assert trainer.training_step is step_method, "wrapped once"

    other = hf_trainer(tmp_path, Rows(8), 2)
    added = WatchtowerCallback(MonitorConfig(port=0))
    other.add_callback(added)
    assert watch(other) is added and added.attached
    assert sum(isinstance(c, WatchtowerCallback) for c in other.callback_handler.callbacks) == 1

    reused = hf_trainer(tmp_path, Rows(8), 2)  # one callback handed to a second trainer: that one is wrapped too
    reused.add_callback(first)
    assert watch(reused) is first and not inspect.ismethod(reused.training_step)


def test_a_train_that_raises_frees_the_metrics_port(tmp_path):
    """HF's Trainer has no exception event: a train() that raised left /metrics holding its port
    (and the sampler running), so the next watched Trainer of the process served on port + 1."""
    import socket

    from watchtower.integrations.transformers import watch

    port = free_port()
    trainer = hf_trainer(tmp_path, Rows(40, fail_at=9), 10)
    callback = watch(trainer, monitor_config(port))
    with pytest.raises(RuntimeError, match="corrupt sample"):
        trainer.train()
    assert callback.monitor is None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is free again"


def test_lightning_fp16_loss_is_not_the_scaled_loss(tmp_path):
    """Under 16-mixed with a GradScaler, Lightning hands on_before_backward the loss already
    multiplied by the scale (65536 at first): watchtower_loss read 65536x the loss, and every change
    of the scale looked like a loss spike. The callback divides the scale back out, on the device."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision

    from watchtower.integrations.lightning import WatchtowerCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.losses = tiny_llama(), []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    callback, seen = WatchtowerCallback(MonitorConfig(port=0, log_interval=1)), []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            callback.monitor._flush(wait=True)
            seen.append((callback.monitor.state.loss, float(pl_module.losses[-1])))

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=[plugin],
                         default_root_dir=str(tmp_path), callbacks=[callback, Probe()])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(Rows(8), batch_size=BATCH))
    assert len(seen) == 2
    for exported, true in seen:
        assert exported == pytest.approx(true, rel=1e-3)
