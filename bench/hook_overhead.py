"""Hook overhead: the same training steps with and without the monitor, interleaved in one process.

Blocks of steps alternate (off, on, off, on, ...) on one model so drift in machine load hits both
sides alike; a thread scrapes /metrics every second, as an impatient Prometheus would. Prints
`overhead_ratio` = steps/s with hooks ÷ steps/s without (goal >= 0.98 on CPU tiny, >= 0.99 on GPU).
On a GPU it also counts host syncs the monitor adds per step with torch.cuda.set_sync_debug_mode.

The integrations are measured the same way: `hf_overhead_ratio` alternates `Trainer.train()` blocks
of a small Llama (built from a config) with and without `watch(trainer)`, `lightning_overhead_ratio`
`Trainer.fit()` blocks with and without the `WatchtowerCallback`; each block's time runs from its
first finished step to its last (the frameworks' own start-up is outside it). None where the extra
is not installed.

    python bench/hook_overhead.py [--config tiny] [--blocks 12] [--block-steps 20] [--framework-blocks 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
import urllib.request
import warnings

import torch
import torch.nn.functional as F

from watchtower.config import load_config
from watchtower.hooks import Monitor, MonitorConfig, RankIdentity
from watchtower.trainer.data import PackedBatches, load_tokens
from watchtower.trainer.model import Transformer
from watchtower.trainer.parallel import clip_grads_, grad_norm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--block-steps", type=int, default=20)
    ap.add_argument("--framework-blocks", type=int, default=6, help="blocks per side for HF and Lightning (0: skip)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    data = PackedBatches(load_tokens(cfg.data), cfg.train.seq_len, cfg.train.micro_batch_size, 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    on = Monitor(MonitorConfig(port=19400, bind="127.0.0.1", log_interval=10, system_interval_s=1.0),
                 RankIdentity(run="bench"), device=device)
    off = Monitor(MonitorConfig(enabled=False))
    stop = threading.Event()

    def scraper():
        while not stop.wait(1.0):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{on.port}/metrics", timeout=2).read()
            except OSError:
                pass

    threading.Thread(target=scraper, daemon=True).start()
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len

    def block(monitor: Monitor, steps: int) -> float:
        loader = monitor.wrap(data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            with monitor.step(tokens=tokens) as s:
                batch = next(loader).to(device)
                with autocast:
                    logits = model(batch.inputs, batch.positions, batch.doc_ids)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())
                loss.backward()
                norm = grad_norm(params, None)
                clip_grads_(params, norm, 1.0)
                s.record(loss=loss.detach(), grad_norm=norm, lr=1e-3)
                opt.step()
                opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    block(off, 5)
    block(on, 5)  # warm-up both paths
    with_hooks, without = [], []
    for _ in range(args.blocks):
        without.append(block(off, args.block_steps))
        with_hooks.append(block(on, args.block_steps))
    syncs_added = None
    if device.type == "cuda":  # count syncs: the debug mode warns on every synchronizing call
        counts = []
        for monitor in (off, on):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                block(monitor, args.block_steps)
                torch.cuda.set_sync_debug_mode(0)
            counts.append(len(caught))
        syncs_added = (counts[1] - counts[0]) / args.block_steps
    stop.set()
    on.close()
    t_off, t_on = statistics.median(without), statistics.median(with_hooks)
    print(f"{'':12}{'s/step':>10}{'steps/s':>10}")
    print(f"{'without':12}{t_off:10.4f}{1 / t_off:10.2f}")
    print(f"{'with hooks':12}{t_on:10.4f}{1 / t_on:10.2f}")
    frameworks = {f"{name}_overhead_ratio": measure_framework(measure, args.framework_blocks, args.block_steps)
                  for name, measure in (("hf", hf_block), ("lightning", lightning_block))}
    print(json.dumps({"overhead_ratio": round(t_off / t_on, 4), "steps_per_second_without": round(1 / t_off, 3),
                      "steps_per_second_with": round(1 / t_on, 3), "device": device.type, "config": args.config,
                      "host_syncs_added_per_step": syncs_added, **frameworks}))


# ---- the integrations: the same small model and data in the real HF and Lightning Trainers ----------------

VOCAB, SEQ, BATCH = 256, 128, 8


def framework_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))


class PaddedCorpus(torch.utils.data.IterableDataset):
    """Random tokens with a padded tail of up to a quarter of each row, endless."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(VOCAB, (SEQ,), generator=g)
            mask = (torch.arange(SEQ) < SEQ - int(torch.randint(SEQ // 4, (1,), generator=g))).long()
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def seconds_per_step(finished: list[float]) -> float:
    """From the times each step finished: the block's steps after its first, so start-up is left out."""
    return (finished[-1] - finished[0]) / (len(finished) - 1)


def hf_block(model, steps: int, monitored: bool, port: int) -> float:
    """One `Trainer.train()` of `steps` steps on `model` (it keeps training across blocks)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from watchtower.integrations.transformers import watch

    finished: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            finished.append(time.perf_counter())

    args = TrainingArguments(output_dir="/tmp/watchtower-bench-hf", max_steps=steps, per_device_train_batch_size=BATCH,
                             report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
                             disable_tqdm=True, logging_steps=10 ** 9)
    trainer = Trainer(model=model, args=args, train_dataset=PaddedCorpus(), data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)  # its end-of-train dict on stdout; the JSON line must be the last
    if monitored:
        watch(trainer, MonitorConfig(port=port, bind="127.0.0.1", system_interval_s=1.0))
    trainer.add_callback(Clock())  # after Watchtower's: its step end is inside the time
    trainer.train()
    return seconds_per_step(finished)


def lightning_block(model, steps: int, monitored: bool, port: int) -> float:
    """One `Trainer.fit()` of `steps` steps on `model` (a LightningModule wrapping the same Llama)."""
    import pytorch_lightning as pl

    from watchtower.integrations.lightning import WatchtowerCallback

    finished: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            finished.append(time.perf_counter())

    callbacks = [WatchtowerCallback(MonitorConfig(port=port, bind="127.0.0.1", system_interval_s=1.0))] if monitored else []
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, Clock()])
    trainer.fit(model, torch.utils.data.DataLoader(PaddedCorpus(), batch_size=BATCH))
    return seconds_per_step(finished)


def lightning_module():
    import pytorch_lightning as pl

    class Llama(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = framework_model()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Llama()


def measure_framework(block, blocks: int, steps: int) -> float | None:
    """steps/s with Watchtower ÷ without, blocks alternating on one model; None without the extra."""
    try:
        model = framework_model() if block is hf_block else lightning_module()
    except ImportError:
        return None
    if not blocks:
        return None
    logging.getLogger("watchtower").setLevel(logging.ERROR)  # the detectors' warnings are not the point here
    port, stop = 19500, threading.Event()
    threading.Thread(target=scrape_every_second, args=(port, stop), daemon=True).start()
    block(model, steps, False, port), block(model, steps, True, port)  # warm-up both paths
    without, with_hooks = [], []
    for _ in range(blocks):
        without.append(block(model, steps, False, port))
        with_hooks.append(block(model, steps, True, port))
    stop.set()
    return round(statistics.median(without) / statistics.median(with_hooks), 4)


def scrape_every_second(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        except OSError:
            pass  # between monitored blocks nothing serves


if __name__ == "__main__":
    main()
