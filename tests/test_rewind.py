"""Loss-spike rewinds below the supervisor's loop, in a second each (review of issue 14, F1-F4).

The end-to-end proof (a real spike in two real groups, one rewind, the poisoned windows skipped) is
tests/test_supervisor.py::test_an_agreed_loss_spike_rewinds_once_and_skips_exactly_the_poisoned_data.
Here: which checkpoint a rewind picks, or why it declines (pure); which configs are refused; which
data skips a trainer applies at a step (pure), replayed on a real `PackedBatches`; and the executor's
order of work when a checkpoint move fails.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import replace
from pathlib import Path

import fsspec.implementations.local as local
import pytest
import torch

from watchtower.supervisor.actions import Executor
from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.events import EventLog
from watchtower.supervisor.metrics import JobStats
from watchtower.supervisor.remediation import RemediationConfig, Rewind, RewindDeclined, checkpoints_problem, remedy
from watchtower.supervisor.jobfile import job_toml
from watchtower.supervisor.policy_types import (EXIT_REWIND_FAILED, Launch, LaunchReason, Role, View)
from watchtower.supervisor.rewind import (RECORD_FILE, RewindRecord, committed_steps, restore_checkpoints,
                                         retire_checkpoints)
from watchtower.toml_dataclasses import build
from watchtower.trainer.data import DataConfig, PackedBatches, due_skips
from watchtower.validation import ConfigError

DEFAULT = RemediationConfig("rewind")  # rewind_margin 100, skip 0 before, 200 after
NEAR = RemediationConfig("rewind", rewind_margin=10, skip_batches_after=4)


def _brief(action: Rewind | RewindDeclined) -> tuple:
    if isinstance(action, Rewind):
        return ("rewind", action.checkpoint_step, action.skip_first, action.skip_last)
    return ("declined", action.why.split(";")[0])


@pytest.mark.parametrize("spike,cfg,checkpoints,want", [
    # F2: keep_last 3 x interval 20 is shallower than the default margin: every checkpoint was set
    # aside and the restart trained from step 0. Now: declined, nothing moved, the spike pages
    (1000, DEFAULT, (940, 960, 980), ("declined", "no committed checkpoint at or before step 900 (oldest kept: 940)")),
    (1000, DEFAULT, (), ("declined", "no committed checkpoint at or before step 900 (none committed yet)")),
    # checkpoint.interval_steps = 0 (save at the end only): nothing to rewind to, ever
    (120, NEAR, (), ("declined", "no committed checkpoint at or before step 110 (none committed yet)")),
    # the newest checkpoint at or before spike - margin, not the arithmetic target
    (1000, DEFAULT, (860, 880, 900, 920), ("rewind", 900, 1000, 1200)),
    (120, NEAR, (20, 40, 60, 80, 100, 120), ("rewind", 100, 120, 124)),
    (120, NEAR, (100, 110, 120), ("rewind", 110, 120, 124)),
    # the oldest kept is old enough; the later ones (inside the margin) are set aside
    (1000, DEFAULT, (880, 940, 960), ("rewind", 880, 1000, 1200)),
])
def test_a_rewind_with_no_checkpoint_old_enough_is_declined_and_keeps_every_checkpoint(spike, cfg, checkpoints, want):
    assert _brief(remedy(spike, 0, cfg, checkpoints)) == want


@pytest.mark.parametrize("patience", [1, 3, 5])
def test_with_loss_spike_patience_the_skip_starts_at_the_first_spiking_step_not_the_reported_one(patience):
    """Review of issue 14, F6: the detector reports a spike at the last step of a `patience`-long
    streak; taken as the spike step, the first patience - 1 poisoned steps (bad_data@120:5) were
    neither skipped nor spiking enough to be seen again after the rewind."""
    from watchtower.hooks.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector

    poison = range(120, 125)
    detector = LossSpikeDetector(LossSpikeConfig(patience=patience))
    events = [e for step in range(1, 150) for e in detector.update(step, 8.0 if step in poison else 2.0 + 0.01 * (step % 3))]
    reported = events[0].step
    action = remedy(reported, 0, NEAR, (80, 100, 110, 120), patience=patience)
    assert (reported, action.skip_first, action.checkpoint_step) == (119 + patience, 120, 110)
    assert all(action.skip_first <= step <= action.skip_last for step in poison), action


@pytest.mark.parametrize("cfg,interval,keep,refused", [
    (DEFAULT, 0, 3, "checkpoint.interval_steps = 0 saves only at the end"),  # the trainer's default
    (DEFAULT, 20, 3, "checkpoint.keep_last = 3 saves every 20 steps reach 40 steps back"),  # the review's case
    (DEFAULT, 20, 6, "checkpoint.keep_last = 6 saves every 20 steps reach 100 steps back"),  # 14b N5: + a save of lag
    (DEFAULT, 20, 7, None),
    (NEAR, 20, 3, None),
    (RemediationConfig("page"), 0, 1, None),  # only paging: checkpoints are the trainer's business
])
def test_a_job_whose_checkpoints_never_reach_back_past_the_rewind_margin_is_refused_when_read(cfg, interval, keep,
                                                                                              refused, tmp_path):
    """F2 caught before the run: with such checkpoints every spike could only be declined (or, before,
    restarted the run from step 0)."""
    problem = checkpoints_problem(cfg, interval, keep)
    assert (problem if problem is None else problem.split(":")[0].split(",")[0]) == refused
    if cfg is not DEFAULT or refused is None:
        return
    from watchtower.supervisor.config import load_job

    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job"),
                              "train_overrides": [f"checkpoint.interval_steps={interval}", f"checkpoint.keep_last={keep}"]},
                             {"nodes": ["n0"], "active_groups": 1}, {}, remediation={"loss_spike": "rewind"}))
    with pytest.raises(ConfigError) as err:
        load_job(str(path))
    assert err.value.field == "remediation.loss_spike" and refused in str(err.value) and "\n" not in str(err.value)


def test_a_config_accepted_when_read_does_not_decline_spikes_for_patience_or_one_save_of_lag():
    """Review 14b, N5: the load-time check asked only (keep_last - 1) x interval >= rewind_margin, but
    the rewind needs a checkpoint at or before spike - (patience - 1) - margin while the newest kept
    one may be a save past the spike: configs it accepted declined most spikes at run time. Now every
    accepted config rewinds every spike whose newest checkpoint is at most one save past it."""
    accepted = 0
    for interval, keep, margin, patience in itertools.product((10, 20), range(2, 9), (10, 40, 100), (1, 3, 5)):
        cfg = RemediationConfig("rewind", rewind_margin=margin, skip_batches_after=20)
        if checkpoints_problem(cfg, interval, keep, patience) is not None:
            continue
        accepted += 1
        for spike in range(500, 500 + interval):
            newest = (spike + interval) // interval * interval  # one save past the spike at most
            kept = [newest - k * interval for k in range(keep)]
            action = remedy(spike, 0, cfg, kept, patience)
            assert isinstance(action, Rewind), (interval, keep, margin, patience, spike, kept, action)
    assert accepted > 20


def test_the_committed_checkpoints_a_rewind_picks_among_are_those_with_a_manifest(tmp_path):
    """A step directory without its manifest is an interrupted save a restart never loads: a rewind
    that picked it would restart from an older one than it said (or from step 0)."""
    for name, committed in (("step-00000080", True), ("step-00000100", False), ("step-00000100.s2", False),
                            ("step-00000120.s3", True), ("step-00000140.saving.json", False)):
        (tmp_path / name).mkdir()
        if committed:
            (tmp_path / name / "manifest.json").write_text("{}")
    assert committed_steps(str(tmp_path)) == (80, 120)
    assert committed_steps(str(tmp_path / "no-such-dir")) == ()


@pytest.mark.parametrize("fields,key", [
    # F3: margin 0 keeps and loads the checkpoint of the spike step, which holds the spiked update
    ({"rewind_margin": 0}, "rewind_margin"),
    # F3: a skip starting at or before the checkpoint loaded asks to unread data it has trained on
    ({"rewind_margin": 20, "skip_batches_before": 20}, "skip_batches_before"),
    ({"rewind_margin": 10, "skip_batches_before": 30}, "skip_batches_before"),
])
def test_a_rewind_margin_that_loads_the_spiked_checkpoint_or_misses_the_skip_is_refused(fields, key):
    with pytest.raises(ConfigError) as err:
        RemediationConfig("rewind", **fields)
    assert err.value.field == key and "\n" not in str(err.value), str(err.value)
    RemediationConfig("page", **fields)  # unused without a rewind: no reason to refuse the job
    RemediationConfig("rewind", rewind_margin=20, skip_batches_before=19)


@pytest.mark.parametrize("skip_steps,step,applied,want", [
    ([], 120, set(), []),
    (["120-124"], 119, set(), []),
    (["120-124"], 120, set(), [(120, 5)]),            # entered at its first step: all of it
    (["120-124"], 121, {120}, []),                     # applied already (the data state says so)
    (["120-124"], 125, set(), []),                     # past it: nothing left to skip
    # F3: the checkpoint loaded (step 20) sits inside 18-24: the run starts at 21 and skipped nothing
    (["18-24"], 21, set(), [(18, 4)]),
    (["7"], 7, set(), [(7, 1)]),
])
def test_a_skip_range_entered_after_its_first_step_skips_the_steps_still_ahead(skip_steps, step, applied, want):
    assert due_skips(skip_steps, step, applied) == want


def _corpus() -> PackedBatches:
    """One window per step and group, 1000 windows an epoch: window ids never repeat within a run here."""
    return PackedBatches(torch.arange(8 * 1001) % 250, seq_len=8, batch_size=1, seed=0)


def _run(data: PackedBatches, skip_steps: list[str], steps: range) -> dict[int, int]:
    """What the trainer's loop does with one group alone: the due skips, then the step; the window
    each step read."""
    read = {}
    for step in steps:
        for first, n in due_skips(skip_steps, step, data.skipped):
            data.skip(first, n, participants=1)
        read[step] = int(data.windows(0, 1).flatten()[0])
        data.begin_step(0, 1)
        data.end_step(committed=True)
    return read


def test_a_resume_from_a_checkpoint_inside_a_skip_range_leaves_the_rest_of_it_unread():
    """F3 on the real data order: resumed from step 20 with skip_steps 18-24 (poison read by 21-23), the
    steps 21-24 read what 25-28 read in a run that skipped nothing; skipping at exactly FIRST only
    (the old rule) read the poison again."""
    plain = _run(_corpus(), [], range(1, 31))
    data = _corpus()
    _run(data, [], range(1, 21))  # the checkpoint of step 20: a data state with nothing skipped
    resumed = _run(data, ["18-24"], range(21, 31))
    assert [resumed[s] for s in range(21, 27)] == [plain[s] for s in range(25, 31)]
    assert not {plain[s] for s in (21, 22, 23)} & set(resumed.values()), "the poisoned windows were read"


def test_overlapping_skip_ranges_of_a_second_rewind_are_accepted_and_skip_the_second_spikes_data():
    """F4: a second rewind adds "300-500" beside "120-320". Every relaunched trainer refused the pair
    (exit 2: the job stopped). Now both are accepted and applied in order: from the prefix checkpoint
    (step 20, nothing skipped) and from one the second run saved at step 200 (120 skipped), the windows
    the second run read at steps 300-302 (the second spike) are never read again, and nothing before
    step 300 changes."""
    ranges = ["120-320", "300-500"]
    assert DataConfig(skip_steps=ranges).skip_steps == ranges
    data = _corpus()
    second_run = _run(data, ranges[:1], range(1, 303))  # the run after the first rewind, to its second spike
    poison = {second_run[s] for s in (300, 301, 302)}
    for checkpoint in (20, 200):
        data = _corpus()
        _run(data, ranges[:1], range(1, checkpoint + 1))
        third_run = _run(data, ranges, range(checkpoint + 1, 520))
        assert not poison & set(third_run.values()), f"resumed at {checkpoint}: the second spike's data read again"
        assert [third_run[s] for s in range(checkpoint + 1, 300)] == [second_run[s] for s in range(checkpoint + 1, 300)]


def _checkpoints(root: Path, *steps: int) -> None:
    for step in steps:
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "manifest.json").write_text("{}")


def _executor(tmp_path: Path, root: Path, name: str = "rw") -> tuple[Executor, dict]:
    job = build(JobConfig, {"job": {"name": name, "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                            "cluster": {"nodes": ["a", "b"]}})
    (tmp_path / "job").mkdir(exist_ok=True)
    trainer = {"train": {"tp": 1}, "data": {"skip_steps": []}}
    ex = Executor(job, trainer, str(root), launcher=None, lighthouse=lambda: None, groups={},
                  events=EventLog(tmp_path / "events.jsonl"), stats=JobStats(0.0, 1, 200), errors=StageErrors())
    return ex, trainer


def _events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _top(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_a_rewind_whose_checkpoint_move_fails_restarts_nothing_from_the_spiked_checkpoint(tmp_path, monkeypatch,
                                                                                         caplog):
    """Review 14b, N1 (case A): a move failing part-way (a full disk while an object store copies) left
    the newest checkpoints, past the spike, at the top; the pool's restart in the same poll loaded one
    with no skip due, and a rewind was counted. Now the moves are undone, remediation.json goes back,
    no launch follows (the job stops, exit EXIT_REWIND_FAILED, paged) and no rewind is counted.
    Review 14c, C4: it was paged as WatchtowerRewind ("was rewound ... restarted") and logged "the job
    goes on" just before exit 6; now it pages WatchtowerRewindFailed and says it stops."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100, 120, 140)
    real_mv = local.LocalFileSystem.mv

    def mv(self, path1, path2, **kw):  # the second move fails, as a copy to a full disk would
        if path1.endswith("step-00000120") and "rewound" in path2:
            raise OSError(28, "No space left on device")
        return real_mv(self, path1, path2, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "mv", mv)
    ex, trainer = _executor(tmp_path, root)
    paged = []
    monkeypatch.setattr(ex.pages.alerts, "fire", lambda spec, now, labels, description="", **kw:
                        paged.append((spec.alertname, spec.summary, description)))
    launch = Launch("b", Role.ACTIVE, LaunchReason.RESTART)
    rewind = Rewind(spike_step=120, to_step=110, skip_first=120, skip_last=124, checkpoint_step=100)
    with caplog.at_level(logging.WARNING, logger="watchtower.supervisor"):
        code = ex.run([rewind, launch], 0.0)
    assert code == EXIT_REWIND_FAILED
    assert _top(root) == ["step-00000100", "step-00000120", "step-00000140"]  # all back: a person decides
    assert trainer["data"]["skip_steps"] == [] and ex.errors.snapshot()["launch"] == 0
    assert ex.stats.remediations["rewind"] == 0 and ex.stats.remediations["rewind_failed"] == 1
    failed, stopped = _events(tmp_path)
    assert failed["event"] == "rewind_failed" and "No space left" in failed["error"], failed
    assert stopped["event"] == "job_stopped" and stopped["exit_code"] == EXIT_REWIND_FAILED
    ((alertname, summary, description),) = paged
    assert alertname == "WatchtowerRewindFailed" and "FAILED" in summary and "was rewound" not in summary
    assert "FAILED" in description and "step-00000120, step-00000140" in description
    assert "goes on" not in caplog.text and "stopping (exit 6)" in caplog.text, caplog.text


