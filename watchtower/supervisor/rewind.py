"""The shell's side of a rewind: set the later checkpoints aside, so the restart loads an earlier one.

A checkpoint directory holds `step-NNNNNNNN/` (and later saves `step-NNNNNNNN.sK/`, claims
`step-NNNNNNNN....saving.json`; names from watchtower/trainer/checkpoint.py, not imported: the
supervisor imports no trainer module, tests/test_supervisor_shell.py). Every entry of a step after the
rewind's target is moved, not deleted, under `rewound-<n>/` in the same directory: a trainer resumes only from top-level `step-*` entries,
and a person can still look at the weights that spiked. Works on any fsspec URL the trainer can
write to. Cost: one listing and one move per entry: a rename on a local or shared filesystem, but a
copy of every shard on an object store, done in the supervisor's loop (minutes for a large model,
during which it neither detects nor pages).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import fsspec

from watchtower.atomic_write import write_atomic
from watchtower.step_ranges import parse_step_range
from watchtower.validation import ConfigError

STEP_ENTRY = re.compile(r"^step-(\d{8})\b")
RECORD_FILE = "remediation.json"


@dataclass(frozen=True)
class RewindRecord:
    """What the rewinds of this run did, kept in `<output_dir>/remediation.json` so a supervisor
    restarted on the same directory (a graceful stop, a Slurm requeue, a crash) goes on with it: the
    skip ranges every later launch carries (else a resume from a checkpoint before a skip read the
    poison again) and the rewinds spent (`max_rewinds` is per run, not per supervisor process).
    Tied to its run by the job name and the checkpoint URL it rewound in: a new run in the same output
    dir (another checkpoint.dir, or the old checkpoints deleted to start over) is refused at start
    rather than silently skipping its clean data with its rewinds already spent (`load`). Written,
    durably, before any group is killed, with the rewind `pending` (its spike, its target step, its
    window); rewritten without it once the later checkpoints are set aside and checked. A record still
    pending at start (a supervisor killed mid-move, or a rewind that failed: exit 6) is finished if
    the newest committed checkpoint is at or before its target (the moves were done, by it or by a
    person), else refused in one line naming the entries to move: the start does not move them itself,
    as it cannot know that no rank of the earlier run is still writing, nor that the failure's cause (a
    full disk) is gone. Delete the file to start the count over. Cost: two small writes and four fsyncs
    per rewind, one read and one checkpoint listing at start.

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> RewindRecord("j", "ckpt").add("120-124").save(out)
    >>> RewindRecord.read(out)
    RewindRecord(job='j', checkpoint_url='ckpt', skip_steps=('120-124',), rewinds=1, pending=None)
    """

    job: str = ""
    checkpoint_url: str = ""
    skip_steps: tuple[str, ...] = ()
    rewinds: int = 0
    pending: Pending | None = None  # the last rewind, written before its kills and not yet done

    def add(self, window: str, pending: Pending | None = None) -> RewindRecord:
        return replace(self, skip_steps=(*self.skip_steps, window), rewinds=self.rewinds + 1, pending=pending)

    def save(self, out: Path) -> None:
        """Durable (fsync of the file and its directory): after a node crash an empty file would be
        refused, and its advised fix (delete it) would forget the skip that keeps the poison unread."""
        data = {"job": self.job, "checkpoint_url": self.checkpoint_url, "skip_steps": list(self.skip_steps),
                "rewinds": self.rewinds}
        if self.pending is not None:
            data["pending"] = asdict(self.pending)
        write_atomic(Path(out) / RECORD_FILE, json.dumps(data) + "\n", durable=True)

    @classmethod
    def read(cls, out: Path, job: str = "", checkpoint_url: str = "") -> RewindRecord | None:
        """The record as written, each skip range checked (a ConfigError naming the file); None: no file.
        `job`, `checkpoint_url`: this job's, named in the fix for a record of the first format (no job
        nor URL), whose skip must be kept, not deleted."""
        path = Path(out) / RECORD_FILE
        if not path.exists():
            return None
        data: Any = None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data["skip_steps"], list) or not isinstance(data["rewinds"], int):
                raise TypeError("skip_steps must be a list, rewinds an integer")
            pending = data.get("pending")
            record = cls(str(data["job"]), str(data["checkpoint_url"]), tuple(str(s) for s in data["skip_steps"]),
                         data["rewinds"], None if pending is None else Pending(int(pending["spike_step"]),
                                                                              int(pending["to_step"]),
                                                                              str(pending["window"])))
            for i, window in enumerate(record.skip_steps):
                parse_step_range(window, f"skip_steps[{i}]")
        except (OSError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, KeyError) and err.args[0] in ("job", "checkpoint_url") and "skip_steps" in data:
                raise ConfigError(str(path), f"no {err.args[0]!r}", "written before records named their run: "
                                  f'add "job": {json.dumps(job)}, "checkpoint_url": {json.dumps(checkpoint_url)} '
                                  "(this job's values) to keep its skips and rewinds") from None
            what = f"no {err.args[0]!r}" if isinstance(err, KeyError) else type(err).__name__
            raise ConfigError(str(path), what, 'must be {"job": ..., "checkpoint_url": ..., '
                              '"skip_steps": ["FIRST-LAST", ...], "rewinds": N} as a rewind wrote it; delete it to '
                              "forget this run's rewinds") from None
        return record

    @classmethod
    def load(cls, out: Path, job: str, checkpoint_url: str) -> RewindRecord:
        """This run's record (an empty one if none): a record of another job, another checkpoint URL, or
        with no committed checkpoint left to resume from (a rewind always leaves the one it loaded, so
        the run it belongs to is gone) is refused with a ConfigError naming the file and the fix; so is
        a pending rewind not done yet (`finish_pending`)."""
        record = cls.read(out, job, checkpoint_url)
        if record is None:
            return cls(job, checkpoint_url)
        mine = record.job == job and record.checkpoint_url == checkpoint_url
        try:
            steps = committed_steps(checkpoint_url) if mine else ()
        except OSError as err:
            raise ConfigError("checkpoint.dir", checkpoint_url, f"cannot be listed ({err}) to check {out}/"
                              f"{RECORD_FILE} against it: fix its permissions or mount, then start again") from None
        if not mine or not steps:
            whose = (f"job {record.job!r}, checkpoints {record.checkpoint_url}" if not mine
                     else f"checkpoints {checkpoint_url}, which now hold no committed checkpoint")
            raise ConfigError(str(Path(out) / RECORD_FILE),
                              f"{record.rewinds} rewind(s), skips {list(record.skip_steps)}",
                              f"belongs to another run ({whose}); this is job {job!r} with checkpoints "
                              f"{checkpoint_url}: delete the file (or move it away) to start this run without "
                              "them, or point checkpoint.dir back at that run's checkpoints")
        return record.finish_pending(out, steps)

    def finish_pending(self, out: Path, steps: tuple[int, ...]) -> RewindRecord:
        """A pending rewind whose later checkpoints are all set aside (`steps`: the committed ones now) is
        done: rewritten without it. One still short of that is refused: a start would resume past the
        spike with its skip behind it. The fix names every entry to move and keeps the skip."""
        p = self.pending
        if p is None:
            return self
        if steps[-1] <= p.to_step:
            done = replace(self, pending=None)
            try:
                done.save(out)
            except OSError as err:
                raise ConfigError(str(Path(out) / RECORD_FILE), f"rewind pending: spike at step {p.spike_step}",
                                  f"done, but could not be marked so ({err}): free space or fix the permissions "
                                  "of the job's output_dir, then start again") from None
            return done
        raise ConfigError(str(Path(out) / RECORD_FILE), f"rewind pending: spike at step {p.spike_step}, skip "
                          f"{p.window}", "never finished (its supervisor was killed mid-rewind, or it failed: exit "
                          f"6), so this start would resume from step {steps[-1]}, past the spike, with the skip "
                          f"behind it: {pending_fix(self.checkpoint_url, p)}")


def pending_fix(url: str, p: Pending) -> str:
    """What a person does about a pending rewind (said at start and in the `rewind_failed` event): set
    aside every entry after its target, or, with no committed checkpoint at or before it, give up the
    skip. One or two listings."""
    steps = committed_steps(url)
    if not any(s <= p.to_step for s in steps):
        return (f"no committed checkpoint at or before step {p.to_step} is left in {url} to rewind to: delete "
                f"remediation.json to resume from {f'step {steps[-1]}' if steps else 'step 0'} without the skip "
                f"{p.window} (the spike may come back)")
    return (f"move {', '.join(later_entries(url, p.to_step))} out of {url} (e.g. into a rewound-N/ folder "
            f"there) so the newest committed checkpoint is at or before step {p.to_step}, then start again (the "
            f"skip {p.window} is kept); or delete remediation.json to resume from step {steps[-1]} without it")


@dataclass(frozen=True)
class Pending:
    """A rewind written to remediation.json before its kills, not done yet: the spike, the newest step
    it may load, the data window it skips."""

    spike_step: int
    to_step: int
    window: str



def _names(fs, root: str) -> list[str]:
    """The entry names directly under `root` (one listing; none if it does not exist). A listing, not a
    glob: a root holding glob characters (`runs/exp[1]`) must not match nothing."""
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []


def committed_steps(url: str) -> tuple[int, ...]:
    """The steps of the committed checkpoints under `url` (a `step-N[.sK]/` holding its manifest, the
    commit marker), sorted, each once: what a restart can load. One listing, then one existence check
    per step entry.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name, done in (("step-00000100", True), ("step-00000100.s3", True), ("step-00000120", False)):
    ...     (root / name).mkdir(); _ = done and (root / name / "manifest.json").write_text("{}")
    >>> committed_steps(str(root)), committed_steps(str(root / "none"))
    ((100,), ())
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    steps = {int(m.group(1)) for name in _names(fs, root)
             if (m := STEP_ENTRY.match(name)) and fs.exists(f"{root}/{name}/manifest.json")}
    return tuple(sorted(steps))


