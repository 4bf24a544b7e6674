"""The bundled trainer, run for real through the CLI on CPU."""

from __future__ import annotations

import json
import shutil
import statistics

from conftest import read_log, run_watchtower

TP_TOLERANCE = 1e-4  # max |loss(TP=2) - loss(TP=1)| per step over 20 steps, float32 on CPU


def train(tmp_path, name, *flags):
    out = tmp_path / name
    result = run_watchtower("train", "--config", "tiny", "--port", "0", "--output-dir", str(out),
                            "--train.log_interval", "1", *flags)
    return out, result


def test_loss_falls_on_tiny(tmp_path):
    out, result = train(tmp_path, "falls", "--steps", "60")
    assert result.returncode == 0, result.stderr
    losses = [row["loss"] for row in read_log(out)]
    assert len(losses) == 60
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:5]) - 1.0, losses


def test_tp2_reproduces_tp1(tmp_path):
    out1, r1 = train(tmp_path, "tp1", "--steps", "20")
    out2, r2 = train(tmp_path, "tp2", "--steps", "20", "--tp", "2")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = read_log(out1), read_log(out2)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    assert [r["data_sig"] for r in a] == [r["data_sig"] for r in b]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) <= TP_TOLERANCE, diffs


def test_resume_continues_exactly(tmp_path):
    """A run killed (SIGKILL) after its step-20 checkpoint resumes to the same losses and data.

    With issue 14's data fault: bad_data@25:2 poisons the windows steps 25-26 read, so the resumed run
    (the same data again) spikes there again; a resume told to skip them (data.skip_steps) leaves
    exactly those two global batches unread, records where they were, and does not spike."""
    bad = ("--inject", "bad_data@25:2")
    ref, r = train(tmp_path, "ref", "--steps", "30", *bad)
    assert r.returncode == 0, r.stderr
    out, crashed = train(tmp_path, "resumed", "--steps", "30", "--checkpoint.interval_steps", "10",
                         "--inject", "crash@21", *bad)
    assert crashed.returncode == -9
    shutil.copytree(out, tmp_path / "skipped")  # the checkpoint at step 20, for the run that skips
    out, resumed = train(tmp_path, "resumed", "--steps", "30", "--checkpoint.interval_steps", "10", *bad)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint step 20" in resumed.stderr
    after = {row["step"]: row for row in read_log(out) if row["step"] > 20}
    expected = {row["step"]: row for row in read_log(ref) if row["step"] > 20}
    assert sorted(after) == list(range(21, 31))
    for step in range(21, 31):
        assert after[step]["data_sig"] == expected[step]["data_sig"]
        assert abs(after[step]["loss"] - expected[step]["loss"]) <= 1e-6, (step, after[step], expected[step])
    clean = max(expected[s]["loss"] for s in range(21, 25))
    assert min(after[25]["loss"], after[26]["loss"]) > 1.5 * clean, "the poisoned data did not spike again"

    out, skipping = train(tmp_path, "skipped", "--steps", "30", *bad, "--data.skip_steps", "25-26")
    assert skipping.returncode == 0, skipping.stderr
    rows = {row["step"]: row for row in read_log(out) if row["step"] > 20}
    assert sorted(rows) == list(range(21, 31)) and max(rows[s]["loss"] for s in range(25, 31)) < 1.5 * clean
    assert rows[25]["data_sig"] == expected[27]["data_sig"], "step 25 must read what step 27 read: 2 batches skipped"
    (record,) = [json.loads(line) for line in (out / "skipped_data.jsonl").read_text().splitlines()]
    width = 8 * 1  # tiny: micro_batch_size × grad_accum_steps windows per step and group
    assert record["steps"] == [25, 26] and record["positions"] == [[0, 24 * width, 26 * width]], record


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    out, r = train(tmp_path, "trunc", "--steps", "30", "--checkpoint.interval_steps", "10")
    assert r.returncode == 0, r.stderr
    newest = out / "checkpoints" / "step-00000030" / "rank-00.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    out, again = train(tmp_path, "trunc", "--steps", "35", "--checkpoint.interval_steps", "10")
    assert again.returncode == 0, again.stderr
    assert "step-00000030 is unusable: rank-00.pt is truncated" in again.stderr
    assert "resumed from checkpoint step 20" in again.stderr
    steps = [row["step"] for row in read_log(out)]
    assert steps[-15:] == list(range(21, 36))


def test_tp2_checkpoint_resume(tmp_path):
    """Sharded checkpoints: each TP rank saves and restores its own shard and optimizer state."""
    out, r = train(tmp_path, "tp2ck", "--steps", "10", "--tp", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000010").iterdir()) == [
        "manifest.json", "rank-00.pt", "rank-01.pt"]
    out, again = train(tmp_path, "tp2ck", "--steps", "14", "--tp", "2")
    assert again.returncode == 0, again.stderr
    assert "resumed from checkpoint step 10" in again.stderr
    assert [row["step"] for row in read_log(out)][-4:] == [11, 12, 13, 14]


def test_compiled_blocks_train_as_eager_and_their_checkpoints_resume_eager(tmp_path):
    """train.compile compiles each block in place, before the first step: the same losses as eager,
    and the same state_dict keys (no `_orig_mod.`), so a compiled run's checkpoint resumes in an eager run. aot_eager: the real
    dynamo + AOTAutograd path without a C++ compiler (CI has none to spare); a GPU run uses inductor."""
    ref, r = train(tmp_path, "eager", "--steps", "6")
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
    out, resumed = train(tmp_path, "mixed", "--steps", "6")
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
