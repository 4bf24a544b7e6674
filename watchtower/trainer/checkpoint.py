"""Durable checkpoints through fsspec: atomic, checksummed, last K of this run kept, corrupt ones skipped.

Layout under `checkpoint.dir` (a local path or any fsspec URL):

    step-00000040/
        rank-00.pt ... rank-NN.pt   one file per TP rank: its model shard, optimizer shard, data state
        manifest.json               written last: the commit marker, with sha256 and size of every file,
                                    the save's `seq` and the run's `origin` (see below)
    step-00000050.saving.json       only while step 50 is being saved: which run is saving it

A step directory without a manifest is an interrupted save and is never loaded. Each file is written
under a temporary name, fsynced and renamed (and on a local disk the directory is fsynced), so the
manifest never reaches the disk before the data it vouches for; on object stores, where rename is a
copy, the manifest written last is what makes the checkpoint exist. The fsyncs cost one flush of the
shard per save: the save returns when the data is on disk, not in the page cache.

Whose checkpoint is it. Every manifest records `seq`, one more than any save already in the directory
(a counter, so no clock has to agree across nodes), and `origin`, the `seq` of the first save of its
run. A run that resumes takes over the origin of the checkpoint it loaded; a fresh run (resume=false,
or nothing to resume) gets a new one. Then:
- `load_latest()` returns the newest *save* that is valid on every rank (highest `seq`), not the highest
  step: a fresh run in a reused directory, or a run whose timeline rewound after a corrupt checkpoint,
  resumes what it wrote last, never an older run's higher step.
- Pruning removes only this run's checkpoints beyond `keep_last` and never the one just written.
  Checkpoints of other runs are kept (a warning lists them once); a save at a step where another run's
  checkpoint sits replaces it, with a warning. Use an empty `checkpoint.dir` to keep them all.
- Debris: a save first writes its `step-N.saving.json` claim. A failed save removes its own directory
  at once; one that was killed leaves the claim, and the next good save of the same run removes that
  directory (or only its `.tmp` files, where a manifest was already there). Debris with another run's
  claim, or none, is left alone: it may be a live save of someone else.
- A manifest that is not the shape above (valid JSON lacking `files` or `meta`) is skipped with a warning.
- On resume, the trainer refuses a checkpoint whose `config_hash` differs from the run's (see
  `check_resume_config`) unless `checkpoint.allow_config_change` is set.

One run writes a directory at a time; two live runs sharing one are not supported.

Ranks: every rank writes its own file; rank 0 claims, writes the manifest and prunes. Each phase ends in a
collective that every rank enters whether or not its part failed, so a full disk on one rank fails the
save on all of them instead of leaving the others blocked. On resume the ranks walk rank 0's list of
candidates and agree (all-reduce of a flag) on the newest one valid for all of them, so one truncated
shard sends the whole group back to the previous checkpoint instead of loading a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from watchtower.validation import ConfigError, require

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d{8})$")
CLAIM = re.compile(r"step-(\d{8})\.saving\.json$")
MANIFEST = "manifest.json"
TMP = ".tmp"


@dataclass
class CheckpointConfig:
    """dir: where checkpoints go; empty means `<run.output_dir>/checkpoints`.
    interval_steps: save every N steps (0: only at the end of the run). Lower it when a lost
        replica-free restart would cost more than the save (the save blocks the step).
    keep_last: how many of this run's valid checkpoints to keep; older ones are deleted after a
        successful save. Other runs' checkpoints in the same dir are never deleted.
    resume: start from the newest valid checkpoint in `dir` when there is one.
    allow_config_change: resume even when the checkpoint's config_hash differs from this run's. Set it
        for a deliberate change that keeps the tensor shapes (lr, schedule, data); off, such a resume
        is refused so a wrong `dir` or a changed model is not silently trained on.
    """

    dir: str = ""
    interval_steps: int = 0
    keep_last: int = 3
    resume: bool = True
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        require(self.interval_steps >= 0, "interval_steps", self.interval_steps, "must be >= 0 (0: only at the end)")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")


def rank_file(rank: int) -> str:
    return f"rank-{rank:02d}.pt"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def claim_file(step: int) -> str:
    return f"{step_dir(step)}.saving.json"


def check_resume_config(url: str, step: int, meta: dict[str, Any], config_hash: str, allow: bool) -> None:
    """Refuse (ConfigError, exit 2 through the CLI) to resume a checkpoint saved under another config.

    >>> check_resume_config("ck", 20, {"config_hash": "abc"}, "abc", allow=False)
    """
    saved = meta.get("config_hash")
    if saved is None or saved == config_hash:
        return
    what = f"{step_dir(step)} was saved with config_hash {saved}, this run has {config_hash}"
    if allow:
        log.warning("resuming anyway (checkpoint.allow_config_change = true): %s", what)
        return
    raise ConfigError("checkpoint.dir", url, f"{what}; resume with the config it was saved with, set "
                      "checkpoint.allow_config_change = true to load it anyway, or use another checkpoint.dir")


def manifest_problem(manifest: Any) -> str | None:
    """Why a parsed manifest cannot be used (None when its shape is sound)."""
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and {"file", "sha256", "bytes"} <= e.keys() for e in files):
        return "manifest.json lacks a 'files' list of {file, sha256, bytes}"
    if not isinstance(manifest.get("meta"), dict):
        return "manifest.json lacks 'meta'"
    return None


def seq_of(record: dict[str, Any]) -> int:
    """A save's place in the directory's history; 0 for manifests written before `seq` existed."""
    seq = record.get("seq")
    return seq if isinstance(seq, int) else 0


@dataclass
class Scan:
    """What one listing of the directory found."""

    dirs: list[int] = field(default_factory=list)                 # every step directory
    commits: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> sound manifest
    broken: dict[int, str] = field(default_factory=dict)           # step -> why its manifest is unusable
    claims: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> claim of an unfinished save

    def next_seq(self) -> int:
        return 1 + max(map(seq_of, [*self.commits.values(), *self.claims.values()]), default=0)

    def newest_first(self) -> list[int]:
        return sorted(self.commits, key=lambda s: (seq_of(self.commits[s]), s), reverse=True)


class Checkpointer:
    """Saves and restores one TP group's state.

    `agree(flag)` returns the minimum of `flag` over the ranks that must agree (an all-reduce over the
    TP group; identity for a single rank); `gather(obj)` returns the list of every rank's `obj`.

    >>> ck = Checkpointer("memory://doc-example", 0, 1, keep_last=2, agree=lambda f: f, gather=lambda o: [o])
    >>> ck.save(10, {"w": torch.ones(2)}, {"run": "x"})
    >>> ck.load_latest()[0]
    10
    """

    def __init__(self, url: str, rank: int, world_size: int, keep_last: int,
                 agree: Callable[[bool], bool], gather: Callable[[Any], list[Any]]):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.agree, self.gather = agree, gather
        self.fs.makedirs(self.root, exist_ok=True)
        # A fresh run until load_latest() adopts the run of the checkpoint it loads. Only rank 0 uses it.
        self.origin = self._scan().next_seq() if rank == 0 else 0
        self._unusable: set[tuple[int, int]] = set()  # (step, seq) the group could not load on resume
        self._told_about_others = False

    # ---- files ------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _sync_dir(self, path: str) -> None:
        """Make renames and new entries in a local directory durable (object stores have none)."""
        if isinstance(self.fs, LocalFileSystem):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write, fsync, rename: a reader (or a power loss) sees the old file or the whole new one."""
        tmp = path + TMP
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                try:
                    fd = f.fileno()
                except (AttributeError, OSError):  # io.UnsupportedOperation: the close is the upload
                    fd = None
                if fd is not None:
                    f.flush()
                    os.fsync(fd)
            self.fs.mv(tmp, path)
        except OSError:
            with suppress(OSError):
                self.fs.rm(tmp)  # a full disk gets its space back now, not at the next save
            raise
        self._sync_dir(path.rsplit("/", 1)[0])

    def _read_json(self, path: str) -> tuple[Any, str | None]:
        """(parsed JSON, None), (None, None) when there is no file, (None, why) when it is unreadable."""
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read()), None
        except FileNotFoundError:
            return None, None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, f"{path.rsplit('/', 1)[-1]} is not valid JSON"

    def _scan(self) -> Scan:
        scan = Scan()
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if m := STEP_DIR.match(name):
                step = int(m.group(1))
                scan.dirs.append(step)
                manifest, unreadable = self._read_json(self._path(name, MANIFEST))
                problem = unreadable or (manifest_problem(manifest) if manifest is not None else None)
                if problem:
                    scan.broken[step] = problem
                elif manifest is not None:
                    scan.commits[step] = manifest
            elif m := CLAIM.match(name):
                claim, _ = self._read_json(self._path(name))
                if isinstance(claim, dict):
                    scan.claims[int(m.group(1))] = claim
        scan.dirs.sort(reverse=True)
        return scan

    def steps(self) -> list[int]:
        """Steps with a directory, newest first (valid or not)."""
        return self._scan().dirs

    # ---- saving -----------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write this rank's file; rank 0 commits the manifest. Raises OSError on every rank if any failed."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        directory = self._path(step_dir(step))
        seq = self._together(step, "claiming the directory", lambda: self._begin(step) if self.rank == 0 else 0)[0]

        def write() -> dict[str, Any]:
            self.fs.makedirs(directory, exist_ok=True)
            self._write_atomic(f"{directory}/{rank_file(self.rank)}", data)
            return {"file": rank_file(self.rank), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

        entries = self._together(step, "writing its file", write)
        manifest = {"step": step, "seq": seq, "origin": self.origin, "world_size": self.world_size,
                    "files": entries, "meta": meta}
        self._together(step, "writing the manifest",
                       lambda: self._commit(step, manifest) if self.rank == 0 else None)

    def _together(self, step: int, what: str, action: Callable[[], Any]) -> list[Any]:
        """Run this rank's part, then gather every rank's result; if any rank failed, all raise.

        A rank that raised alone would leave its peers blocked in the next collective forever."""
        result, error = None, None
        try:
            result = action()
        except OSError as err:
            error = err
        results = self.gather((error is None, result))
        failed = [r for r, (ok, _) in enumerate(results) if not ok]
        if failed:
            if self.rank == 0:
                with suppress(OSError):  # best effort: a full disk gets its space back now
                    self._sweep(self._scan())
            if error is not None:
                raise error
            raise OSError(f"checkpoint {step_dir(step)} not saved: rank {', '.join(map(str, failed))} "
                          f"failed {what}")
        return [r for _, r in results]

    def _begin(self, step: int) -> int:
        """Rank 0, before anyone writes: clear this run's debris, claim `step`, return its seq."""
        scan = self._scan()
        self._sweep(scan)
        self._tell_about_others(scan, step)
        seq = scan.next_seq()
        self._write_atomic(self._path(claim_file(step)),
                           json.dumps({"step": step, "seq": seq, "origin": self.origin}).encode())
        self.fs.makedirs(self._path(step_dir(step)), exist_ok=True)
        self._sync_dir(self.root)
        return seq

    def _commit(self, step: int, manifest: dict[str, Any]) -> None:
        self._write_atomic(self._path(step_dir(step), MANIFEST), json.dumps(manifest, indent=1).encode())
        try:
            self.fs.rm(self._path(claim_file(step)))
            self._prune(just_written=step)
        except OSError as err:  # the checkpoint is committed; tidying up can wait for the next save
            log.warning("checkpoint %s saved, but cleaning up after it failed: %s", step_dir(step), err)

    def _prune(self, just_written: int) -> None:
        """Delete this run's checkpoints beyond keep_last (newest saves first); never another run's.

        Saves the group found unusable when it resumed (a timeline that rewound past them) count last,
        so keep_last keeps loadable checkpoints rather than a newer corrupt one."""
        scan = self._scan()
        own = [s for s in scan.newest_first() if scan.commits[s].get("origin") == self.origin]
        own.sort(key=lambda s: (s, seq_of(scan.commits[s])) in self._unusable)  # stable: newest first within
        for old in own[self.keep_last:]:
            if old != just_written:
                self.fs.rm(self._path(step_dir(old)), recursive=True)

    def _sweep(self, scan: Scan) -> None:
        """Remove what this run's unfinished saves left behind (claims of this run's origin only).

        Where a manifest exists the directory is a checkpoint (maybe another run's, being replaced):
        only the `.tmp` files go; otherwise the whole directory."""
        for step, claim in scan.claims.items():
            if claim.get("origin") != self.origin:
                continue
            directory = self._path(step_dir(step))
            try:
                if step in scan.commits or step in scan.broken:
                    for name in self.fs.ls(directory, detail=False):
                        if name.endswith(TMP):
                            self.fs.rm(name)
                elif step in scan.dirs:
                    self.fs.rm(directory, recursive=True)
                self.fs.rm(self._path(claim_file(step)))
            except OSError as err:
                log.warning("could not clean up the interrupted save %s: %s", directory, err)

    def _tell_about_others(self, scan: Scan, step: int) -> None:
        """Warn once that other runs' checkpoints are here (kept), and whenever one is replaced."""
        others = sorted(s for s, m in scan.commits.items() if m.get("origin") != self.origin)
        if step in others:
            log.warning("replacing checkpoint %s of another run in %s", step_dir(step), self.root)
        if others and not self._told_about_others:
            self._told_about_others = True
            log.warning("%s holds %d checkpoint(s) of another run (steps %s): they are kept and never pruned "
                        "by this run; use an empty checkpoint.dir to avoid mixing runs",
                        self.root, len(others), ", ".join(map(str, others[:10])))

    # ---- loading ----------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[int, int]]:
        """(step, seq) of the commits, newest save first; warns about manifests that cannot be used."""
        scan = self._scan()
        for step, problem in sorted(scan.broken.items(), reverse=True):
            log.warning("checkpoint %s is skipped: %s", self._path(step_dir(step)), problem)
        return [(step, seq_of(scan.commits[step])) for step in scan.newest_first()]

    def _problem(self, step: int) -> tuple[str | None, bytes | None, dict[str, Any] | None]:
        """Why this rank cannot load `step` (None when it can), the verified bytes and the manifest."""
        manifest, unreadable = self._read_json(self._path(step_dir(step), MANIFEST))
        problem = unreadable or ("no manifest (interrupted save)" if manifest is None else manifest_problem(manifest))
        if problem:
            return problem, None, None
        if manifest.get("world_size") != self.world_size:
            return (f"saved with {manifest.get('world_size')} TP ranks, this run has {self.world_size}; "
                    "resume with the same --tp"), None, None
        entry = next((e for e in manifest["files"] if e["file"] == rank_file(self.rank)), None)
        if entry is None:
            return f"manifest lists no {rank_file(self.rank)}", None, None
        try:
            with self.fs.open(self._path(step_dir(step), entry["file"]), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return f"{entry['file']} is missing", None, None
        if len(data) != entry["bytes"]:
            return f"{entry['file']} is truncated ({len(data)} of {entry['bytes']} bytes)", None, None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{entry['file']} fails its sha256 check", None, None
        return None, data, manifest

    def load_latest(self) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, this rank's state, manifest meta) of the newest save valid on every rank.

        The run then continues the loaded checkpoint's run: its later saves prune that run's older ones."""
        order = self.gather(self._candidates() if self.rank == 0 else None)[0]  # one order for all ranks
        for step, seq in order:
            problem, data, manifest = self._problem(step)
            if not self.agree(problem is None):
                self._unusable.add((step, seq))
                if problem:
                    log.warning("checkpoint %s is unusable: %s; trying the previous one",
                                self._path(step_dir(step)), problem)
                continue
            if isinstance(manifest.get("origin"), int):
                self.origin = manifest["origin"]
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return step, state, manifest["meta"]
        return None
