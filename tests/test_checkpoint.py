"""Checkpointer rules on one rank: the manifest commits a save, corrupt ones are skipped, K kept."""

from __future__ import annotations

import json

import torch

from watchtower.trainer.checkpoint import Checkpointer


def single_rank(url) -> Checkpointer:
    return Checkpointer(str(url), rank=0, world_size=1, keep_last=2, agree=lambda f: f, gather=lambda o: [o])


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
