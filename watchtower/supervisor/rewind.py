"""The shell's side of a rewind: set the later checkpoints aside, so the restart loads an earlier one.

A checkpoint directory holds `step-NNNNNNNN/` (and later saves `step-NNNNNNNN.sK/`, claims
`step-NNNNNNNN....saving.json`; names from watchtower/trainer/checkpoint.py, which imports torch and
so is not imported here). Every entry of a step after the rewind's target is moved, not deleted,
under `rewound-<n>/` in the same directory: a trainer resumes only from top-level `step-*` entries,
and a person can still look at the weights that spiked. Works on any fsspec URL the trainer can
write to. Cost: one listing and one move per entry: a rename on a local or shared filesystem, but a
copy of every shard on an object store, done in the supervisor's loop (minutes for a large model,
during which it neither detects nor pages).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

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
    durably, before any group is killed; delete the file to start the count over. Cost: one small
    write and two fsyncs per rewind, one read and one checkpoint listing at start.

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> RewindRecord("j", "ckpt").add("120-124").save(out)
    >>> RewindRecord.read(out)
    RewindRecord(job='j', checkpoint_url='ckpt', skip_steps=('120-124',), rewinds=1)
    """

    job: str = ""
    checkpoint_url: str = ""
    skip_steps: tuple[str, ...] = ()
    rewinds: int = 0

    def add(self, window: str) -> RewindRecord:
        return replace(self, skip_steps=(*self.skip_steps, window), rewinds=self.rewinds + 1)

    def save(self, out: Path) -> None:
        """Durable (fsync of the file and its directory): after a node crash an empty file would be
        refused, and its advised fix (delete it) would forget the skip that keeps the poison unread."""
        write_atomic(Path(out) / RECORD_FILE, json.dumps({"job": self.job, "checkpoint_url": self.checkpoint_url,
                                                          "skip_steps": list(self.skip_steps),
                                                          "rewinds": self.rewinds}) + "\n", durable=True)

    @classmethod
    def read(cls, out: Path) -> RewindRecord | None:
        """The record as written, each skip range checked (a ConfigError naming the file); None: no file."""
        path = Path(out) / RECORD_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data["skip_steps"], list) or not isinstance(data["rewinds"], int):
                raise TypeError("skip_steps must be a list, rewinds an integer")
            record = cls(str(data["job"]), str(data["checkpoint_url"]), tuple(str(s) for s in data["skip_steps"]),
                         data["rewinds"])
            for i, window in enumerate(record.skip_steps):
                parse_step_range(window, f"skip_steps[{i}]")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(str(path), type(err).__name__, 'must be {"job": ..., "checkpoint_url": ..., '
                              '"skip_steps": ["FIRST-LAST", ...], "rewinds": N} as a rewind wrote it; delete it to '
                              "forget this run's rewinds") from None
        return record

    @classmethod
    def load(cls, out: Path, job: str, checkpoint_url: str) -> RewindRecord:
        """This run's record (an empty one if none): a record of another job, another checkpoint URL, or
        with no committed checkpoint left to resume from (a rewind always leaves the one it loaded, so
        the run it belongs to is gone) is refused with a ConfigError naming the file and the fix."""
        record = cls.read(out)
        if record is None:
            return cls(job, checkpoint_url)
        mine = record.job == job and record.checkpoint_url == checkpoint_url
        if not mine or not committed_steps(checkpoint_url):
            whose = (f"job {record.job!r}, checkpoints {record.checkpoint_url}" if not mine
                     else f"checkpoints {checkpoint_url}, which now hold no committed checkpoint")
            raise ConfigError(str(Path(out) / RECORD_FILE),
                              f"{record.rewinds} rewind(s), skips {list(record.skip_steps)}",
                              f"belongs to another run ({whose}); this is job {job!r} with checkpoints "
                              f"{checkpoint_url}: delete the file (or move it away) to start this run without "
                              "them, or point checkpoint.dir back at that run's checkpoints")
        return record


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
    except Exception:
        restore_checkpoints(url, folder, moved)
        raise
    return folder, moved


def restore_checkpoints(url: str, folder: str, names: list[str]) -> None:
    """Undo `retire_checkpoints`: move `names` back from `folder` (oldest first), then drop the folder
    if it is empty. Raises on the first move that fails (the rest stay in `folder`, said by the caller)."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    for name in reversed(names):
        fs.mv(f"{folder}/{name}", f"{root}/{name}", recursive=True)
    if fs.exists(folder) and not fs.ls(folder, detail=False):
        fs.rmdir(folder)
