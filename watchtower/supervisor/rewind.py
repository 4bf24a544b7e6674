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
from dataclasses import dataclass
from pathlib import Path

import fsspec

from watchtower.atomic_write import write_atomic
from watchtower.validation import ConfigError

STEP_ENTRY = re.compile(r"^step-(\d{8})\b")
RECORD_FILE = "remediation.json"


@dataclass(frozen=True)
class RewindRecord:
    """What the rewinds of this run did, kept in `<output_dir>/remediation.json` so a supervisor
    restarted on the same directory (a graceful stop, a Slurm requeue, a crash) goes on with it: the
    skip ranges every later launch carries (else a resume from a checkpoint before a skip read the
    poison again) and the rewinds spent (`max_rewinds` is per run, not per supervisor process).
    Written before the checkpoints are moved; delete the file to start the count over. Cost: one small
    atomic write per rewind, one read at start.

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> RewindRecord().add("120-124").save(out)
    >>> RewindRecord.load(out)
    RewindRecord(skip_steps=('120-124',), rewinds=1)
    """

    skip_steps: tuple[str, ...] = ()
    rewinds: int = 0

    def add(self, window: str) -> RewindRecord:
        return RewindRecord((*self.skip_steps, window), self.rewinds + 1)

    def save(self, out: Path) -> None:
        write_atomic(Path(out) / RECORD_FILE, json.dumps({"skip_steps": list(self.skip_steps),
                                                          "rewinds": self.rewinds}) + "\n")

    @classmethod
    def load(cls, out: Path) -> RewindRecord:
        path = Path(out) / RECORD_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            record = cls(tuple(str(s) for s in data["skip_steps"]), int(data["rewinds"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(str(path), type(err).__name__, 'must be {"skip_steps": [...], "rewinds": N} as '
                              "the last rewind wrote it; delete it to forget this run's rewinds") from None
        return record


def committed_steps(url: str) -> tuple[int, ...]:
    """The steps of the committed checkpoints under `url` (a `step-N[.sK]/` holding its manifest, the
    commit marker), sorted, each once: what a restart can load. One glob (one listing on object stores).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name, done in (("step-00000100", True), ("step-00000100.s3", True), ("step-00000120", False)):
    ...     (root / name).mkdir(); _ = done and (root / name / "manifest.json").write_text("{}")
    >>> committed_steps(str(root)), committed_steps(str(root / "none"))
    ((100,), ())
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    found = fs.glob(f"{root}/step-*/manifest.json") if fs.exists(root) else []
    steps = {int(m.group(1)) for path in found if (m := STEP_ENTRY.match(path.rstrip("/").split("/")[-2]))}
    return tuple(sorted(steps))


def retire_checkpoints(url: str, after_step: int) -> tuple[str, list[str]]:
    """Move every entry of a step > `after_step` under `url`/rewound-<n>/; (that folder, the names moved).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("step-00000100", "step-00000120", "step-00000140.s2", "step-00000140.s3.saving.json"):
    ...     (root / name).mkdir()
    >>> folder, moved = retire_checkpoints(str(root), 110)
    >>> folder.endswith("rewound-1"), moved, sorted(p.name for p in root.iterdir())
    (True, ['step-00000120', 'step-00000140.s2', 'step-00000140.s3.saving.json'], ['rewound-1', 'step-00000100'])
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []
    taken = {n for n in names if n.startswith("rewound-")}
    folder = next(f"{root}/rewound-{i}" for i in range(1, len(taken) + 2) if f"rewound-{i}" not in taken)
    moved = [n for n in names if (m := STEP_ENTRY.match(n)) and int(m.group(1)) > after_step]
    if moved:
        fs.makedirs(folder, exist_ok=True)
    for name in moved:
        fs.mv(f"{root}/{name}", f"{folder}/{name}", recursive=True)
    return folder, moved
