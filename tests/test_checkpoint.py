"""Checkpointer rules: the manifest commits a save, corrupt ones are skipped, K of this run's kept,
other runs' checkpoints and debris left alone, a failed save costs nothing but itself."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import threading

import pytest
import torch

from conftest import free_port
from watchtower import cli
from watchtower.config import load_config
from watchtower.supervisor.jobfile import job_toml
from watchtower.trainer.checkpoint import Checkpointer
from watchtower.trainer.train import run
from watchtower.validation import ConfigError


def single_rank(url, keep_last: int = 2) -> Checkpointer:
    return Checkpointer(str(url), rank=0, world_size=1, keep_last=keep_last, agree=lambda f: f, gather=lambda o: [o])


def weights(step: int) -> dict:
    return {"w": torch.full((64,), float(step))}


def leftovers(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


class ThreadGroup:
    """`world_size` ranks as threads: gather/agree over a barrier, as the trainer's all-gather does.

    The barrier's timeout turns a rank left waiting in a collective (a hang in a real group) into a
    BrokenBarrierError the test reports."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list = [None] * world_size

    def gather(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return out
        return gather

    def checkpointer(self, url, rank: int, world_size: int, keep_last: int = 2) -> Checkpointer:
        gather = self.gather(rank)
        return Checkpointer(str(url), rank, world_size, keep_last, agree=lambda f: all(gather(f)), gather=gather)


def run_ranks(world_size: int, body) -> list:
    """body(rank) on every rank at once; returns each rank's result or the exception it raised."""
    results: list = [None] * world_size

    def target(rank):
        try:
            results[rank] = body(rank)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class FullDisk:
    """A file whose device fills up after `room` bytes: the write stops half-way with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.f.write(bytes(data[: self.room]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def fail_writes(monkeypatch, fs, matches, error=None):
    """Writes to paths for which `matches(path)` holds fail half-way (ENOSPC, or raise `error`)."""
    real_open = fs.open

    def open_(path, mode="rb", **kwargs):
        f = real_open(path, mode, **kwargs)
        if "w" in mode and matches(path):
            if error is not None:
                f.close()
                raise error
            return FullDisk(f, room=100)
        return f

    # on the instance's own __dict__: fsspec caches its filesystems, and monkeypatch.setattr on an instance
    # restores the class's method as an instance attribute, shadowing any later test's patch of the class
    monkeypatch.setitem(vars(fs), "open", open_)


# ---- the basics ---------------------------------------------------------------------------------

def test_keeps_last_k_and_skips_uncommitted(tmp_path):
    ck = single_rank(tmp_path)
    for step in (10, 20, 30):
        ck.save(step, {"w": torch.full((3,), float(step))}, {"step": step})
    assert ck.steps() == [30, 20]
    (tmp_path / "step-00000040").mkdir()  # a save that died before its manifest
    (tmp_path / "step-00000040" / "rank-00.pt").write_bytes(b"partial")
    step, state, meta = ck.load_latest()
    assert step == 30 and state["w"].tolist() == [30.0] * 3 and meta == {"step": 30}


def test_checksum_mismatch_falls_back(tmp_path):
    ck = single_rank(tmp_path)
    ck.save(10, {"w": torch.ones(4)}, {})
    ck.save(20, {"w": torch.zeros(4)}, {})
    path = tmp_path / "step-00000020" / "rank-00.pt"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    step, state, _ = ck.load_latest()
    assert step == 10 and state["w"].tolist() == [1.0] * 4


def test_manifest_records_checksums(tmp_path):
    ck = single_rank(tmp_path)
    ck.save(5, {"w": torch.ones(2)}, {"run": "x"})
    manifest = json.loads((tmp_path / "step-00000005" / "manifest.json").read_text())
    assert manifest["files"][0]["file"] == "rank-00.pt" and len(manifest["files"][0]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "step-00000005").iterdir()) == ["manifest.json", "rank-00.pt"]


# ---- item 1: whose checkpoints a run prunes and loads ----------------------------------------------

def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    """keep_last=1, an old run's valid step-00001000 in a reused dir: save(10) must survive."""
    single_rank(tmp_path, keep_last=1).save(1000, weights(1000), {"run": "old"})
    fresh = single_rank(tmp_path, keep_last=1)  # a new run (resume=false) in the same directory
    fresh.save(10, weights(10), {"run": "new"})
    assert (tmp_path / "step-00000010" / "manifest.json").exists()
    step, state, meta = fresh.load_latest()
    assert (step, meta) == (10, {"run": "new"}) and state["w"][0] == 10
    assert (tmp_path / "step-00001000" / "manifest.json").exists(), "another run's checkpoint is never pruned"


def test_restart_resumes_its_own_newest_and_prunes_only_its_own(tmp_path):
    """A restarted job resumes the newest save (not the highest step) and keeps K of its own."""
    single_rank(tmp_path, keep_last=1).save(1000, weights(1000), {"run": "old"})
    single_rank(tmp_path, keep_last=1).save(10, weights(10), {"run": "new"})
    restarted = single_rank(tmp_path, keep_last=1)
    step, _, meta = restarted.load_latest()
    assert (step, meta) == (10, {"run": "new"})
    for s in (20, 30):
        restarted.save(s, weights(s), {"run": "new"})
    assert restarted.steps() == [1000, 30], "K=1 of this run, the old run's untouched"
    assert restarted.load_latest()[0] == 30


def test_prune_keeps_the_newest_save_when_the_timeline_rewinds(tmp_path):
    """Resumed from 20 after 30 turned out corrupt: the re-saved 25 is newer than the stale 30."""
    ck = single_rank(tmp_path, keep_last=2)
    for s in (10, 20, 30):
        ck.save(s, weights(s), {})
    (tmp_path / "step-00000030" / "rank-00.pt").write_bytes(b"truncated")
    restarted = single_rank(tmp_path, keep_last=2)
    assert restarted.load_latest()[0] == 20
    restarted.save(25, weights(25), {})
    assert restarted.steps() == [25, 20] and restarted.load_latest()[0] == 25


def test_reused_memory_url_keeps_the_new_save(tmp_path):
    url = f"memory://ck-{tmp_path.name}"
    single_rank(url, keep_last=1).save(1000, weights(1000), {"run": "old"})
    fresh = single_rank(url, keep_last=1)
    fresh.save(10, weights(10), {"run": "new"})
    assert fresh.load_latest()[0] == 10 and sorted(fresh.steps()) == [10, 1000]
    fresh.fs.rm(fresh.root, recursive=True)


def make_checkpoint(tmp_path, lr: str) -> str:
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["train", "--config", "tiny", "--port", "0", "--steps", "2", "--output-dir",
                     str(tmp_path / f"run-{lr}"), "--checkpoint.dir", ckpt, "--optim.lr", lr]) == 0
    return ckpt