def _rewind_job(tmp_path: Path):
    """A one-group job with loss_spike = "rewind" (margin 10, skip 4 after) in tmp_path/job, loaded."""
    from watchtower.supervisor.config import load_job

    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job"),
                              "train_overrides": ["checkpoint.interval_steps=20"]},
                             {"nodes": ["n0", "n1"], "active_groups": 1}, {},
                             remediation={"loss_spike": "rewind", "rewind_margin": 10, "skip_batches_after": 4}))
    return load_job(str(path))


def _spiking_supervisor(tmp_path: Path, monkeypatch):
    from watchtower.supervisor.policy_view import GroupView
    from watchtower.supervisor.shell import Supervisor

    job, trainer = _rewind_job(tmp_path)
    sup = Supervisor(job, trainer)

    class AllHealthy:
        def unhealthy(self, nodes, interrupted):
            return {}

    sup.health = AllHealthy()
    sup.state = replace(sup.state, started=True)
    view = View(1000.0, (GroupView("g0", "n0", 0.0, heartbeat=999.0, step=120, role=Role.ACTIVE, spike_step=120),),
                checkpoints=(100, 120))
    return sup, view


def test_a_rewind_whose_remediation_json_cannot_be_written_is_declined_and_kills_nothing(tmp_path, monkeypatch):
    """Review 14b, N1 (case B): remediation.json failing to write (ENOSPC, EACCES) escaped before any
    event or count, and every group was still killed and restarted from the spiked checkpoint, a
    rewind spent. Now the record is written before anything is carried out; if it fails, the policy
    decides again with the rewind refused: a declined rewind (it pages), no kill, no rewind spent."""
    sup, view = _spiking_supervisor(tmp_path, monkeypatch)
    try:
        def full(self, out):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(RewindRecord, "save", full)
        state, actions = sup._decide(view)
        assert [type(a).__name__ for a in actions] == ["RewindDeclined"], actions
        assert "could not be written" in actions[0].why and "No space left" in actions[0].why
        assert state.rewinds == 0 and sup.errors.snapshot()["rewind"] == 1
    finally:
        sup.lock.release()


