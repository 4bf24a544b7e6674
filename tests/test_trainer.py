"""The bundled trainer, run for real through the CLI on CPU.

A TP=1 run goes through `watchtower.cli.main` in this process (`train_here`): the same command, without
the ~4 s (more under load) of a new interpreter importing torch. A run that must be its own process
(TP=2, a SIGKILL, a compile whose printed order is checked) is a subprocess (`train`). Every process
runs one thread (conftest), so both kinds compute the same numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass

import pytest

from conftest import read_log, run_watchtower
from watchtower import cli

TP_TOLERANCE = 1e-4  # max |loss(TP=2) - loss(TP=1)| per step over 20 steps, float32 on CPU
SHARED_STEPS = 20  # the TP=1 and TP=2 runs several tests read


def flags_for(out, *flags):
    return ["train", "--config", "tiny", "--port", "0", "--output-dir", str(out), "--train.log_interval", "1", *flags]


def train(tmp_path, name, *flags):
    out = tmp_path / name
    return out, run_watchtower(*flags_for(out, *flags))


@dataclass
class Ran:
    """What a run in this process returned and logged (a subprocess's `returncode` and `stderr`)."""

    returncode: int
    stderr: str


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_here(tmp_path, name, *flags) -> tuple:
    """`train`, in this process: the trainer's log lines (INFO and up) stand in for its stderr."""
    out, handler, logger = tmp_path / name, _Lines(), logging.getLogger("watchtower")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        code = cli.main(flags_for(out, *flags))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, Ran(code, "\n".join(handler.lines))


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    """tiny for SHARED_STEPS steps at TP=1: the loss curve, and the reference TP=2 must reproduce."""
    out, result = train_here(tmp_path_factory.mktemp("shared"), "tp1", "--steps", str(SHARED_STEPS))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """The same run at TP=2 (a subprocess: it launches its ranks), also the checkpoint a TP=2 resume
    starts from: one TP=2 start-up (~10 s, more under load) for both tests."""
    out, result = train(tmp_path_factory.mktemp("shared"), "tp2", "--steps", str(SHARED_STEPS), "--tp", "2")
    assert result.returncode == 0, result.stderr
    return out


def test_loss_falls_on_tiny(tp1_run):
    # 20 steps (was 60): the curve flattens near 2.8 after ~15 steps; by step 20 the last ten
    # average ~1.8 below the first five
    losses = [row["loss"] for row in read_log(tp1_run)]
    assert len(losses) == SHARED_STEPS
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:5]) - 1.0, losses


def test_tp2_reproduces_tp1(tp1_run, tp2_run):
    a, b = read_log(tp1_run), read_log(tp2_run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, SHARED_STEPS + 1))
    assert [r["data_sig"] for r in a] == [r["data_sig"] for r in b]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) <= TP_TOLERANCE, diffs


def test_resume_continues_exactly(tmp_path):
    """A run killed (SIGKILL) after its step-10 checkpoint resumes to the same losses and data.

    With issue 14's data fault: bad_data@13:2 poisons the windows steps 13-14 read, so the resumed run
    (the same data again) spikes there again; a resume told to skip them (data.skip_steps) leaves
    exactly those two global batches unread, records where they were, and does not spike.
    16 steps with a checkpoint every 5 (was 30 and 10): the same story at half the steps; only the
    killed run is a subprocess (its own SIGKILL)."""
    bad = ("--inject", "bad_data@13:2")
    ref, r = train_here(tmp_path, "ref", "--steps", "16", *bad)
    assert r.returncode == 0, r.stderr
    out, crashed = train(tmp_path, "resumed", "--steps", "16", "--checkpoint.interval_steps", "5",
                         "--inject", "crash@11", *bad)
    assert crashed.returncode == -9
    shutil.copytree(out, tmp_path / "skipped")  # the checkpoint at step 10, for the run that skips
    out, resumed = train_here(tmp_path, "resumed", "--steps", "16", "--checkpoint.interval_steps", "5", *bad)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint step 10" in resumed.stderr
    after = {row["step"]: row for row in read_log(out) if row["step"] > 10}
    expected = {row["step"]: row for row in read_log(ref) if row["step"] > 10}
    assert sorted(after) == list(range(11, 17))
    for step in range(11, 17):
        assert after[step]["data_sig"] == expected[step]["data_sig"]
        assert abs(after[step]["loss"] - expected[step]["loss"]) <= 1e-6, (step, after[step], expected[step])
    clean = max(expected[s]["loss"] for s in range(11, 13))
    assert min(after[13]["loss"], after[14]["loss"]) > 1.5 * clean, "the poisoned data did not spike again"

    out, skipping = train_here(tmp_path, "skipped", "--steps", "16", *bad, "--data.skip_steps", "13-14")
    assert skipping.returncode == 0, skipping.stderr
    rows = {row["step"]: row for row in read_log(out) if row["step"] > 10}
    assert sorted(rows) == list(range(11, 17)) and max(rows[s]["loss"] for s in range(13, 17)) < 1.5 * clean
    assert rows[13]["data_sig"] == expected[15]["data_sig"], "step 13 must read what step 15 read: 2 batches skipped"
    (record,) = [json.loads(line) for line in (out / "skipped_data.jsonl").read_text().splitlines()]
    width = 8 * 1  # tiny: micro_batch_size × grad_accum_steps windows per step and group
    assert record["steps"] == [13, 14] and record["positions"] == [[0, 12 * width, 14 * width]], record


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    # checkpoints at steps 2, 4 and 6 (was 10, 20, 30): the newest truncated, the one before it resumed
    out, r = train_here(tmp_path, "trunc", "--steps", "6", "--checkpoint.interval_steps", "2")
    assert r.returncode == 0, r.stderr
    newest = out / "checkpoints" / "step-00000006" / "rank-00.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    out, again = train_here(tmp_path, "trunc", "--steps", "9", "--checkpoint.interval_steps", "2")
    assert again.returncode == 0, again.stderr
    assert "step-00000006 is unusable: rank-00.pt is truncated" in again.stderr
    assert "resumed from checkpoint step 4" in again.stderr
    steps = [row["step"] for row in read_log(out)]
    assert steps == list(range(1, 7)) + list(range(5, 10))