def later_entries(url: str, after_step: int) -> list[str]:
    """The top-level entries of a step > `after_step` under `url` (checkpoints, partial saves, claims),
    oldest first: what a rewind to `after_step` sets aside. One listing."""
    fs, root = fsspec.core.url_to_fs(url)
    return [n for n in _names(fs, root.rstrip("/")) if (m := STEP_ENTRY.match(n)) and int(m.group(1)) > after_step]


def retire_checkpoints(url: str, after_step: int) -> tuple[str, list[str]]:
    """Move every entry of a step > `after_step` under `url`/rewound-<n>/; (that folder, the names moved).
    Newest first, and all or nothing: a move that fails puts back the ones already moved (then
    raises), so no failure leaves a gap below a checkpoint past the spike.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("step-00000100", "step-00000120", "step-00000140.s2", "step-00000140.s3.saving.json"):
    ...     (root / name).mkdir()
    >>> folder, moved = retire_checkpoints(str(root), 110)
    >>> folder.endswith("rewound-1"), moved, sorted(p.name for p in root.iterdir())
    (True, ['step-00000140.s3.saving.json', 'step-00000140.s2', 'step-00000120'], ['rewound-1', 'step-00000100'])
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    names = _names(fs, root)
    taken = {n for n in names if n.startswith("rewound-")}
    folder = next(f"{root}/rewound-{i}" for i in range(1, len(taken) + 2) if f"rewound-{i}" not in taken)
    later = [n for n in reversed(names) if (m := STEP_ENTRY.match(n)) and int(m.group(1)) > after_step]
    if later:
        fs.makedirs(folder, exist_ok=True)
    moved: list[str] = []
    try:
        for name in later:
            fs.mv(f"{root}/{name}", f"{folder}/{name}", recursive=True)
            moved.append(name)
    except Exception as err:
        kept = restore_checkpoints(url, folder, moved)
        if kept:
            err.args = (f"{err}; {kept_words(folder, kept)}",)
        raise
    return folder, moved


def restore_checkpoints(url: str, folder: str, names: list[str]) -> list[str]:
    """Undo `retire_checkpoints`: move `names` back from `folder` (oldest first), then drop the folder
    if it is empty; the names kept in `folder` because their name exists again at the top (a late save
    re-created it: a move onto it would nest the checkpoint inside it locally, or merge the two saves
    key by key on an object store). Nothing is merged or deleted. Raises on the first move that fails
    (the rest stay in `folder`, said by the caller). Cost: one existence check per name."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    kept = []
    for name in reversed(names):
        if fs.exists(f"{root}/{name}"):
            kept.append(name)
            continue
        fs.mv(f"{folder}/{name}", f"{root}/{name}", recursive=True)
    if fs.exists(folder) and not fs.ls(folder, detail=False):
        fs.rmdir(folder)
    return kept


def kept_words(folder: str, kept: list[str]) -> str:
    """What an undo says of the entries it left in `folder`."""
    return f"{', '.join(kept)} kept in {folder}: a save re-created the name, so it was not moved back onto it"
