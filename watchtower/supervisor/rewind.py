"""The shell's side of a rewind: set the later checkpoints aside, so the restart loads an earlier one.

A checkpoint directory holds `step-NNNNNNNN/` (and later saves `step-NNNNNNNN.sK/`, claims
`step-NNNNNNNN....saving.json`; names from watchtower/trainer/checkpoint.py, which imports torch and
so is not imported here). Every entry of a step after the rewind's target is moved, not deleted,
under `rewound-<n>/` in the same directory: a trainer resumes only from top-level `step-*` entries,
and a person can still look at the weights that spiked. Works on any fsspec URL the trainer can
write to. Cost: one listing and one move per entry.
"""

from __future__ import annotations

import re

import fsspec

STEP_ENTRY = re.compile(r"^step-(\d{8})\b")


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
