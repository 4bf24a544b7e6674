"""Trainer throughput: tokens/s of the bundled trainer on the tiny preset (and MFU of smol-135m on a GPU).

Runs the real `Trainer` (with its monitor, as users run it) and times the steps after a warm-up.

    python bench/trainer_throughput.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from watchtower.config import load_config
from watchtower.trainer.train import Trainer


def measure(preset: str, steps: int) -> dict:
    """tokens/s over the steps' own wall time (the monitor's counters: no checkpoint save in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [("run.output_dir", tmp), ("train.steps", steps), ("monitor.port", 0),
                                   ("checkpoint.resume", False)])
        trainer = Trainer(cfg)
        trainer.train()
    state = trainer.monitor.state
    return {"tokens_per_second": round(state.tokens_total / state.step_time_total_s, 1),
            "last_interval_tokens_per_second": round(state.tokens_per_s, 1),
            "mfu_ratio": None if state.mfu is None else round(state.mfu, 4), "device": trainer.device.type}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    tiny = measure("tiny", args.steps)
    result = {"tiny_tokens_per_second": tiny["tokens_per_second"],
              "tiny_steady_tokens_per_second": tiny["last_interval_tokens_per_second"], "tiny_device": tiny["device"]}
    if torch.cuda.is_available():
        smol = measure("smol-135m", 60)
        result.update(smol135m_tokens_per_second=smol["last_interval_tokens_per_second"],
                      smol135m_mfu_ratio=smol["mfu_ratio"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
