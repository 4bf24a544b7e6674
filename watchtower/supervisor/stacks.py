"""Reading a hung rank's Python stacks, and naming where it is stuck (pure: text in, frames out).

Two sources, one shape (threads of frames, innermost first): py-spy's `dump --json`, and the
faulthandler text a rank writes on STACK_SIGNAL (the fallback where ptrace is not allowed).

Where is a rank stuck? In the innermost frame of its main thread that is the user's own code:
frames of the Python runtime (stdlib, `<frozen ...>`), of installed packages (site-packages,
dist-packages: torch, torchft) and of Watchtower's fault injector (`faults.py`: a fire drill's
sleep, never the bug) are skipped, so a rank blocked in a collective is named by the line of the
training code that called it, not by torch's `wait`. Watchtower's own trainer counts as user code,
installed or not: a file inside this package's own directory, or in a `watchtower/` package directly
under a site-packages (a rank's installed copy). Never a path that merely holds "/watchtower/" (a venv
inside a clone named watchtower made every torch frame "user code"; a user's project under
~/watchtower/ is the user's, by the usual rule). A stack with no such frame is named by its innermost frame.

Which rank is the culprit? The first rank, by rank number, whose main thread is not inside a
collective (torch.distributed, torchft): the peers blocked in a collective are waiting on it.
If every rank waits in a collective, the lowest rank is named and the verdict says so (the
incident's flight records may then name the rank behind: forensics.behind).
Cost: a pass over a few hundred frames; microseconds.
"""

from __future__ import annotations

import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_RUNTIME = tuple(p for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]} if p)
_PACKAGES = ("/site-packages/", "/dist-packages/")
# the bundled trainer is the user's code even when installed as a package: this package's directory,
# or a rank's installed copy (`.../site-packages/watchtower/`)
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
# a rank's frames carry the path it imported through (a symlinked clone, an automount path), not the
# resolved one: both spellings of this package's root count
_PACKAGE_ROOTS = tuple(dict.fromkeys((PACKAGE_ROOT, str(Path(__file__).absolute().parents[1]))))
_OURS_INSTALLED = tuple(f"{p}watchtower/" for p in _PACKAGES)
_INJECTOR = "trainer/faults.py"
_COLLECTIVE = ("/torch/distributed/", "/torchft/")
_FAULTHANDLER_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+)")
_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*)$')


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.func} at {self.file.rsplit('/', 1)[-1]}:{self.line}"


@dataclass(frozen=True)
class Thread:
    name: str
    frames: tuple[Frame, ...]  # innermost first

    @property
    def is_main(self) -> bool:
        """The thread that ran the program: it runs a module's top level (`python -m` puts runpy's
        frames below it); other threads start in threading's bootstrap."""
        return self.name == "MainThread" or any(f.func == "<module>" for f in self.frames)


def parse_pyspy(text: str) -> list[Thread]:
    """Threads from `py-spy dump --json` (one process); a ValueError for any other shape (a frame
    without its file, say), so the capture records it for that rank and goes on with the others.

    >>> t = parse_pyspy('[{"thread_name": "MainThread", "frames": [{"name": "f", "filename": "/a/x.py", "line": 3}]}]')
    >>> t[0].name, str(t[0].frames[0])
    ('MainThread', 'f at x.py:3')
    >>> parse_pyspy('[{"thread_name": "MainThread", "frames": [{"name": "f", "line": 3}]}]')
    Traceback (most recent call last):
    ValueError: not py-spy's dump --json shape: KeyError('filename')
    """
    try:
        return [Thread(t.get("thread_name") or str(t.get("thread_id", "?")),
                       tuple(Frame(f["name"], f["filename"], int(f["line"])) for f in t["frames"]))
                for t in json.loads(text)]
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not py-spy's dump --json shape: {err!r}") from None


