"""Durable checkpoints through fsspec: atomic, checksummed, last K of this run kept, corrupt ones skipped.

Layout under `checkpoint.dir` (a local path or any fsspec URL):

    step-00000040/
        rank-00.pt ... rank-NN.pt   one file per TP rank: its model shard, optimizer shard, data state
        manifest.json               written last: the commit marker, with sha256 and size of every file,
                                    the save's `seq` and the run's `origin` (see below)
    step-00000040.s7/               a later save of step 40 (seq 7), made while step-00000040/ existed
    step-00000050.saving.json       only while step 50 is being saved: which run is saving it, and where

A step directory without a manifest is an interrupted save and is never loaded. Each file is written
under a temporary name, fsynced and renamed (and on a local disk the directory is fsynced), so the
manifest never reaches the disk before the data it vouches for; on object stores, where rename is a
copy, the manifest written last is what makes the checkpoint exist. The fsyncs cost one flush of the
shard per save: the save returns when the data is on disk, not in the page cache.

A save never writes into a directory that exists. Saving a step that already has a directory (this
run's own checkpoint of it, saved again after a resume; another run's; debris) goes to a directory of
its own, `step-N.s<seq>/`, so the previous checkpoint stays whole and loadable until the new manifest
commits; only then does pruning retire this run's older save of the same step. Nothing is renamed, so
this costs the same on an object store (where renaming a directory means copying every shard) as on
a local disk.

Whose checkpoint is it. Every manifest records `seq`, one more than any save already in the directory
(a counter, so no clock has to agree across nodes), and `origin`, the `seq` of the first save of its
run. A run that resumes takes over the origin of the checkpoint it loaded; a fresh run (resume=false,
or nothing to resume) gets a new one. Then:
- `load_latest()` returns the newest *save* that is valid on every rank (highest `seq`), not the highest
  step: a fresh run in a reused directory, or a run whose timeline rewound after a corrupt checkpoint,
  resumes what it wrote last, never an older run's higher step.
- Pruning removes only this run's checkpoints beyond `keep_last` (and its older saves of a step it
  saved again), never the one just written. Checkpoints of other runs are kept, at the same step too
  (a warning lists them once). Use an empty `checkpoint.dir` to keep runs apart.
- Debris: a save first writes its `<directory>.saving.json` claim. A failed save removes its own
  directory at once; one that was killed leaves the claim, and the next good save of the same run
  removes that directory (or only its `.tmp` files, where a manifest was already there). Debris with
  another run's claim, or none, is left alone: it may be a live save of someone else.
- A manifest that is not the shape above (valid JSON lacking `files`, `world_size` or `meta`) is
  skipped with a warning.
- Resuming another configuration is a refusal (`ConfigError`, exit 2), never "corruption, try the
  previous one": the newest save is judged on its manifest before any shard is read. Another
  `train.tp` (the shards do not fit) is always refused; another `config_hash` unless
  `checkpoint.allow_config_change` is set. `check_resume_config` makes the same judgement read-only,
  before anything starts (`watchtower train` and `watchtower supervise` call it).

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
from fsspec.implementations.local import LocalFileSystem

from watchtower.validation import ConfigError, require

# No torch at import: `check_resume_config` runs in processes that start no model (the TP launcher,
# `watchtower supervise`), where it cost ~4 s. Only a rank's save and load (de)serialize tensors,
# and they import it where they do (a dict lookup once a rank has it).

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d{8})(?:\.s\d+)?$")  # step-00000040, or a later save of it: step-00000040.s7
CLAIM = re.compile(r"(step-\d{8}(?:\.s\d+)?)\.saving\.json$")
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


def step_dir(step: int, seq: int | None = None) -> str:
    """`step-00000040`; with `seq`, the directory of a later save of that step (`step-00000040.s7`)."""
    return f"step-{step:08d}" if seq is None else f"step-{step:08d}.s{seq}"


def step_of(name: str) -> int:
    return int(name[5:13])


def claim_file(name: str) -> str:
    return f"{name}.saving.json"


def hash_differs(manifest: dict[str, Any], config_hash: str | None) -> str | None:
    """The saved config_hash when it is not this run's (None when equal or not recorded)."""
    saved = manifest["meta"].get("config_hash")
    return None if config_hash is None or saved is None or saved == config_hash else saved