def test_a_rewind_writes_its_record_before_any_group_is_killed(tmp_path, monkeypatch):
    """Review 14b, N1: the counterpart: a record that writes lets the rewind's kills go ahead."""
    sup, view = _spiking_supervisor(tmp_path, monkeypatch)
    try:
        state, actions = sup._decide(view)
        assert "Kill" in [type(a).__name__ for a in actions] and state.rewinds == 1
        assert json.loads((tmp_path / "job" / RECORD_FILE).read_text())["skip_steps"] == ["120-124"]
    finally:
        sup.lock.release()


def test_a_rewind_decided_in_a_poll_a_stop_signal_ends_is_not_recorded(tmp_path, monkeypatch):
    """Review 14b, N1: the record is written before the kills, so a poll that a stop signal ends after
    deciding (nothing carried out) must not leave a rewind in remediation.json that never happened."""
    import signal

    sup, view = _spiking_supervisor(tmp_path, monkeypatch)
    try:
        sup._signal = signal.SIGTERM
        decided = sup._decide(view)
        assert decided is not None and not (tmp_path / "job" / RECORD_FILE).exists()
        sup._signal = None
        sup._decide(view)
        assert (tmp_path / "job" / RECORD_FILE).exists()
        sup.executor.unrecord_rewind()  # what poll_once does when the signal comes right after
        assert not (tmp_path / "job" / RECORD_FILE).exists()
    finally:
        sup.lock.release()


