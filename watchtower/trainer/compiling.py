"""`train.compile` at a trainer's start: which backends, which attention, which cache, and when.

What a compiled run needs that an eager one does not (each found by running it, 2026-11-27):
- The compile happens before the first quorum (`compile_now`, from `Trainer._build`): one forward
  and backward on a dummy micro-batch of the real shapes, with a progress report every
  COMPILE_PROGRESS_S. Compiling inside the first step took ~50 s for smol-135m on an H100 (longer on
  a loaded CPU): longer than torchft's quorum timeout, so the groups that were ready gave up and the
  supervisor drained their nodes; and a hot spare, which runs no forward until it is promoted,
  compiled at its takeover step, under the heartbeat timeout.
- A cache of this process's own (`private_cache`): inductor's default (/tmp/torchinductor_<user>)
  is shared by every process of the user on the machine, and a process killed while the compiler
  writes a kernel leaves a truncated .so there that later compiles load ("file too short"): one
  killed group broke every group after it. Each process compiles into a directory under its run's
  output directory, removed when it closes. Cost: no reuse of kernels across processes (every start
  compiles in full); a user's own TORCHINDUCTOR_CACHE_DIR is left alone.
- flex_attention only where it is fused (`uses_flex_attention`): on CUDA (torch has no backward for
  it on a CPU), with inductor (other backends run its unfused reference: more memory than the dense
  mask), and head sizes of at least 16 (inductor's flex kernel refuses smaller).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

FLEX_MIN_HEAD_DIM = 16
COMPILE_PROGRESS_S = 5.0  # how often the compile reports progress to the supervisor
COMPILE_PROGRESS_LIMIT_S = 900.0  # after this a compile stops reporting: the startup grace then ends it
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def uses_flex_attention(device_type: str, backend: str, head_dim: int) -> bool:
    """
    >>> [uses_flex_attention(d, b, h) for d, b, h in
    ...  [("cuda", "inductor", 64), ("cpu", "inductor", 64), ("cuda", "aot_eager", 64), ("cuda", "inductor", 8)]]
    [True, False, False, False]
    """
    return device_type == "cuda" and backend == "inductor" and head_dim >= FLEX_MIN_HEAD_DIM


def private_cache(output: Path) -> Path | None:
    """Point inductor at a new directory under `output` (module doc); None where the user set one.
    Call it before anything compiles: inductor writes its shared default into the same variable the
    first time it looks for its cache, which would then read as the user's choice."""
    if os.environ.get(CACHE_ENV):
        return None
    path = Path(tempfile.mkdtemp(prefix="inductor-cache-", dir=output))
    os.environ[CACHE_ENV] = str(path)
    return path


def remove_cache(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(CACHE_ENV) == str(path):
            del os.environ[CACHE_ENV]


def compile_now(model: torch.nn.Module, batch_size: int, seq_len: int, device: torch.device,
                autocast: AbstractContextManager, document_masking: bool, progress: Callable[[], None]) -> float:
    """Run one forward and backward of `model` on a dummy micro-batch of the training shapes, so the
    compiled graphs exist before the first step; gradients are dropped (no optimizer state, no data
    consumed). Reports `progress` every COMPILE_PROGRESS_S meanwhile. Returns the seconds it took.
    At TP > 1 every rank runs it (its collectives are the TP group's, as in a step)."""
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    doc_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device) if document_masking else None
    done = threading.Event()

    def report() -> None:
        deadline = time.monotonic() + COMPILE_PROGRESS_LIMIT_S
        while not done.wait(COMPILE_PROGRESS_S) and time.monotonic() < deadline:
            progress()

    ticker = threading.Thread(target=report, name="compile-progress", daemon=True)
    start = time.perf_counter()
    ticker.start()
    try:
        with autocast:
            logits = model(tokens, positions, doc_ids)
        logits.float().mean().backward()
    finally:
        done.set()
        ticker.join()
        for p in model.parameters():
            p.grad = None
    return time.perf_counter() - start
