"""Loss-spike rewinds below the supervisor's loop, in a second each (review of issue 14, F1-F4).

The end-to-end proof (a real spike in two real groups, one rewind, the poisoned windows skipped) is
tests/test_supervisor.py::test_an_agreed_loss_spike_rewinds_once_and_skips_exactly_the_poisoned_data.
Here: which checkpoint a rewind picks, or why it declines (pure); which configs are refused; which
data skips a trainer applies at a step (pure), replayed on a real `PackedBatches`; and the executor's
order of work when a checkpoint move fails.
"""

from __future__ import annotations

import json
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
from watchtower.supervisor.rewind import RECORD_FILE, committed_steps
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
    (DEFAULT, 20, 6, None),
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


def test_a_rewind_whose_checkpoint_move_fails_still_records_the_skip_and_the_job_goes_on(tmp_path, monkeypatch):
    """F1's second half: the moves ran before the skip was added, so a move failing part-way (EACCES,
    a full disk while an object store copies) left a restart with no skip at all. Now the skip comes
    first; the failure is counted under stage "rewind" and said in the rewind event."""
    root = tmp_path / "checkpoints"
    for step in (100, 120, 140):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "manifest.json").write_text("{}")
    real_mv = local.LocalFileSystem.mv

    def mv(self, path1, path2, **kw):  # the second move fails, as a copy to a full disk would
        if path1.endswith("step-00000140"):
            raise OSError(28, "No space left on device")
        return real_mv(self, path1, path2, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "mv", mv)
    job = build(JobConfig, {"job": {"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job")},
                            "cluster": {"nodes": ["a", "b"]}})
    trainer = {"train": {"tp": 1}, "data": {"skip_steps": []}}
    ex = Executor(job, trainer, str(root), launcher=None, lighthouse=lambda: None, groups={},
                  events=EventLog(tmp_path / "events.jsonl"), stats=JobStats(0.0, 1, 200), errors=StageErrors())
    assert ex.run([Rewind(spike_step=120, to_step=110, skip_first=120, skip_last=124, checkpoint_step=100)], 0.0) is None
    assert trainer["data"]["skip_steps"] == ["120-124"]
    assert ex.errors.snapshot()["rewind"] == 1
    (event,) = [json.loads(line) for line in Path(tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "rewind" and "No space left" in event["error"] and event["checkpoint_step"] == 100, event


def test_a_supervisor_restarted_after_a_rewind_keeps_its_skip_and_its_rewind_count(tmp_path):
    """Review of issue 14, F9: the skip ranges and the rewinds spent lived in the supervisor's memory.
    A supervisor restarted (a graceful stop, a requeue, a crash) before a checkpoint past the skip
    resumed before it with no skip, read the poison again and rewound again, max_rewinds anew each time.
    Now a rewind writes remediation.json first; the next supervisor on the directory starts with both."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.shell import Supervisor

    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "rw", "trainer_config": "tiny", "output_dir": str(tmp_path / "job"),
                              "train_overrides": ["checkpoint.interval_steps=20"]},
                             {"nodes": ["n0", "n1"], "active_groups": 1}, {},
                             remediation={"loss_spike": "rewind", "rewind_margin": 10, "skip_batches_after": 4}))
    job, trainer = load_job(str(path))
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