def resume_refusal(url: str, name: str, manifest: dict[str, Any], world_size: int, config_hash: str | None,
                   allow: bool) -> ConfigError | None:
    """Why this run must not resume the checkpoint `name` (a sound manifest): None when it may.

    Another TP size first (its shards cannot be loaded, allowed or not), then another config_hash.

    >>> m = {"world_size": 2, "meta": {"config_hash": "abc"}, "files": []}
    >>> resume_refusal("ck", "step-00000020", m, 2, "abc", allow=False) is None
    True
    >>> resume_refusal("ck", "step-00000020", m, 1, "abc", allow=True).field  # TP: refused, allowed or not
    'train.tp'
    """
    saved_tp = manifest["world_size"]
    if saved_tp != world_size:
        return ConfigError("train.tp", world_size, f"checkpoint {name} in {url} was saved with train.tp = {saved_tp} "
                           f"(one shard per TP rank): resume with --tp {saved_tp} (train.tp = {saved_tp}), or give "
                           "another checkpoint.dir")
    saved = hash_differs(manifest, config_hash)
    if saved is None or allow:
        return None
    return ConfigError("checkpoint.dir", url, f"{name} was saved with config_hash {saved}, this run has {config_hash}; "
                       "resume with the config it was saved with, set checkpoint.allow_config_change = true to load "
                       "it anyway, or use another checkpoint.dir")


def check_resume_config(url: str, world_size: int, config_hash: str, allow: bool) -> None:
    """Refuse, before anything starts, the resume `Checkpointer.load_latest` would refuse (ConfigError).

    A read-only look at the newest save's manifest: nothing is created, no shard is read (one listing
    and one small read per step directory, with fsspec and json: no torch call). A directory that does
    not exist yet has nothing to resume.

    >>> check_resume_config("memory://no-such-checkpoints", 1, "abc", allow=False)
    """
    try:
        fs, root = fsspec.core.url_to_fs(url)
        scan = scan_directory(fs, root) if fs.isdir(root) else Scan()
    except OSError as err:
        raise ConfigError("checkpoint.dir", url, f"cannot be read to check what it would resume: {err}") from None
    newest = scan.newest_first()
    if newest and (refusal := resume_refusal(url, newest[0], scan.commits[newest[0]], world_size, config_hash, allow)):
        raise refusal


def manifest_problem(manifest: Any) -> str | None:
    """Why a parsed manifest cannot be used (None when its shape is sound)."""
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and {"file", "sha256", "bytes"} <= e.keys() for e in files):
        return "manifest.json lacks a 'files' list of {file, sha256, bytes}"
    if not isinstance(manifest.get("world_size"), int):
        return "manifest.json lacks 'world_size'"
    if not isinstance(manifest.get("meta"), dict):
        return "manifest.json lacks 'meta'"
    return None


def seq_of(record: dict[str, Any]) -> int:
    """A save's place in the directory's history; 0 for manifests written before `seq` existed."""
    seq = record.get("seq")
    return seq if isinstance(seq, int) else 0


@dataclass
class Scan:
    """What one listing of the directory found, by step directory name (`step-00000040[.s7]`)."""

    dirs: list[str] = field(default_factory=list)                     # every step directory
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sound manifest
    broken: dict[str, str] = field(default_factory=dict)              # name -> why its manifest is unusable
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> claim of an unfinished save

    def next_seq(self) -> int:
        return 1 + max(map(seq_of, [*self.commits.values(), *self.claims.values()]), default=0)

    def newest_first(self) -> list[str]:
        return sorted(self.commits, key=lambda n: (seq_of(self.commits[n]), step_of(n)), reverse=True)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> tuple[Any, str | None]:
    """(parsed JSON, None), (None, None) when there is no file, (None, why) when it is unreadable."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read()), None
    except FileNotFoundError:
        return None, None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{path.rsplit('/', 1)[-1]} is not valid JSON"


def scan_directory(fs: fsspec.AbstractFileSystem, root: str) -> Scan:
    """List `root` and read every step directory's manifest and every claim (small files only)."""
    scan = Scan()
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        path = f"{root.rstrip('/')}/{name}"
        if STEP_DIR.match(name):
            scan.dirs.append(name)
            manifest, unreadable = read_json(fs, f"{path}/{MANIFEST}")
            problem = unreadable or (manifest_problem(manifest) if manifest is not None else None)
            if problem:
                scan.broken[name] = problem
            elif manifest is not None:
                scan.commits[name] = manifest
        elif m := CLAIM.match(name):
            claim, _ = read_json(fs, path)
            if isinstance(claim, dict):
                scan.claims[m.group(1)] = claim
    scan.dirs.sort(key=lambda n: (step_of(n), n), reverse=True)
    return scan


