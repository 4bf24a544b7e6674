"""`watchtower demo --output-dir X` deletes only what an earlier demo made: a directory it did not
create (no marker file) is refused before anything starts, with exit 2 and one line."""

from __future__ import annotations

import os

import pytest

from watchtower import cli
from watchtower.supervisor import shell as supervisor


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch):
    """A refusal comes before any process: building the Supervisor fails the test (and keeps an
    unfixed `demo` from running for minutes)."""
    def started(*args, **kwargs):
        raise AssertionError("the demo started a Supervisor instead of refusing")
    monkeypatch.setattr(supervisor, "Supervisor", started)


def test_demo_refuses_an_output_dir_it_did_not_create_and_leaves_it_alone(tmp_path, capsys):
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "sentinel.txt").write_text("a week of work")
    assert cli.main(["demo", "--output-dir", str(mine)]) == cli.EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --output-dir = "), lines
    assert (mine / "sentinel.txt").read_text() == "a week of work"
    assert sorted(p.name for p in mine.iterdir()) == ["sentinel.txt"], "nothing may be written into it either"


@pytest.mark.parametrize("kind", ["empty-dir", "file", "under-a-file"])
def test_demo_refuses_any_other_existing_path(tmp_path, capsys, kind):
    """The refusal names the flag the user typed (not checkpoint.dir, which is derived from it)."""
    path = tmp_path / "out"
    path.mkdir() if kind == "empty-dir" else path.write_text("not a directory")
    given = path / "sub" if kind == "under-a-file" else path
    assert cli.main(["demo", "--output-dir", str(given)]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.startswith("config error: --output-dir = ")
    assert path.exists()


def test_demo_output_dir_of_a_previous_demo_is_emptied_and_reused(tmp_path, monkeypatch, capsys):
    path = tmp_path / "demo"
    cli.claim_demo_dir(path).release()  # what a first demo did: created it, with its marker, and ended
    (path / "events.jsonl").write_text("{}\n")
    (path / "group-0").mkdir()
    seen = []

    class Finished:
        """Stands in for the Supervisor: records what the demo handed it, runs nothing."""

        def __init__(self, job, trainer, lock):
            seen.append(sorted(p.name for p in job.job.output_path.iterdir()))
            lock.release()
            self.events = type("Events", (), {"events": []})()

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> int:
            return 0

        def summary(self) -> dict:
            return {"steps": 0, "failures": 0, "planned_drains": 0, "restarts": 0, "recovery_seconds": None, "goodput_ratio": 1.0,
                    "crash_loop": False, "wall_seconds": 0.0, "breakdown_seconds": {"productive": 0.0}}

    monkeypatch.setattr(supervisor, "Supervisor", Finished)
    assert cli.main(["demo", "--output-dir", str(path)]) == 0, capsys.readouterr().err
    assert seen == [[cli.DEMO_MARKER, "supervisor.lock"]], "the next demo starts fresh in the same place"


def test_a_second_demo_refuses_the_directory_of_a_live_demo(tmp_path, capsys):
    """Review 12, F1: a second demo deleted a running demo's directory (events, lock, checkpoints)
    before taking the lock, then ran beside it with the same group ids in the same tree. Now the lock
    comes first: while the first demo holds it, the second refuses, one line, exit 2, touching nothing."""
    path = tmp_path / "demo"
    live = cli.claim_demo_dir(path)  # the first demo, still running: it holds the lock
    try:
        (path / "events.jsonl").write_text('{"event": "job_started"}\n')
        before = sorted(p.name for p in path.iterdir())
        assert cli.main(["demo", "--output-dir", str(path)]) == cli.EXIT_CONFIG
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: --output-dir = "), lines
        assert f"live supervisor (pid {os.getpid()})" in lines[0], lines
        assert sorted(p.name for p in path.iterdir()) == before
        assert (path / "events.jsonl").read_text() == '{"event": "job_started"}\n'
    finally:
        live.release()