def test_resume_with_another_config_hash_is_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path, "0.001")
    saved = json.loads((tmp_path / "ckpt" / "step-00000002" / "manifest.json").read_text())["meta"]["config_hash"]
    capsys.readouterr()
    code = cli.main(["train", "--config", "tiny", "--port", "0", "--steps", "4", "--output-dir",
                     str(tmp_path / "other"), "--checkpoint.dir", ckpt, "--optim.lr", "0.002"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("config error: checkpoint"), err
    assert saved in err[0] and "allow_config_change" in err[0], err[0]
    other = err[0].split("this run has ")[1].split(";")[0]
    assert len(other) == 12 and other != saved, err[0]


def test_config_hash_of_the_presets_is_what_their_checkpoints_already_hold():
    """A new config key that does not change what a step computes (train.compile) must not change the
    hash: every checkpoint written before it would be refused on resume. The values are the presets'
    hashes before train.compile existed (a994e8f); a change here must be a deliberate one."""
    assert load_config("tiny").config_hash() == "4f6bdd066aae"
    assert load_config("smol-135m").config_hash() == "9d3587803816"
    assert load_config("tiny", [("train.compile", True), ("train.compile_backend", "aot_eager")]).config_hash() \
        == "4f6bdd066aae"


def test_allow_config_change_resumes_anyway(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path, "0.001")
    with caplog.at_level(logging.INFO):
        code = cli.main(["train", "--config", "tiny", "--port", "0", "--steps", "3", "--output-dir",
                         str(tmp_path / "other"), "--checkpoint.dir", ckpt, "--optim.lr", "0.002",
                         "--checkpoint.allow_config_change", "true"])
    assert code == 0
    assert "resumed from checkpoint step 2" in caplog.text
    assert "config_hash" in caplog.text and "allow_config_change" in caplog.text


# ---- item 2: durability ----------------------------------------------------------------------------

def test_data_is_fsynced_before_the_manifest_commits(tmp_path, monkeypatch):
    """Power loss after the rename must not leave a manifest pointing at data still in the page cache."""
    ck = single_rank(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_mv = os.fsync, ck.fs.mv
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setitem(vars(ck.fs), "mv", lambda a, b, **kw: (events.append(("mv", str(b))), real_mv(a, b, **kw))[1])
    ck.save(7, weights(7), {})
    directory = str(tmp_path / "step-00000007")
    commit = events.index(("mv", f"{directory}/manifest.json"))
    before = events[:commit]
    assert ("fsync", f"{directory}/rank-00.pt.tmp") in before, events
    assert ("mv", f"{directory}/rank-00.pt") in before
    assert ("fsync", directory) in before[before.index(("mv", f"{directory}/rank-00.pt")):], events
    assert ("fsync", f"{directory}/manifest.json.tmp") in before, events
    assert ("fsync", directory) in events[commit:], "the commit itself is made durable"


def test_enospc_mid_write_keeps_the_previous_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch):
    ck = single_rank(tmp_path)
    ck.save(10, weights(10), {})
    with monkeypatch.context() as m:
        fail_writes(m, ck.fs, lambda p: "step-00000020/rank" in str(p))
        with pytest.raises(OSError) as raised:
            ck.save(20, weights(20), {})
    assert raised.value.errno == errno.ENOSPC
    step, state, _ = single_rank(tmp_path).load_latest()
    assert step == 10 and state["w"][0] == 10
    ck.save(30, weights(30), {})
    assert leftovers(tmp_path) == []
    assert ck.steps() == [30, 10], "the failed save's directory is gone"
    assert ck.load_latest()[0] == 30


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a write: no `except Exception` handler runs for it."""


def test_killed_save_debris_is_swept_by_the_next_good_save_but_never_another_runs(tmp_path, monkeypatch):
    other = single_rank(tmp_path / "dir")  # another run that also died mid-save in this directory
    with monkeypatch.context() as m:
        fail_writes(m, other.fs, lambda p: "step-00000500/rank" in str(p), error=Killed())
        with pytest.raises(Killed):
            other.save(500, weights(500), {})
    ck = single_rank(tmp_path / "dir")
    ck.save(10, weights(10), {})
    with monkeypatch.context() as m:
        fail_writes(m, ck.fs, lambda p: "step-00000020/rank" in str(p), error=Killed())
        with pytest.raises(Killed):
            ck.save(20, weights(20), {})
    assert leftovers(tmp_path / "dir") == ["step-00000020/rank-00.pt.tmp", "step-00000500/rank-00.pt.tmp"]
    restarted = single_rank(tmp_path / "dir")
    assert restarted.load_latest()[0] == 10
    restarted.save(30, weights(30), {})
    assert not (tmp_path / "dir" / "step-00000020").exists(), "this run's interrupted save is swept"
    assert (tmp_path / "dir" / "step-00000500").exists(), "another run's interrupted save is left alone"
    assert [p for p in leftovers(tmp_path / "dir") if "step-00000500" not in p] == []


def test_manifest_without_files_or_meta_is_skipped_with_a_warning(tmp_path, caplog):
    ck = single_rank(tmp_path)
    ck.save(5, weights(5), {"run": "x"})
    for step, manifest in ((9, {"step": 1}), (8, {"step": 8, "world_size": 1, "seq": 99})):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        step, _, meta = ck.load_latest()
    assert (step, meta) == (5, {"run": "x"})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("step-00000009", "step-00000008"):
        assert any(name in w and "lacks a 'files' list" in w for w in warned), warned
    ck.save(6, weights(6), {})  # neither save nor prune trips over them
    assert (tmp_path / "step-00000009" / "manifest.json").exists()
    assert ck.load_latest()[0] == 6


def test_a_rank_failing_its_write_fails_the_save_on_every_rank_without_a_hang(tmp_path, monkeypatch):
    """TP=2, rank 1's disk is full: both ranks raise (none waits forever), step 10 stays loadable."""
    group = ThreadGroup(2)
    cks = [group.checkpointer(tmp_path, r, 2) for r in range(2)]
    assert run_ranks(2, lambda r: cks[r].save(10, weights(10 + r), {})) == [None, None]
    fail_writes(monkeypatch, cks[0].fs, lambda p: str(p).endswith("step-00000020/rank-01.pt.tmp"))
    results = run_ranks(2, lambda r: cks[r].save(20, weights(20 + r), {}))
    assert all(isinstance(e, OSError) for e in results), results
    assert results[1].errno == errno.ENOSPC and "rank 1" in str(results[0]), results
    monkeypatch.undo()
    loaded = run_ranks(2, lambda r: group.checkpointer(tmp_path, r, 2).load_latest())
    assert [(s, st["w"][0].item()) for s, st, _ in loaded] == [(10, 10.0), (10, 11.0)]
    assert run_ranks(2, lambda r: cks[r].save(30, weights(30 + r), {})) == [None, None]
    assert leftovers(tmp_path) == [] and cks[0].steps() == [30, 10]


# ---- review of issue 11: a save never writes into a committed checkpoint; resumes refused up front ----

def manifest_of(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def sound(directory) -> bool:
    """Every file the manifest lists is there with its recorded sha256: the checkpoint is intact."""
    return all(hashlib.sha256((directory / e["file"]).read_bytes()).hexdigest() == e["sha256"]
               for e in manifest_of(directory)["files"])


def test_a_failed_resave_of_a_step_keeps_the_previous_checkpoint_of_that_step(tmp_path, monkeypatch):
    """Review finding 1: saving step 3 again (a finished run started again) replaced rank-00.pt in
    place before the new manifest; ENOSPC on that manifest left the old one failing its sha256."""
    ck = single_rank(tmp_path, keep_last=1)
    ck.save(3, weights(3), {"run": "x"})
    with monkeypatch.context() as m:
        fail_writes(m, ck.fs, lambda p: str(p).endswith("manifest.json.tmp"))
        with pytest.raises(OSError) as raised:
            ck.save(3, weights(33), {"run": "x"})
    assert raised.value.errno == errno.ENOSPC
    assert sound(tmp_path / "step-00000003")
    step, state, _ = single_rank(tmp_path, keep_last=1).load_latest()
    assert step == 3 and state["w"][0] == 3, "the previous checkpoint of step 3 is still the one loaded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"], "the failed save left no debris"
    ck.save(3, weights(33), {"run": "x"})  # a re-save that commits replaces it, then retires the old one
    step, state, _ = single_rank(tmp_path, keep_last=1).load_latest()
    assert step == 3 and state["w"][0] == 33
    assert ck.steps() == [3] and leftovers(tmp_path) == []


def test_a_failed_resave_on_an_object_store_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The same through fsspec's memory filesystem, which (like an object store) has no atomic rename
    of a directory: the save is staged by its directory name, nothing is renamed."""
    url = f"memory://resave-{tmp_path.name}"
    ck = single_rank(url, keep_last=1)
    ck.save(3, weights(3), {})
    with monkeypatch.context() as m:
        fail_writes(m, ck.fs, lambda p: str(p).endswith("manifest.json.tmp"))
        with pytest.raises(OSError):
            ck.save(3, weights(33), {})
    step, state, _ = single_rank(url, keep_last=1).load_latest()
    assert step == 3 and state["w"][0] == 3
    assert [p.rsplit("/", 1)[-1] for p in ck.fs.ls(ck.root, detail=False)] == ["step-00000003"]
    ck.fs.rm(ck.root, recursive=True)


def test_a_resave_killed_before_its_manifest_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = single_rank(tmp_path, keep_last=1)
    ck.save(3, weights(3), {})
    with monkeypatch.context() as m:
        fail_writes(m, ck.fs, lambda p: str(p).endswith("manifest.json.tmp"), error=Killed())
        with pytest.raises(Killed):
            ck.save(3, weights(33), {})
    restarted = single_rank(tmp_path, keep_last=1)
    step, state, _ = restarted.load_latest()
    assert step == 3 and state["w"][0] == 3
    restarted.save(4, weights(4), {})  # the next good save removes the killed save's debris
    assert restarted.steps() == [4] and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


def test_a_resave_failing_on_one_tp_rank_keeps_the_previous_checkpoint_on_both(tmp_path, monkeypatch):
    """TP=2: rank 0 has written its new file when rank 1's disk fills up; step 10 must stay whole."""
    group = ThreadGroup(2)
    cks = [group.checkpointer(tmp_path, r, 2) for r in range(2)]
    assert run_ranks(2, lambda r: cks[r].save(10, weights(10 + r), {})) == [None, None]
    fail_writes(monkeypatch, cks[0].fs, lambda p: str(p).endswith("rank-01.pt.tmp"))
    results = run_ranks(2, lambda r: cks[r].save(10, weights(50 + r), {}))
    assert all(isinstance(e, OSError) for e in results), results
    monkeypatch.undo()
    loaded = run_ranks(2, lambda r: group.checkpointer(tmp_path, r, 2).load_latest())
    assert [(s, st["w"][0].item()) for s, st, _ in loaded] == [(10, 10.0), (10, 11.0)]


def test_a_fresh_run_never_overwrites_another_runs_checkpoint_at_the_same_step(tmp_path):
    """Review finding 2: a fresh run in a reused dir replaced the old run's step-N as it reached N."""
    single_rank(tmp_path, keep_last=1).save(10, weights(10), {"run": "old"})
    old = tmp_path / "step-00000010"
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    fresh = single_rank(tmp_path, keep_last=1)  # resume=false: nothing loaded, a new origin
    fresh.save(10, weights(1), {"run": "new"})
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before, "the old run's checkpoint is untouched"
    step, state, meta = fresh.load_latest()
    assert (step, meta, state["w"][0].item()) == (10, {"run": "new"}, 1.0), "the newest save is the new run's"
    fresh.save(20, weights(2), {"run": "new"})  # keep_last=1 prunes the new run's own step 10 only
    assert sorted(fresh.steps()) == [10, 20] and sound(old) and manifest_of(old)["meta"] == {"run": "old"}


def seqs(root) -> dict[str, int]:
    """Each checkpoint directory's seq: which save it holds."""
    return {p.parent.name: manifest_of(p.parent)["seq"] for p in root.glob("step-*/manifest.json")}


def tp2_checkpoints(root, meta: dict) -> dict[str, int]:
    """A TP=2 run's checkpoints at steps 5 and 10; returns their seqs."""
    group = ThreadGroup(2)
    for step in (5, 10):
        run_ranks(2, lambda r: group.checkpointer(root, r, 2).save(step, weights(step + r), meta))
    return seqs(root)


def test_resume_with_another_tp_is_refused_not_skipped_as_corrupt(tmp_path):
    """Review finding 2: every TP=2 checkpoint was "unusable" to a TP=1 run, which then started from
    step 0 without the config check and overwrote them."""
    saved = tp2_checkpoints(tmp_path, {"config_hash": "aaaaaaaaaaaa"})
    for load in (lambda ck: ck.load_latest(), lambda ck: ck.load_latest("aaaaaaaaaaaa", allow_config_change=True)):
        with pytest.raises(ConfigError) as refused:  # shards of another TP cannot be loaded, allowed or not
            load(single_rank(tmp_path))
        assert refused.value.field == "train.tp" and "saved with train.tp = 2" in str(refused.value)
        assert "step-00000010" in str(refused.value) and "--tp 2" in str(refused.value)
    assert seqs(tmp_path) == saved


def test_resume_under_another_config_hash_is_refused_even_when_its_newest_save_is_corrupt(tmp_path):
    """The config check is on the manifest, before any shard is read: a truncated shard of another
    config's checkpoint does not send the run back to an older checkpoint it would silently load."""
    ck = single_rank(tmp_path)
    ck.save(10, weights(10), {"config_hash": "aaaaaaaaaaaa"})
    ck.save(20, weights(20), {"config_hash": "bbbbbbbbbbbb"})
    (tmp_path / "step-00000020" / "rank-00.pt").write_bytes(b"truncated")
    with pytest.raises(ConfigError) as refused:
        single_rank(tmp_path).load_latest("aaaaaaaaaaaa")
    assert refused.value.field == "checkpoint.dir" and "bbbbbbbbbbbb" in str(refused.value)


def train_args(tmp_path, ckpt, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--port", "0", "--steps", "2", "--output-dir", str(tmp_path / "run"),
            "--checkpoint.dir", str(ckpt), *extra]


def test_resume_with_another_tp_is_refused_before_any_rank_starts(tmp_path, capsys):
    """Review findings 2 and 5: `watchtower train --tp 1` on a TP=2 run's checkpoints is one line,
    exit 2, before an output dir, a /metrics port or a rank exists, and the checkpoints stay."""
    saved = tp2_checkpoints(tmp_path / "ckpt", {"config_hash": "aaaaaaaaaaaa"})
    capsys.readouterr()
    code = cli.main(train_args(tmp_path, tmp_path / "ckpt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("config error: train.tp = 1: ") and "--tp 2" in err[0], err[0]
    assert not (tmp_path / "run").exists(), "nothing may start before the resume is judged"
    assert seqs(tmp_path / "ckpt") == saved


def test_refused_resume_under_another_config_hash_starts_nothing(tmp_path, capsys):
    """Review finding 5: the refusal came from inside the trainer, after /metrics, the output dir
    and (under a supervisor) the Lighthouse and every group had started."""
    single_rank(tmp_path / "ckpt").save(10, weights(10), {"config_hash": "aaaaaaaaaaaa"})
    capsys.readouterr()
    code = cli.main(train_args(tmp_path, tmp_path / "ckpt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("config error: checkpoint.dir = ") and "aaaaaaaaaaaa" in err[0], err[0]
    assert not (tmp_path / "run").exists(), "nothing may start before the resume is judged"


@pytest.mark.parametrize("overrides,saved_meta,field", [
    ([], {"config_hash": "aaaaaaaaaaaa"}, "checkpoint.dir"),
    (["train.tp=2"], {}, "train.tp"),
], ids=["config-hash", "tp"])
def test_supervise_refuses_a_resume_of_another_config_before_starting_groups(tmp_path, capsys, overrides,
                                                                             saved_meta, field):
    """Review finding 5: under `supervise` the groups' exit 2 drained three nodes and ended as a crash loop."""
    job_dir = tmp_path / "job"
    single_rank(job_dir / "checkpoints").save(10, weights(10), saved_meta)  # a TP=1 run's checkpoint
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "tune", "trainer_config": "tiny", "output_dir": str(job_dir),
                              "train_overrides": ["train.steps=20", *overrides]}, {"nodes": ["n0", "n1"]},
                             {"metrics_port": 0, "linger_s": 0, "base_port": free_port()}))
    capsys.readouterr()
    code = cli.main(["supervise", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"config error: {field} = "), err[0]
    assert sorted(p.name for p in job_dir.iterdir()) == ["checkpoints"], "no Lighthouse, no group, no event"


def test_a_finished_run_started_again_does_not_save_its_last_step_again(tmp_path):
    """The same run started again loads its last step and has nothing to do: re-saving it would only
    rewrite (and, before staging, risk) the checkpoint it just loaded."""
    ckpt = make_checkpoint(tmp_path, "0.001")
    before = manifest_of(tmp_path / "ckpt" / "step-00000002")
    assert make_checkpoint(tmp_path, "0.001") == ckpt
    assert manifest_of(tmp_path / "ckpt" / "step-00000002") == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002"]


def test_a_run_whose_save_fails_frees_its_metrics_port(tmp_path, monkeypatch):
    """Review finding 9: when train() raised (a failed save), run() left /metrics bound and its
    threads running in the calling process."""
    port = free_port()
    cfg = load_config("tiny", [("train.steps", 2), ("run.output_dir", str(tmp_path / "run")),
                               ("monitor.port", port), ("monitor.bind", "127.0.0.1"), ("data.max_bytes", 200_000)])

    def disk_full(self, path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(Checkpointer, "_write_atomic", disk_full)
    with pytest.raises(OSError):
        run(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # EADDRINUSE while the failed run's server still holds it