def test_a_checkpoint_saved_or_pruned_between_the_listing_and_the_move_is_seen_before_the_launch(tmp_path,
                                                                                                  monkeypatch):
    """Review 14b, N2: the checkpoint was picked from a listing taken before the health gate and the
    kills. A save committing (and pruning the pick) in that window had every entry moved and the run
    restart from step 0; one committing after the move was loaded, past the spike. Now the executor
    lists again after the kills, re-picks the newest at or before to_step, moves the later ones,
    and checks that the loaded one is the newest committed before any launch."""
    rewind = Rewind(spike_step=121, to_step=81, skip_first=121, skip_last=141, checkpoint_step=80)
    # a save of 140 committed and pruned the pick (80) after the listing (80, 100, 120): nothing old
    # enough is left, so the job stops, every checkpoint in place (the old code moved them all)
    root = tmp_path / "a" / "checkpoints"
    _checkpoints(root, 100, 120, 140)
    ex, _ = _executor(tmp_path / "a", root)
    assert ex.run([rewind], 0.0) == EXIT_REWIND_FAILED
    assert _top(root) == ["step-00000100", "step-00000120", "step-00000140"]
    # (review 14c, C1: the fix said is the one left, not a move that would leave no checkpoint)
    assert "delete remediation.json to resume from step 140 without the skip" in _events(tmp_path / "a")[0]["message"]
    # the pick was pruned but an older one is kept: that one is loaded (it replays more, skips the same)
    root = tmp_path / "b" / "checkpoints"
    _checkpoints(root, 60, 100, 120, 140)
    ex, trainer = _executor(tmp_path / "b", root)
    assert ex.run([rewind], 0.0) is None and committed_steps(str(root)) == (60,)
    assert _events(tmp_path / "b")[-1]["checkpoint_step"] == 60 and trainer["data"]["skip_steps"] == ["121-141"]
    # a save commits while the later checkpoints are being moved (Slurm's kill is asynchronous): it
    # is set aside too, so the restart loads the pick
    root = tmp_path / "c" / "checkpoints"
    _checkpoints(root, 80, 100, 120)
    real_mv = local.LocalFileSystem.mv

    def mv(self, path1, path2, **kw):
        real_mv(self, path1, path2, **kw)
        if not (root / "step-00000140").exists() and "rewound-1" in path2:
            _checkpoints(root, 140)

    monkeypatch.setattr(local.LocalFileSystem, "mv", mv)
    ex, _ = _executor(tmp_path / "c", root)
    assert ex.run([rewind], 0.0) is None
    assert committed_steps(str(root)) == (80,), _top(root)