def test_tp2_checkpoint_resume(tp2_run, tmp_path):
    """Sharded checkpoints: each TP rank saves and restores its own shard and optimizer state.
    Resumes a copy of the shared TP=2 run (its final checkpoint, step 20) instead of a run of its own."""
    out = tmp_path / "tp2ck"
    shutil.copytree(tp2_run, out)
    assert sorted(p.name for p in (out / "checkpoints" / f"step-{SHARED_STEPS:08d}").iterdir()) == [
        "manifest.json", "rank-00.pt", "rank-01.pt"]
    out, again = train(tmp_path, "tp2ck", "--steps", str(SHARED_STEPS + 4), "--tp", "2")
    assert again.returncode == 0, again.stderr
    assert f"resumed from checkpoint step {SHARED_STEPS}" in again.stderr
    assert [row["step"] for row in read_log(out)][-4:] == list(range(SHARED_STEPS + 1, SHARED_STEPS + 5))


def test_compiled_blocks_train_as_eager_and_their_checkpoints_resume_eager(tmp_path):
    """train.compile compiles each block in place, before the first step: the same losses as eager,
    and the same state_dict keys (no `_orig_mod.`), so a compiled run's checkpoint resumes in an eager run. aot_eager: the real
    dynamo + AOTAutograd path without a C++ compiler (CI has none to spare); a GPU run uses inductor."""
    ref, r = train_here(tmp_path, "eager", "--steps", "6")
    assert r.returncode == 0, r.stderr
    out, compiled = train(tmp_path, "mixed", "--steps", "3", "--train.compile", "true",
                          "--train.compile_backend", "aot_eager")
    assert compiled.returncode == 0, compiled.stderr
    # compiled before the first step (a supervised group's first quorum must not wait on a compile),
    # into a cache of its own under the run's directory, removed at the end (a killed compile's
    # truncated kernel in the machine-wide cache broke every later compile)
    said = compiled.stderr.splitlines()
    first_step = next(i for i, line in enumerate(said) if line.startswith("step     1"))
    assert any("compiled the blocks (aot_eager)" in line for line in said[:first_step]), compiled.stderr
    assert not list(out.glob("inductor-cache-*")), "the run's own inductor cache must go with it"
    out, resumed = train_here(tmp_path, "mixed", "--steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint step 3" in resumed.stderr
    expected, got = read_log(ref), read_log(out)
    assert [row["step"] for row in got] == list(range(1, 7))
    for a, b in zip(expected, got):
        assert a["data_sig"] == b["data_sig"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)


def test_flex_attention_document_mask_attends_as_the_dense_mask():
    """Compiled blocks on CUDA mask documents with flex_attention's BlockMask instead of the dense
    (B, 1, T, T) mask: the same attention (a token sees the earlier tokens of its own document), GQA
    included. Forward only: torch has no flex_attention backward on a CPU (the GPU check trains it)."""
    import warnings

    import torch

    from watchtower.trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=256))
    B, T = 2, 256
    tokens = torch.randint(0, 256, (B, T))
    starts = torch.rand(B, T) < 0.03
    starts[:, 0] = True
    doc_ids = torch.cumsum(starts.long(), dim=1)
    first = torch.cummax(torch.where(starts, torch.arange(T), 0), dim=1).values
    positions = torch.arange(T) - first  # restart at 0 in every document, as the packed data gives them
    with torch.no_grad():
        dense = model(tokens, positions, doc_ids)
        model.flex_attention = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention says it is unfused: expected here
            flex = model(tokens, positions, doc_ids)
        plain = model(tokens, positions, None)
    assert int(doc_ids.max()) >= 3, "the window must hold several documents"
    assert torch.allclose(flex, dense, atol=1e-5), (flex - dense).abs().max()
    assert not torch.allclose(plain, dense, atol=1e-3), "the masks must matter in this window"


def test_a_compiling_trainer_uses_a_cache_of_its_own_and_removes_it(tmp_path, monkeypatch):
    """inductor's default cache is shared by every process of the user, and a compile killed mid-write
    leaves a truncated kernel there that breaks every later compile. The trainer compiles (inductor,
    CPU) into a directory under its output, set before anything compiles (inductor writes its default
    into TORCHINDUCTOR_CACHE_DIR on first use), and removes it on close; a user's own setting stays."""
    import os

    from watchtower.config import load_config
    from watchtower.trainer.compiling import CACHE_ENV, private_cache
    from watchtower.trainer.train import Trainer

    monkeypatch.delenv(CACHE_ENV, raising=False)
    cfg = load_config("tiny", [("run.output_dir", str(tmp_path / "run")), ("train.steps", 1),
                               ("train.compile", True), ("monitor.port", 0)])
    trainer = Trainer(cfg)
    try:
        cache = trainer._inductor_cache
        assert cache is not None and cache.parent == tmp_path / "run" and os.environ[CACHE_ENV] == str(cache)
        assert any(cache.rglob("*")), "inductor compiled somewhere else"
    finally:
        trainer.close()
    assert not cache.exists() and CACHE_ENV not in os.environ
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert private_cache(tmp_path) is None and os.environ[CACHE_ENV] == str(tmp_path / "mine")