class Checkpointer:
    """Saves and restores one TP group's state.

    `agree(flag)` returns the minimum of `flag` over the ranks that must agree (an all-reduce over the
    TP group; identity for a single rank); `gather(obj)` returns the list of every rank's `obj`.

    >>> ck = Checkpointer("memory://doc-example", 0, 1, keep_last=2, agree=lambda f: f, gather=lambda o: [o])
    >>> import torch
    >>> ck.save(10, {"w": torch.ones(2)}, {"run": "x"})
    >>> ck.load_latest()[0]
    10
    """

    def __init__(self, url: str, rank: int, world_size: int, keep_last: int,
                 agree: Callable[[bool], bool], gather: Callable[[Any], list[Any]]):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.agree, self.gather = agree, gather
        self.fs.makedirs(self.root, exist_ok=True)
        # A fresh run until load_latest() adopts the run of the checkpoint it loads. Only rank 0 uses it.
        self.origin = self._scan().next_seq() if rank == 0 else 0
        self._unusable: set[tuple[str, int]] = set()  # (directory, seq) the group could not load on resume
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

    def _scan(self) -> Scan:
        return scan_directory(self.fs, self.root)

    def steps(self) -> list[int]:
        """Steps with a directory, highest first (valid or not; a step twice where two saves of it exist)."""
        return [step_of(name) for name in self._scan().dirs]

    # ---- saving -----------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write this rank's file; rank 0 commits the manifest. Raises OSError on every rank if any failed."""
        import torch  # here, not at the top: see the imports

        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        seq, name = self._together(step, "claiming the directory",
                                   lambda: self._begin(step) if self.rank == 0 else None)[0]
        directory = self._path(name)

        def write() -> dict[str, Any]:
            self.fs.makedirs(directory, exist_ok=True)
            self._write_atomic(f"{directory}/{rank_file(self.rank)}", data)
            return {"file": rank_file(self.rank), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

        entries = self._together(step, "writing its file", write)
        manifest = {"step": step, "seq": seq, "origin": self.origin, "world_size": self.world_size,
                    "files": entries, "meta": meta}
        self._together(step, "writing the manifest",
                       lambda: self._commit(name, manifest) if self.rank == 0 else None)

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

    def _begin(self, step: int) -> tuple[int, str]:
        """Rank 0, before anyone writes: clear this run's debris, claim a directory that does not exist
        yet for `step`, return the save's (seq, directory name)."""
        scan = self._scan()
        self._sweep(scan)
        self._tell_about_others(scan)
        seq = scan.next_seq()
        name = step_dir(step)
        if self.fs.exists(self._path(name)):  # a checkpoint of this step (ours or another run's), or debris:
            name = step_dir(step, seq)          # never written into; it stays whole until this save commits
            log.info("%s exists: this save of step %d goes to %s", step_dir(step), step, name)
        self._write_atomic(self._path(claim_file(name)),
                           json.dumps({"step": step, "seq": seq, "origin": self.origin, "dir": name}).encode())
        self.fs.makedirs(self._path(name), exist_ok=True)
        self._sync_dir(self.root)
        return seq, name

    def _commit(self, name: str, manifest: dict[str, Any]) -> None:
        self._write_atomic(self._path(name, MANIFEST), json.dumps(manifest, indent=1).encode())
        try:
            self.fs.rm(self._path(claim_file(name)))
            self._prune(just_written=name)
        except OSError as err:  # the checkpoint is committed; tidying up can wait for the next save
            log.warning("checkpoint %s saved, but cleaning up after it failed: %s", name, err)

    def _prune(self, just_written: str) -> None:
        """Delete this run's checkpoints beyond keep_last (newest saves first) and its older saves of a
        step it has saved again; never another run's, never the one just written.

        Saves the group found unusable when it resumed (a timeline that rewound past them) count last,
        so keep_last keeps loadable checkpoints rather than a newer corrupt one."""
        scan = self._scan()
        own = [n for n in scan.newest_first() if scan.commits[n].get("origin") == self.origin]
        own.sort(key=lambda n: (n, seq_of(scan.commits[n])) in self._unusable)  # stable: newest first within
        kept, steps_seen = 0, set()
        for name in own:
            superseded = step_of(name) in steps_seen  # a newer save of the same step is kept instead
            steps_seen.add(step_of(name))
            if name == just_written or not (superseded or kept >= self.keep_last):
                kept += 1
            else:
                self.fs.rm(self._path(name), recursive=True)

    def _sweep(self, scan: Scan) -> None:
        """Remove what this run's unfinished saves left behind (claims of this run's origin only).

        Where a manifest exists the directory is a checkpoint (the save was killed after committing):
        only the `.tmp` files go; otherwise the whole directory."""
        for name, claim in scan.claims.items():
            if claim.get("origin") != self.origin:
                continue
            directory = self._path(name)
            try:
                if name in scan.commits or name in scan.broken:
                    for entry in self.fs.ls(directory, detail=False):
                        if entry.endswith(TMP):
                            self.fs.rm(entry)
                elif name in scan.dirs:
                    self.fs.rm(directory, recursive=True)
                self.fs.rm(self._path(claim_file(name)))
            except OSError as err:
                log.warning("could not clean up the interrupted save %s: %s", directory, err)

    def _tell_about_others(self, scan: Scan) -> None:
        """Warn once that other runs' checkpoints are here: they are kept, at this run's steps too."""
        others = sorted(step_of(n) for n, m in scan.commits.items() if m.get("origin") != self.origin)
        if others and not self._told_about_others:
            self._told_about_others = True
            log.warning("%s holds %d checkpoint(s) of another run (steps %s): they are kept and never pruned or "
                        "overwritten by this run; use an empty checkpoint.dir to avoid mixing runs",
                        self.root, len(others), ", ".join(map(str, others[:10])))

    # ---- loading ----------------------------------------------------------------------------

    def _candidates(self, config_hash: str | None, allow: bool) -> list[tuple[str, int, tuple | None]]:
        """(directory, seq, refusal) of the commits, newest save first; refusal is the ConfigError's
        (field, value, allowed) when this run must not resume it. Warns about unusable manifests."""
        scan = self._scan()
        for name, problem in sorted(scan.broken.items(), reverse=True):
            log.warning("checkpoint %s is skipped: %s", self._path(name), problem)
        out = []
        for name in scan.newest_first():
            refusal = resume_refusal(self.url, name, scan.commits[name], self.world_size, config_hash, allow)
            out.append((name, seq_of(scan.commits[name]),
                        None if refusal is None else (refusal.field, refusal.value, refusal.allowed)))
        return out

    def _problem(self, name: str) -> tuple[str | None, bytes | None, dict[str, Any] | None]:
        """Why this rank cannot load `name` (None when it can), the verified bytes and the manifest."""
        manifest, unreadable = read_json(self.fs, self._path(name, MANIFEST))
        problem = unreadable or ("no manifest (interrupted save)" if manifest is None else manifest_problem(manifest))
        if problem:
            return problem, None, None
        entry = next((e for e in manifest["files"] if e["file"] == rank_file(self.rank)), None)
        if entry is None:
            return f"manifest lists no {rank_file(self.rank)}", None, None
        try:
            with self.fs.open(self._path(name, entry["file"]), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return f"{entry['file']} is missing", None, None
        if len(data) != entry["bytes"]:
            return f"{entry['file']} is truncated ({len(data)} of {entry['bytes']} bytes)", None, None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{entry['file']} fails its sha256 check", None, None
        return None, data, manifest

    def load_latest(self, config_hash: str | None = None,
                    allow_config_change: bool = False) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, this rank's state, manifest meta) of the newest save valid on every rank.

        Raises ConfigError on every rank when the save it reaches belongs to another configuration
        (see `resume_refusal`; `config_hash=None` compares only the TP size): judged from rank 0's
        manifest, before any shard is read, so a refused resume is never taken for corruption.
        The run then continues the loaded checkpoint's run: its later saves prune that run's older ones."""
        order = self.gather(self._candidates(config_hash, allow_config_change) if self.rank == 0 else None)[0]
        for name, seq, refusal in order:  # one order and one verdict per save for all ranks
            if refusal is not None:
                raise ConfigError(*refusal)
            problem, data, manifest = self._problem(name)
            if not self.agree(problem is None):
                self._unusable.add((name, seq))
                if problem:
                    log.warning("checkpoint %s is unusable: %s; trying the previous one", self._path(name), problem)
                continue
            if saved := hash_differs(manifest, config_hash):
                log.warning("resuming anyway (checkpoint.allow_config_change = true): %s was saved with "
                            "config_hash %s, this run has %s", name, saved, config_hash)
            if isinstance(manifest.get("origin"), int):
                self.origin = manifest["origin"]
            import torch  # here, not at the top: see the imports

            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return step_of(name), state, manifest["meta"]
        return None
