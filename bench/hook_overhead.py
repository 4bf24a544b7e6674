"""Hook overhead: the same training steps with and without the monitor, interleaved in one process.

Blocks of steps alternate (off, on, off, on, ...) on one model so drift in machine load hits both
sides alike; a thread scrapes /metrics every second, as an impatient Prometheus would. Prints
`overhead_ratio` = steps/s with hooks ÷ steps/s without (goal >= 0.98 on CPU tiny, >= 0.99 on GPU).
On a GPU it also counts host syncs the monitor adds per step with torch.cuda.set_sync_debug_mode.

    python bench/hook_overhead.py [--config tiny] [--blocks 12] [--block-steps 20]
"""

from __future__ import annotations

import argparse
import json
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
    print(json.dumps({"overhead_ratio": round(t_off / t_on, 4), "steps_per_second_without": round(1 / t_off, 3),
                      "steps_per_second_with": round(1 / t_on, 3), "device": device.type, "config": args.config,
                      "host_syncs_added_per_step": syncs_added}))


if __name__ == "__main__":
    main()