def parse_faulthandler(text: str) -> list[Thread]:
    """Threads from faulthandler's text (its "most recent call first" is innermost first too).

    >>> text = 'Current thread 0x7f (most recent call first):\\n  File "/a/x.py", line 4 in stuck\\n' \\
    ...        '  File "/a/x.py", line 9 in <module>\\n'
    >>> [str(f) for f in parse_faulthandler(text)[0].frames]
    ['stuck at x.py:4', '<module> at x.py:9']
    """
    threads: list[Thread] = []
    name, frames = None, []
    for line in text.splitlines():
        head = _FAULTHANDLER_THREAD.match(line)
        frame = _FAULTHANDLER_FRAME.match(line)
        if head:
            if name is not None:
                threads.append(Thread(name, tuple(frames)))
            name, frames = head.group(2), []
        elif frame and name is not None:
            frames.append(Frame(frame["func"], frame["file"], int(frame["line"])))
    if name is not None:
        threads.append(Thread(name, tuple(frames)))
    return threads


def main_thread(threads: list[Thread]) -> Thread | None:
    return next((t for t in threads if t.is_main), threads[0] if threads else None)


def our_module(path: str) -> str | None:
    """The path of a file inside the Watchtower package ("trainer/train.py"), None outside it.

    >>> our_module("/v/lib/python3.11/site-packages/watchtower/trainer/train.py")
    'trainer/train.py'
    >>> our_module("/home/u/watchtower/.venv/lib/python3.11/site-packages/torch/cuda/__init__.py") is None
    True
    """
    root = next((r for r in _PACKAGE_ROOTS if path.startswith(r + "/")), None)
    if root is not None:
        return path[len(root) + 1:]
    return next((path.split(m, 1)[1] for m in _OURS_INSTALLED if m in path), None)


def is_user_code(frame: Frame) -> bool:
    """Not the runtime, not an installed package (except Watchtower), not the fault injector.

    >>> is_user_code(Frame("train", "/srv/job/train.py", 9)), is_user_code(Frame("wait", "/v/site-packages/torch/x.py", 1))
    (True, False)
    >>> is_user_code(Frame("before_step", "/v/site-packages/watchtower/trainer/faults.py", 125))
    False

    The injector is also known by its path's end, anchored at a `watchtower/` directory: a rank that
    imported this package through another path than the supervisor (a symlink it does not share)
    still gets the drill's own sleep set aside, never named as the culprit.
    """
    path = frame.file
    ours = our_module(path)
    if path.startswith("<") or ours == _INJECTOR or path.endswith(f"/watchtower/{_INJECTOR}"):
        return False
    if ours is not None:
        return True
    return not (any(p in path for p in _PACKAGES) or any(path.startswith(r + "/") for r in _RUNTIME))


def stuck_frame(thread: Thread) -> Frame | None:
    """The innermost frame of the user's code, else the innermost frame (see the module's rule)."""
    return next((f for f in thread.frames if is_user_code(f)), thread.frames[0] if thread.frames else None)


def in_collective(thread: Thread) -> bool:
    return any(any(c in f.file for c in _COLLECTIVE) for f in thread.frames)


def culprit(stacks: dict[int, list[Thread]]) -> tuple[int, Frame, bool] | None:
    """(rank, frame, alone): the rank to blame, where its main thread is stuck, and whether it is the
    only rank outside a collective-wait (False: every rank waits, the lowest is named). None: no stack.

    >>> mine = Thread("MainThread", (Frame("train", "/srv/train.py", 9),))
    >>> waiting = Thread("MainThread", (Frame("wait", "/v/site-packages/torch/distributed/c10d.py", 1), *mine.frames))
    >>> rank, frame, alone = culprit({0: [waiting], 1: [mine]})
    >>> rank, str(frame), alone
    (1, 'train at train.py:9', True)
    """
    mains = {rank: main_thread(threads) for rank, threads in sorted(stacks.items())}
    mains = {rank: t for rank, t in mains.items() if t is not None and t.frames}
    if not mains:
        return None
    free = [rank for rank, t in mains.items() if not in_collective(t)]
    rank = free[0] if free else min(mains)
    return rank, stuck_frame(mains[rank]), bool(free)
