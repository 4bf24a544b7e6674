"""Durable checkpoints through fsspec: atomic, checksummed, last K kept, corrupt ones skipped.

Layout under `checkpoint.dir` (a local path or any fsspec URL):

    step-00000040/
        rank-00.pt ... rank-NN.pt   one file per TP rank: its model shard, optimizer shard, data state
        manifest.json               written last: the commit marker, with sha256 and size of every file

A step directory without a manifest is an interrupted save and is ignored. Each file is first written
under a temporary name and then renamed, so a reader never sees half a file on a local disk; on object
stores, where rename is a copy, the manifest written last is what makes the checkpoint exist.

On resume every rank checks its own file against the manifest; the ranks agree (all-reduce of a flag)
on the newest step that is valid for all of them, so one truncated shard sends the whole group back
to the previous checkpoint instead of loading a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
import torch

from watchtower.validation import require

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d{8})$")
MANIFEST = "manifest.json"


@dataclass
class CheckpointConfig:
    """dir: where checkpoints go; empty means `<run.output_dir>/checkpoints`.
    interval_steps: save every N steps (0: only at the end of the run). Lower it when a lost
        replica-free restart would cost more than the save (the save blocks the step).
    keep_last: how many valid checkpoints to keep; older ones are deleted after a successful save.
    resume: start from the newest valid checkpoint in `dir` when there is one.
    """

    dir: str = ""
    interval_steps: int = 0
    keep_last: int = 3
    resume: bool = True

    def __post_init__(self) -> None:
        require(self.interval_steps >= 0, "interval_steps", self.interval_steps, "must be >= 0 (0: only at the end)")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")


def rank_file(rank: int) -> str:
    return f"rank-{rank:02d}.pt"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    """Saves and restores one TP group's state.

    `agree(flag)` returns the minimum of `flag` over the ranks that must agree (an all-reduce over the
    TP group; identity for a single rank); `gather(obj)` returns the list of every rank's `obj`.
    """

    def __init__(self, url: str, rank: int, world_size: int, keep_last: int,
                 agree: Callable[[bool], bool], gather: Callable[[Any], list[Any]]):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.agree, self.gather = agree, gather
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def steps(self) -> list[int]:
        """Steps with a directory, newest first (valid or not)."""
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            m = STEP_DIR.search(entry.rstrip("/"))
            if m:
                found.append(int(m.group(1)))
        return sorted(found, reverse=True)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = rank_file(self.rank)
        directory = self._path(step_dir(step))
        self.fs.makedirs(directory, exist_ok=True)
        self._write_atomic(f"{directory}/{name}", data)
        entries = self.gather({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        if self.rank == 0:
            manifest = {"step": step, "world_size": self.world_size, "files": entries, "meta": meta}
            self._write_atomic(f"{directory}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            self._prune()
        self.agree(True)  # nobody returns before the manifest exists

    def _prune(self) -> None:
        valid = [s for s in self.steps() if self._manifest(s) is not None]
        for old in valid[self.keep_last:]:
            self.fs.rm(self._path(step_dir(old)), recursive=True)

    def _manifest(self, step: int) -> dict[str, Any] | None:
        path = self._path(step_dir(step), MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _problem(self, step: int) -> tuple[str | None, bytes | None]:
        """Why this rank cannot load `step` (None when it can), and the verified bytes."""
        manifest = self._manifest(step)
        if manifest is None:
            return "no readable manifest (interrupted save)", None
        if manifest.get("world_size") != self.world_size:
            return (f"saved with {manifest.get('world_size')} TP ranks, this run has {self.world_size}; "
                    "resume with the same --tp"), None
        entry = next((e for e in manifest["files"] if e["file"] == rank_file(self.rank)), None)
        if entry is None:
            return f"manifest lists no {rank_file(self.rank)}", None
        try:
            with self.fs.open(self._path(step_dir(step), entry["file"]), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return f"{entry['file']} is missing", None
        if len(data) != entry["bytes"]:
            return f"{entry['file']} is truncated ({len(data)} of {entry['bytes']} bytes)", None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{entry['file']} fails its sha256 check", None
        return None, data

    def load_latest(self) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, this rank's state, manifest meta) of the newest checkpoint valid on every rank."""
        for step in self.steps():
            problem, data = self._problem(step)
            if not self.agree(problem is None):
                if problem:
                    log.warning("checkpoint %s is unusable: %s; trying the previous one",
                                self._path(step_dir(step)), problem)
                continue
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return step, state, self._manifest(step)["meta"]
        return None