def test_a_supervisor_restarted_after_a_rewind_keeps_its_skip_and_its_rewind_count(tmp_path):
    """Review of issue 14, F9: the skip ranges and the rewinds spent lived in the supervisor's memory.
    A supervisor restarted (a graceful stop, a requeue, a crash) before a checkpoint past the skip
    resumed before it with no skip, read the poison again and rewound again, max_rewinds anew each time.
    Now a rewind writes remediation.json first; the next supervisor on the directory starts with both."""
    from watchtower.supervisor.shell import Supervisor

    job, trainer = _rewind_job(tmp_path)
    _checkpoints(tmp_path / "job" / "checkpoints", 100, 120)
    first = Supervisor(job, trainer)
    try:
        assert first.executor.run([Rewind(120, 110, 120, 124, checkpoint_step=100)], 0.0) is None
    finally:
        first.lock.release()
    again = Supervisor(job, trainer)
    try:
        assert again.executor.trainer["data"]["skip_steps"] == ["120-124"]
        assert again.state.rewinds == 1
    finally:
        again.lock.release()
    (tmp_path / "job" / RECORD_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        Supervisor(job, trainer)


def test_a_remediation_json_of_another_run_is_refused_at_start_naming_the_file(tmp_path):
    """Review 14b, N3: remediation.json named no run. A new run in the same output dir (another
    checkpoint.dir, or the old checkpoints deleted to start over) silently skipped its clean data and
    started with its rewinds spent. Now the record names its job and checkpoint URL, and one of
    another run (or with no committed checkpoint left to belong to) is refused in one line naming the
    file and the fix; the same run's record is carried, said in an event."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100)
    RewindRecord("rw", str(root)).add("120-320").save(tmp_path / "job")
    ex, trainer = _executor(tmp_path, root)  # the same run: carried, and said
    assert trainer["data"]["skip_steps"] == ["120-320"] and ex.rewound.rewinds == 1
    assert [e["event"] for e in _events(tmp_path)] == ["rewinds_carried"]
    for name, url in (("other", root), ("rw", tmp_path / "fresh"), ("rw", tmp_path / "empty")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ConfigError) as err:
            _executor(tmp_path, url, name)
        said = str(err.value)
        assert RECORD_FILE in said and "another run" in said and "delete the file" in said and "\n" not in said


@pytest.mark.parametrize("text", [
    '{"job": "rw", "checkpoint_url": "%s", "skip_steps": "120-124", "rewinds": 1}',
    '{"job": "rw", "checkpoint_url": "%s", "skip_steps": ["124-120"], "rewinds": 1}',
    '{"job": "rw", "checkpoint_url": "%s", "skip_steps": ["120-124"], "rewinds": "1"}',
])
def test_a_malformed_remediation_json_is_refused_at_start_not_by_every_launched_trainer(tmp_path, text):
    """Review 14b, N3: `"skip_steps": "120-124"` became seven one-character ranges, and every trainer
    launched with them exited 2. Now each entry is checked when the supervisor starts."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / RECORD_FILE).write_text(text % root)
    with pytest.raises(ConfigError, match="delete it"):
        _executor(tmp_path, root)


def test_a_supervisor_refused_for_its_remediation_json_releases_the_directory_lock(tmp_path):
    """Review 14b, N8 (a): the refusal came after the JobDirLock was claimed, so an in-process caller
    (the demo, a test) was refused at its next start as "supervised by a live supervisor" (itself)."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.shell import Supervisor

    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                             {"nodes": ["n0", "n1"], "active_groups": 1}, {}))
    job, trainer = load_job(str(path))
    (tmp_path / "job").mkdir(exist_ok=True)
    (tmp_path / "job" / RECORD_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        Supervisor(job, trainer)
    (tmp_path / "job" / RECORD_FILE).unlink()
    Supervisor(job, trainer).lock.release()  # refused as "being supervised" before


def test_a_window_both_in_the_config_and_in_remediation_json_is_warned_about(tmp_path):
    """Review 14b, N8 (b): a window copied from the rewind event into train_overrides while
    remediation.json still lists it was skipped twice, unsaid. Not merged (two rewinds may leave equal
    windows), but said at start."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100)
    RewindRecord("rw", str(root)).add("120-320").save(tmp_path / "job")
    job = build(JobConfig, {"job": {"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                            "cluster": {"nodes": ["a", "b"]}})
    trainer = {"train": {"tp": 1}, "data": {"skip_steps": ["120-320"]}}
    Executor(job, trainer, str(root), launcher=None, lighthouse=lambda: None, groups={},
             events=EventLog(tmp_path / "events.jsonl"), stats=JobStats(0.0, 1, 200), errors=StageErrors())
    (event,) = _events(tmp_path)
    assert event["duplicated"] == ["120-320"] and "skipped twice" in event["message"]


def test_a_checkpoint_dir_with_glob_characters_lists_its_checkpoints(tmp_path):
    """Review 14b, N4: the listing globbed an unescaped path; `runs/exp[1]/checkpoints` matched
    nothing, and every spike was declined as "none committed yet" while the trainer resumed fine."""
    root = tmp_path / "exp[1]" / "checkpoints"
    _checkpoints(root, 80, 100)
    assert committed_steps(str(root)) == (80, 100)


def test_remediation_json_is_fsynced_with_its_directory_before_it_counts(tmp_path, monkeypatch):
    """Review 14b, N9: written by rename without fsync, remediation.json could be empty after a node
    crash, and the advised fix (delete it) forgot the skip that keeps the poison unread."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    RewindRecord("rw", "ckpt").add("120-124").save(tmp_path)
    assert any(p.startswith(str(tmp_path / ".remediation.json")) for p in synced) and str(tmp_path) in synced


def _full_disk_on(monkeypatch, name: str) -> None:
    """Moving `name` into a rewound-N folder fails, as a copy to a full disk would."""
    real_mv = local.LocalFileSystem.mv

    def mv(self, path1, path2, **kw):
        if path1.endswith(name) and "rewound" in path2:
            raise OSError(28, "No space left on device")
        return real_mv(self, path1, path2, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "mv", mv)


def test_a_failed_rewind_is_not_silently_resumed_past_by_the_next_start(tmp_path, monkeypatch):
    """Review 14c, C1: after exit 6 the undo put every checkpoint back and erased the record, so
    `watchtower supervise` again loaded the spiked step 140 with no skip, unsaid. Now the rewind stays
    pending in remediation.json: the next start is refused in one line naming the file, the spike and
    the entries to move; once a person moves them, the start marks it done and keeps the skip."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100, 120, 140)
    _full_disk_on(monkeypatch, "step-00000120")
    ex, _ = _executor(tmp_path, root)
    assert ex.run([Rewind(130, 110, 128, 140, checkpoint_step=100)], 0.0) == EXIT_REWIND_FAILED
    monkeypatch.undo()
    with pytest.raises(ConfigError) as err:
        _executor(tmp_path, root)
    said = str(err.value)
    assert RECORD_FILE in said and "spike at step 130" in said and "\n" not in said, said
    assert "move step-00000120, step-00000140 out of" in said and "128-140" in said, said
    (root / "aside").mkdir()
    for name in ("step-00000120", "step-00000140"):
        (root / name).rename(root / "aside" / name)
    ex, trainer = _executor(tmp_path, root)
    assert trainer["data"]["skip_steps"] == ["128-140"] and ex.rewound.rewinds == 1
    assert "pending" not in json.loads((tmp_path / "job" / RECORD_FILE).read_text())


def test_a_supervisor_killed_between_the_record_and_the_moves_leaves_a_pending_rewind(tmp_path, monkeypatch):
    """Review 14c, C2: the record written before the kills said the rewind was done (skip, rewinds=1);
    a supervisor killed mid-move (Slurm's SIGKILL after KillWait, OOM) left it so, and the next start
    resumed from the post-spike checkpoint with the skip behind it and the rewind spent. Now it is
    written pending and marked done only after the moves and the check; a pending one is refused."""
    sup, view = _spiking_supervisor(tmp_path, monkeypatch)
    root = Path(sup.executor.checkpoint_url)
    _checkpoints(root, 100, 120)
    try:
        sup._decide(view)  # recorded; then the supervisor dies before (or during) the moves
    finally:
        sup.lock.release()
    record = json.loads((tmp_path / "job" / RECORD_FILE).read_text())
    assert record["pending"] == {"spike_step": 120, "to_step": 110, "window": "120-124"}, record
    with pytest.raises(ConfigError, match=r"rewind pending: spike at step 120.*move step-00000120 out of"):
        _executor(tmp_path, root)
    # a rewind that completes marks itself done: the next start carries it
    (tmp_path / "job" / RECORD_FILE).unlink()
    ex, _ = _executor(tmp_path, root)
    assert ex.run([Rewind(120, 110, 120, 124, checkpoint_step=100)], 0.0) is None
    assert "pending" not in json.loads((tmp_path / "job" / RECORD_FILE).read_text())
    _checkpoints(root, 120)  # the run went on past the spike after the rewind
    assert _executor(tmp_path, root)[1]["data"]["skip_steps"] == ["120-124"]


def test_an_undo_never_moves_a_checkpoint_back_onto_a_name_a_late_save_recreated(tmp_path):
    """Review 14c, C3: restore_checkpoints moved back onto a name that existed again (a rank still
    saving re-created step-160/): locally the checkpoint was nested inside it and rewound-1 removed; on
    an object store the two saves merged. Now such an entry stays in rewound-N, said; nothing merged."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100, 140, 160)
    folder, moved = retire_checkpoints(str(root), 120)
    (root / "step-00000160").mkdir()
    (root / "step-00000160" / "r1.pt").write_text("late")
    assert restore_checkpoints(str(root), folder, moved) == ["step-00000160"]
    assert sorted(p.name for p in (root / "step-00000160").iterdir()) == ["r1.pt"]
    assert (root / "rewound-1" / "step-00000160" / "manifest.json").exists()
    assert committed_steps(str(root)) == (100, 140)


def test_a_failed_put_back_of_remediation_json_under_a_stop_signal_is_counted_and_said(tmp_path, monkeypatch):
    """Review 14c, C6: the write back ran inside the "decide" guard and `_recorded` was cleared first:
    a failure was swallowed, and remediation.json kept a rewind that never happened, unsaid."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100, 120)
    ex, _ = _executor(tmp_path, root)
    assert ex.record_rewind([Rewind(120, 110, 120, 124, checkpoint_step=100)]) == ""

    def fails(self, missing_ok=False):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "unlink", fails)
    ex.unrecord_rewind()
    monkeypatch.undo()
    assert ex.errors.snapshot()["rewind"] == 1
    (event,) = _events(tmp_path)
    assert event["event"] == "rewind_unrecord_failed" and RECORD_FILE in event["message"], event
    assert '"120-124"' in event["message"] and "Input/output" in event["error"]


def test_an_old_format_remediation_json_is_refused_with_the_keys_that_keep_its_skip(tmp_path):
    """Review 14c, C8: a record of the first format (no job nor checkpoint_url) was refused as
    'KeyError' with "delete it", which forgets the skip and the rewinds spent. Now the line names the
    two keys to add, with this job's values."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / RECORD_FILE).write_text('{"skip_steps": ["120-124"], "rewinds": 1}')
    with pytest.raises(ConfigError) as err:
        _executor(tmp_path, root)
    said = str(err.value)
    assert f'add "job": "rw", "checkpoint_url": "{root}"' in said and "delete" not in said, said


def test_a_checkpoint_listing_error_at_start_is_a_one_line_config_error(tmp_path, monkeypatch):
    """Review 14c, C9: with a record present, a listing that raised (EACCES, an object store's
    transient error) escaped as a traceback from `watchtower supervise`; now it is a ConfigError
    naming checkpoint.dir (exit 2)."""
    root = tmp_path / "checkpoints"
    _checkpoints(root, 100)
    RewindRecord("rw", str(root)).add("120-124").save(tmp_path / "job")

    def denied(url):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr("watchtower.supervisor.rewind.committed_steps", denied)
    with pytest.raises(ConfigError, match=r"checkpoint.dir = .*cannot be listed .*Permission denied"):
        _executor(tmp_path, root)


def test_the_summary_of_a_failed_rewind_says_so_next_to_its_exit_code(capsys):
    """Review 14c, C10: `supervise` ended a failed rewind with a bare `exit: 6`."""
    from watchtower.cli import print_summary

    print_summary({"crash_loop": False, "planned_drains": 0, "steps": 130, "failures": 0, "restarts": 0,
                   "recovery_seconds": None, "goodput_ratio": 0.5, "wall_seconds": 0.0, "breakdown_seconds": {}},
                  EXIT_REWIND_FAILED)
    assert "exit: 6 (rewind failed)" in capsys.readouterr().out
