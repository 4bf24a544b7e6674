"""The supervisor with real processes: torchft Lighthouse and Managers on Gloo, real SIGKILLs."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from watchtower.alerting_stack import AlertingStack
from watchtower.config import load_config
from watchtower.supervisor.config import load_job
from watchtower.supervisor.jobfile import job_toml
from watchtower.supervisor.shell import Supervisor
from watchtower.trainer.data import PackedBatches, load_tokens
from watchtower.trainer.train import batch_signature
from conftest import REPO, free_port, run_watchtower, samples, scrape_text, value, watchtower_cmd
from served_text import ServedText
from waiting import WAIT_CEILING_S, wait_until


# tiny's data and schedule with a quarter of its width and one block: most of these tests judge the
# supervisor (who runs, who is replaced, what is read and saved), not the model, and the model's
# forward and backward were most of a supervised step (~0.19 s of it with 2 groups on 2 idle cores;
# one step of this model computes in about a sixth of tiny's time). Data order, windows, schedule and
# faults are tiny's, so the replays below that read load_config("tiny") still describe these runs.
# model=() keeps tiny's own model where a test needs its behaviour: the rewind's spike (this model
# learns slower, and a poisoned step's loss stays under the detector's critical ratio), and the two
# runs whose summary is held to events.jsonl's wall time within 5% (the summary's clock starts before
# the Lighthouse's torch import, events.jsonl's after it: ~1-6 s, so a run much shorter than ~40 s
# would fail on that alone).
SMALL_MODEL = ("model.dim=32", "model.n_layers=1", "model.n_heads=2")


def job_file(tmp_path: Path, *, steps=120, active=2, spares=1, nodes=4, inject=(), interval=20, job=None,
             cluster=None, supervisor=None, train_overrides=(), metrics_port=0, remediation=None,
             model=SMALL_MODEL) -> Path:
    """A job of the tiny trainer (with `model`'s overrides) in tmp_path/job; `job`, `cluster`,
    `supervisor` add or replace keys. No warm standbys unless `cluster` asks (the killed run does, and
    asserts its refill used one): each would import torch beside the groups of every test, for a
    start-up that most tests never see."""
    overrides = [f"train.steps={steps}", f"checkpoint.interval_steps={interval}", "monitor.system_interval_s=1.0",
                 "monitor.parallel_check_interval=20", *model, *train_overrides]
    path = tmp_path / "job.toml"
    path.write_text(job_toml(
        {"name": "sup", "trainer_config": "tiny", "output_dir": str(tmp_path / "job"),
         "train_overrides": overrides, "inject": list(inject), **(job or {})},
        {"nodes": [f"node-{i}" for i in range(nodes)], "active_groups": active, "spare_groups": spares,
         "warm_standby": False, **(cluster or {})},
        {"heartbeat_timeout_s": 20, "startup_grace_s": 60, "crash_loop_limit": 3, "base_port": free_port(),
         "metrics_port": metrics_port, **(supervisor or {})}, remediation=remediation))
    return path


def events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "job" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_rows(tmp_path: Path, replica_id: str) -> list[dict]:
    path = tmp_path / "job" / "groups" / replica_id / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_rows(tmp_path: Path, replica_id: str) -> list[dict]:
    """A group's rows, or none: a group that joined after the others' first quorum heals and stays a
    spare throughout, contributes to no step and writes no train_log.jsonl (which group that is,
    is a start-up race)."""
    path = tmp_path / "job" / "groups" / replica_id / "train_log.jsonl"
    return train_rows(tmp_path, replica_id) if path.exists() else []


def final_prints(tmp_path: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "job" / "groups").glob("*/fingerprint-r0.json")}


def assert_every_window_read_once(tmp_path: Path, last_step: int) -> None:
    """Replay the data order from the rows every group logged (one per committed step it took part
    in): each row read the slice of its (dp_rank, participants), each rank of each step was read by
    exactly one group, and no window was read twice in an epoch."""
    cfg = load_config("tiny")
    replay = PackedBatches(load_tokens(cfg.data), cfg.train.seq_len, cfg.train.micro_batch_size,
                           cfg.data.shuffle_seed, micro_steps=cfg.train.grad_accum_steps)
    by_step = defaultdict(list)
    for log in (tmp_path / "job" / "groups").glob("*/train_log.jsonl"):  # a group that stayed a spare has none
        for row in train_rows(tmp_path, log.parent.name):
            by_step[row["step"]].append(row)
    assert sorted(by_step) == list(range(1, last_step + 1)), "a committed step has no group's rows"
    seen: set[tuple[int, int]] = set()
    for step in range(1, last_step + 1):
        (participants,) = {r["participants"] for r in by_step[step]}
        assert sorted(r["dp_rank"] for r in by_step[step]) == list(range(participants)), step
        for row in by_step[step]:
            replay.begin_step(row["dp_rank"], participants)
            signature = sum(batch_signature(next(replay)) for _ in range(replay.micro_steps)) % 1_000_000_007
            assert row["data_sig"] == signature, f"step {step}: group {row['replica_group']} read other windows"
            windows = {(replay.epoch, int(w)) for w in replay.windows(row["dp_rank"], participants).flatten()}
            assert not windows & seen, f"step {step}: group {row['replica_group']} re-read windows"
            seen |= windows
        replay.end_step(committed=True)


def breakdown(stdout: str) -> dict[str, float]:
    """The summary's wall time split (productive step time, then badput by cause), as printed."""
    lines = stdout[stdout.index("of wall time went"):].splitlines()[1:]
    return {cause: float(seconds.rstrip("s")) for cause, seconds, _share in map(str.split, lines)}


def assert_adds_up_to_the_wall_time(stdout: str, ev: list[dict]) -> dict[str, float]:
    """Issue 14, item 3: the summary's causes add up to the job's wall time (from events.jsonl, the
    other clock) within 5%, and each incident's timeline runs in order."""
    split = breakdown(stdout)
    wall = next(e["time"] for e in ev if e["event"] == "job_finished") - ev[0]["time"]
    assert sum(split.values()) == pytest.approx(wall, rel=0.05), (split, wall)
    for incident in (e for e in ev if e["event"] == "incident"):
        times = [t for t in incident["timeline"].values() if t is not None]
        assert times == sorted(times), incident
    return split


def supervise(path: Path, timeout: float = 280, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(watchtower_cmd("supervise", str(path)), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


# A proxy for the outside world that nothing listens on: every loopback scrape or heal that went
# through it would fail, every group would look silent and be killed as hung.
DEAD_PROXY = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One supervised run (2 active + 1 spare, 150 steps) with a NaN at step 30 (skipped: tiny's
    nonfinite_action) and group 0 SIGKILLed at step 60, shared by the tests that read it: a real
    supervised run costs ~25 s of both cores, so each behaviour it shows is a test of its own on one run.
    Also with an http_proxy in the environment (the supervisor's scrapes and torchft's heals must go
    direct)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    result = supervise(job_file(tmp_path, steps=150, inject=["nonfinite@30", "crash@60:group=0"],
                                train_overrides=["data.stage=always", "train.log_interval=1"], model=(),
                                cluster={"warm_standby": True}), env=DEAD_PROXY)
    return tmp_path, result


def test_killed_group_is_replaced_by_the_spare_and_healthy_group_keeps_going(killed_run):
    tmp_path, result = killed_run
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    ev = events(tmp_path)
    kinds = [e["event"] for e in ev]
    failed = next(e for e in ev if e["event"] == "group_failed")
    assert failed["replica_id"] == "g0000" and failed["reason"] == "exit" and failed["exit_code"] == -9
    assert "recovered" in kinds and "spares_refilled" in kinds and kinds[-1] == "job_finished"
    split = assert_adds_up_to_the_wall_time(result.stdout, ev)
    assert split["productive"] > 0 and split["startup"] > 0 and split["idle_spare"] > 0, split
    (incident,) = [e for e in ev if e["event"] == "incident"]
    assert incident["replica_id"] == "g0000" and incident["timeline"]["killed"] is None  # it exited: no kill
    assert incident["timeline"]["quorum_back"] and incident["timeline"]["refilled"], incident
    assert incident["badput_seconds"]["recovery"] > 0 and incident["badput_seconds"]["recompute"] == 0, incident
    assert [e["replica_id"] for e in ev if e["event"] == "group_started"] == ["g0000", "g0001", "g0002", "g0003"]
    started = {e["replica_id"]: e for e in ev if e["event"] == "group_started"}
    assert not any(started[g]["warm"] for g in ("g0000", "g0001", "g0002")) and started["g0003"]["warm"], \
        "the refill must start from the standby kept on the free node (the initial groups start cold)"
    # the healthy group kept stepping through the outage: every step once, in order, no long gap
    healthy = train_rows(tmp_path, "g0001")
    steps = [r["step"] for r in healthy]
    # At start-up the quorums form while groups are still joining, so a group can sit out some of the
    # first steps as a spare (no rows): which ones is a start-up race (its first 10 under a loaded CI on
    # 2026-11-26; steps 4 and 6 under a heavier load on 2026-11-27). Never a step twice, and through
    # the outage, from 10 steps before the kill at step 60 on: every step, once, in order.
    assert steps == sorted(set(steps)), "the healthy group repeated steps"
    assert [s for s in steps if s >= 50] == list(range(50, 151)), "the healthy group lost steps around the kill"
    around = [b["time"] - a["time"] for a, b in zip(healthy, healthy[1:]) if 50 <= a["step"] <= 80]
    assert max(around) < 5.0, around
    # the spare was hot: its node had staged the data into its own cache before the failure
    started = {e["replica_id"]: e for e in ev if e["event"] == "group_started"}
    spare_cache = tmp_path / "job" / "nodes" / started["g0002"]["node"] / "cache"
    staged = list(spare_cache.rglob("*.py"))
    assert staged and max(p.stat().st_mtime for p in staged) < failed["time"]
    # the promoted spare contributed after the kill, with a full quorum
    promoted = [r for r in train_rows(tmp_path, "g0002") if r["step"] > 70]
    assert promoted and all(r["participants"] == 2 for r in promoted)
    # every surviving group ends with the same weights, and the DP drift check ran and stayed quiet
    prints = final_prints(tmp_path)
    assert set(prints) == {"g0001", "g0002", "g0003"}
    reference = prints["g0001"]["fingerprint"]
    for name, p in prints.items():
        assert p["step"] == 150
        assert p["parallel_checks"].get("dp_replicas", 0) >= 1 and p["parallel_ok"]["dp_replicas"] == 1, name
        for a, b in zip(p["fingerprint"], reference):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), name
    for group_dir in (tmp_path / "job" / "groups").iterdir():
        for path in group_dir.glob("events-*.jsonl"):
            assert "dp_drift" not in path.read_text()
    # the promoted spare read the windows of the seat it took: every window once, across groups
    assert_every_window_read_once(tmp_path, 150)


def test_spare_skips_the_nonfinite_step_with_the_participants(killed_run):
    """With skip_step, a spare (no loss of its own) used to apply the NaN gradient the participants
    skipped, and carried NaN weights into the quorum when promoted. The skip verdict is agreed by every
    group: the spare at step 30, promoted at step 60, ends with the same finite weights as the rest."""
    tmp_path, result = killed_run
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    prints = final_prints(tmp_path)
    assert set(prints) == {"g0001", "g0002", "g0003"}
    at_fault = {g: [r for r in logged_rows(tmp_path, g) if r["step"] == 30] for g in ("g0000", "g0001", "g0002")}
    assert sorted(len(rows) for rows in at_fault.values()) == [0, 1, 1], "step 30 needs 2 participants and a spare"
    assert all(math.isnan(rows[0]["loss"]) for rows in at_fault.values() if rows), "the fault did not fire"
    (spare_at_fault,) = [g for g, rows in at_fault.items() if not rows]
    assert spare_at_fault in prints, "the spare at step 30 was not the one promoted at step 60"
    flat = {g: [v for values in p["fingerprint"] for v in values] for g, p in prints.items()}
    for name, p in prints.items():
        assert p["step"] == 150 and all(map(math.isfinite, flat[name])), f"{name} ended with non-finite weights"
        assert flat[name] == pytest.approx(flat["g0001"], rel=1e-6, abs=1e-9), name


def test_crash_on_every_node_is_stopped_as_a_crash_loop_and_pages(tmp_path, processes):
    """Through a real Prometheus + Alertmanager scraping the supervisor's file_sd targets: the stop
    is paged as WatchtowerCrashLoop while the supervisor lingers, and the next page is not spent.
    Once the page is in, a SIGTERM ends the linger (it would hold the test for the rest of linger_s)
    and the exit code is still the crash loop's."""
    out = tmp_path / "job"
    job = job_file(tmp_path, steps=200, active=1, spares=0, nodes=5, inject=["crash@6"], interval=5,
                   metrics_port=free_port(), supervisor={"linger_s": 60})
    with AlertingStack(tmp_path / "stack", targets_file=out / "targets.json",
                       supervisor_targets_file=out / "supervisor_targets.json") as stack:
        proc = processes.start(watchtower_cmd("supervise", str(job)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        page = stack.pager.wait_for("WatchtowerCrashLoop", WAIT_CEILING_S, run="sup")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=WAIT_CEILING_S)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert page["labels"]["severity"] == "page"
    assert page["annotations"]["runbook_url"] == "docs/runbooks.md#crash-loop"
    assert json.loads((out / "supervisor_targets.json").read_text()) == [], "a stopped supervisor must leave no target"
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    ev = events(tmp_path)
    failures = [e for e in ev if e["event"] == "group_failed"]
    assert len(failures) == 3  # the limit, and not one group more
    assert len({f["node"] for f in failures}) == 3, "each retry must run on a fresh node"
    assert [e["event"] for e in ev].count("restart_from_checkpoint") == 2
    assert ev[-1]["event"] == "job_stopped" and "crash loop" in ev[-1]["message"]
    assert "crash loop" in result.stdout
    assert "stop signal while lingering" in result.stderr, result.stderr[-3000:]


def test_killing_every_group_falls_back_to_the_checkpoint(tmp_path):
    """Also issue 14, item 3: the steps run again after the restart are counted as recompute."""
    port = free_port()
    path = job_file(tmp_path, steps=100, active=2, spares=0, interval=20, metrics_port=port, model=())
    proc = subprocess.Popen(watchtower_cmd("supervise", str(path)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def kill_every_group_once_step_40_is_saved() -> int | None:
            """The last step g0000 logged when every group was killed; None before a checkpoint >= 40
            that the supervisor has seen the job pass by 8 steps (so steps will be run again)."""
            ckpts = sorted((tmp_path / "job" / "checkpoints").glob("step-*/manifest.json"))
            if not (ckpts and int(ckpts[-1].parent.name[5:]) >= 40):
                return None
            seen = value(samples(scrape_text(port)), "watchtower_supervisor_job_step")
            # 8 steps past it (the next save is 20 later): the first redone steps fall in the recovery
            # until the quorum is seen back, so 1-2 redone steps could all read as recovery (CI of 112102b)
            if seen is None or seen < int(ckpts[-1].parent.name[5:]) + 8:
                return None
            rows = train_rows(tmp_path, "g0000")
            for e in events(tmp_path):
                if e["event"] == "group_started":
                    os.killpg(e["pid"], signal.SIGKILL)
            return rows[-1]["step"] if rows else None

        killed_at_step = wait_until(kill_every_group_once_step_40_is_saved, "a checkpoint at step >= 40", interval=0.1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err[-3000:]
    ev = events(tmp_path)
    assert [e["event"] for e in ev].count("restart_from_checkpoint") == 1
    restart_at = next(i for i, e in enumerate(ev) if e["event"] == "restart_from_checkpoint")
    restarted = [e["replica_id"] for e in ev[restart_at:] if e["event"] == "group_started" and e["reason"] == "restart"]
    # the supervisor may see the two exits a poll apart and start a replacement between them: it holds
    # nothing either, so the restart counts it and launches only the rest (CI of 556be49)
    between = [e for e in ev[:restart_at] if e["event"] == "group_started" and e["reason"] == "spare"]
    assert restarted and len(restarted) + len(between) == 2, (restarted, between)
    first_step_after = train_rows(tmp_path, restarted[0])[0]["step"]
    last_checkpoint_before = (first_step_after - 1)
    assert last_checkpoint_before % 20 == 0
    assert killed_at_step - last_checkpoint_before <= 20 + 5, "lost more than the steps since the checkpoint"
    assert ev[-1]["event"] == "job_finished"
    assert assert_adds_up_to_the_wall_time(out, ev)["recompute"] > 0
    (incident,) = [e for e in ev if e["event"] == "incident"]
    assert incident["badput_seconds"]["recompute"] > 0 and incident["timeline"]["killed"] is None, incident


def test_an_agreed_loss_spike_rewinds_once_and_skips_exactly_the_poisoned_data(tmp_path):
    """Issue 14, item 2: bad_data@60:5 poisons the windows steps 60-64 read. With [remediation]
    loss_spike = "rewind", the critical spike both groups report makes the supervisor restart every
    group from the checkpoint at step 40 (the last at or before 60 - 10; the one at 60 holds the
    spike and is set aside) and skip the data of steps 60-64: one rewind, exactly the poisoned
    windows skipped, no second spike, and the loss after it back in the band it had before. Step 60
    is well past the loss detector's warmup (20 steps); after the restart at step 41 its warmup ends
    at step 61, so a spike of re-read poisoned windows would be judged."""
    path = job_file(tmp_path, steps=80, active=2, spares=0, nodes=4, interval=20, inject=["bad_data@60:5"],
                    train_overrides=["train.log_interval=1"], model=(),
                    remediation={"loss_spike": "rewind", "rewind_margin": 10, "skip_batches_after": 4})
    result = supervise(path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    ev = events(tmp_path)
    (rewind,) = [e for e in ev if e["event"] == "rewind"]
    assert (rewind["spike_step"], rewind["to_step"], rewind["skip_steps"]) == (60, 50, [60, 64]), rewind
    assert "step-00000060" in rewind["set_aside"] and not [e for e in ev if e["event"] == "rewind_declined"]
    restarted = [e["replica_id"] for e in ev if e["event"] == "group_started" and e["reason"] == "restart"]
    cfg = load_config("tiny")
    replay = PackedBatches(load_tokens(cfg.data), cfg.train.seq_len, cfg.train.micro_batch_size,
                           cfg.data.shuffle_seed, micro_steps=cfg.train.grad_accum_steps)
    positions = []
    for step in range(1, 65):  # where steps 60-64 of a run from the start with 2 groups read
        replay.begin_step(None, 2)
        if step >= 60:
            positions.append(replay.state_dict())
        replay.end_step(committed=True)
    poisoned = [[positions[0]["epoch"], positions[0]["cursor"], replay.state_dict()["cursor"]]]
    for rid in restarted:
        group_dir = tmp_path / "job" / "groups" / rid
        (record,) = [json.loads(line) for line in (group_dir / "skipped_data.jsonl").read_text().splitlines()]
        assert record["steps"] == [60, 64] and record["positions"] == poisoned, (record, poisoned)
        assert '"critical"' not in "".join(p.read_text() for p in group_dir.glob("events-*.jsonl")), "a second spike"
        assert train_rows(tmp_path, rid)[0]["step"] == 41, "the restart did not load the checkpoint at step 40"
    before = [r["loss"] for r in train_rows(tmp_path, "g0000") if 40 < r["step"] < 60]
    after = [r["loss"] for rid in restarted for r in train_rows(tmp_path, rid) if r["step"] >= 65]
    assert after and max(after) <= max(before) * 1.1, (max(before), max(after))


def test_hung_group_is_detected_replaced_and_its_stuck_rank_and_frame_named(tmp_path):
    """Issue 14, item 1: a hung group was killed with nothing kept but "hang". Now, before the kill,
    every rank's stack and flight record is read (py-spy, a signal; in parallel, within
    capture_timeout_s) into incidents/<id>/, and the event names the rank that hangs (rank 1; rank 0
    only waits for it in a TP collective) and the user's frame it is stuck in (the trainer's call into
    the injector, not the injector's sleep). A 6 s heartbeat timeout is ~50 of this model's TP=2 steps
    under load, and a save reports progress (see the test below); start-up has its own grace."""
    path = job_file(tmp_path, steps=20, active=1, spares=0, nodes=2, interval=5, inject=["hang@12:group=0:rank=1"],
                    train_overrides=["train.tp=2"], supervisor={"heartbeat_timeout_s": 6, "startup_grace_s": 120})
    result = supervise(path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    ev = events(tmp_path)
    (hung,) = [e for e in ev if e["event"] == "group_failed"]
    assert (hung["replica_id"], hung["reason"], hung["culprit_rank"]) == ("g0000", "hang", 1), hung
    assert re.fullmatch(r"(Trainer\.)?train at train\.py:\d+", hung["stuck_in"]), hung  # py-spy: Trainer.train
    assert f"rank 1 stuck in {hung['stuck_in']}" in hung["message"], hung["message"]
    incident = Path(hung["incident"])
    assert incident.parent == tmp_path / "job" / "incidents"
    stack = (incident / "stacks-r1.txt").read_text()
    assert "read by py-spy" in stack and "before_step (" in stack and "faults.py" in stack, stack
    decision = json.loads((incident / "decision.json").read_text())
    assert decision["kind"] == "hang" and "not waiting on peers" in decision["why"], decision
    assert sorted(decision["ranks"]) == ["0", "1"] and decision["capture_seconds"] <= 10
    # torch's flight recorder (Gloo records too): rank 0 waits in a TP collective rank 1 never entered
    last = decision["last_collectives"]
    assert last["0"]["default_pg"]["seq"] == last["1"]["default_pg"]["seq"] + 1, last
    assert (incident / "log_tail.txt").read_text().strip() and (incident / "metrics-r0.txt").exists()
    assert ev[-1]["event"] == "job_finished"
    assert "g0001" in {e["replica_id"] for e in ev if e["event"] == "group_started"}  # from the checkpoint


@pytest.mark.parametrize("edit,field", [
    ({"cluster": {"exclude": ["node-9"]}}, "cluster.exclude[0]"),
    ({"train_overrides": ["train.tp=3"]}, "train.tp"),
    ({"active": 4, "spares": 1}, "cluster.active_groups"),
    ({"job": {"trainer_config": None}}, "job.trainer_config"),
    ({"cluster": {"nodes": ["../etc", "n1", "n2", "n3"]}}, "cluster.nodes[0]"),  # it becomes drain/NAME, nodes/NAME
    # the graceful stop would outlast Slurm's warning (60 s) and be SIGKILLed mid-save at the time limit
    ({"cluster": {"launcher": "slurm"}, "supervisor": {"stop_grace_s": 55}}, "supervisor.stop_grace_s"),
])
def test_bad_job_files_are_refused_before_anything_starts(tmp_path, edit, field):
    path = job_file(tmp_path, **edit)
    result = run_watchtower("supervise", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "job").exists(), "nothing may start before the job file is valid"


# ---- issue 12: the shell never takes the job down; no orphans ---------------------------------------------

@pytest.fixture
def in_process():
    """Run a Supervisor on a thread of this process (so a test can stop its Lighthouse or break its
    I/O); afterwards stop it and SIGKILL every group it started, whatever happened."""
    started: list[tuple[Supervisor, threading.Thread]] = []

    def start(path: Path) -> tuple[Supervisor, dict]:
        job, trainer = load_job(str(path))
        sup, result = Supervisor(job, trainer), {}
        thread = threading.Thread(target=lambda: result.setdefault("code", sup.run()), daemon=True)
        thread.start()
        started.append((sup, thread))
        return sup, result

    yield start
    for sup, thread in started:
        sup.request_stop()
        thread.join(timeout=60)
        for g in list(sup.groups.values()):
            try:
                os.killpg(g.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_lighthouse_outage_and_a_web_page_on_a_ranks_port_drain_no_node(tmp_path, in_process):
    """The Lighthouse was never watched: when it died every group failed its quorum, nodes were
    drained and the job ended as a misdiagnosed crash loop. A ValueError from parsing an HTML page on
    a rank's port reached run()'s `finally` and SIGKILLed every group. Now: the page is counted in
    errors_total{stage="scrape"}, the Lighthouse is restarted on its address, no node is drained and
    the job finishes."""
    sup, result = in_process(job_file(tmp_path, steps=60, active=2, spares=0, nodes=2, interval=10,
                                      supervisor={"ft_timeout_s": 5, "lighthouse_grace_s": 20}))
    alive = lambda: None if "code" not in result else pytest.fail(f"supervisor ended early: {result}")  # noqa: E731
    wait_until(lambda: sup.stats.job_step >= 10, "the job past step 10 (its first checkpoint)", abort=alive)
    page = ServedText(lambda: "<!DOCTYPE html>\n<html><body>Welcome to nginx!</body></html>\n", "text/html")
    endpoint = tmp_path / "job" / "groups" / "g0000" / "endpoint-r0.json"
    real = endpoint.read_text()
    try:
        endpoint.write_text(json.dumps({"port": page.server.server_address[1]}))
        wait_until(lambda: sup.errors.snapshot()["scrape"] >= 2, "two scrapes of the web page counted", abort=alive)
    finally:
        endpoint.write_text(real)
        page.close()
    assert not [e for e in events(tmp_path) if e["event"] == "group_failed"], "the web page killed a group"
    at_outage = sup.stats.job_step
    url = sup.lighthouse.url
    sup.lighthouse.stop()
    wait_until(lambda: "code" in result, "the job to finish after the outage", timeout=WAIT_CEILING_S)
    assert result["code"] == 0, events(tmp_path)[-5:]
    ev = events(tmp_path)
    kinds = [e["event"] for e in ev]
    assert "lighthouse_restarted" in kinds and sup.lighthouse.url == url
    assert "node_drained" not in kinds, [e["message"] for e in ev if e["event"] == "group_failed"]
    assert not [e for e in ev if e["event"] == "group_failed" and (e["drained"] or e["counted"])]
    assert sup.stats.job_step == 60 > at_outage


def live_group_pids(tmp_path: Path, run: int = 0) -> set[int]:
    """Every live process in the process groups of the groups that supervisor run `run` (0: the
    first in events.jsonl) started: their launchers and TP ranks. Zombies count as dead."""
    runs: list[list[dict]] = [[]]
    for e in events(tmp_path):
        if e["event"] == "job_started":
            runs.append([])
        runs[-1].append(e)
    leaders = {e["pid"] for e in runs[run + 1] if e["event"] == "group_started"}
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # gone while we looked
        if int(pgrp) in leaders and state != "Z":
            pids.add(int(stat.parent.name))
    return pids


def checkpoint_steps(job_dir: Path) -> list[int]:
    return sorted(int(m.parent.name[5:]) for m in (job_dir / "checkpoints").glob("step-*/manifest.json"))


@pytest.fixture
def supervisors(processes):
    """`supervise` processes of one job dir; afterwards each is SIGKILLed and so is every group any
    of them started (by process group, from events.jsonl), whatever happened."""
    job_dirs: list[Path] = []

    def start(path: Path, job_dir: Path) -> subprocess.Popen:
        job_dirs.append(job_dir)
        return processes.start(watchtower_cmd("supervise", str(path)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    yield start
    processes.stop_all()
    for job_dir in job_dirs:
        for e in events(job_dir.parent):
            if e["event"] == "group_started":
                try:
                    os.killpg(e["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_supervisor_death_leaves_no_orphans_and_a_job_dir_has_one_supervisor(tmp_path, supervisors):
    """Groups ran in their own sessions and the supervisor had no parent-death signal and no SIGTERM
    handler: `kill` or an OOM kill left every group (and its TP ranks) training unsupervised, and a
    second `supervise` on the same directory started a second set of writers of the same checkpoints.
    Now: SIGKILL of the supervisor takes every rank down within 5 s; the next supervisor resumes from
    the last checkpoint; a third, while that one lives, is refused (exit 2); SIGTERM stops every
    group and the Lighthouse within 15 s, writes the event and exits 143."""
    job_dir = tmp_path / "job"
    path = job_file(tmp_path, steps=3000, active=1, spares=0, nodes=1, interval=10,
                    train_overrides=["train.tp=2", "train.log_interval=1"])
    first = supervisors(path, job_dir)
    running = lambda: None if first.poll() is None else pytest.fail(first.stderr.read()[-3000:])  # noqa: E731
    wait_until(lambda: checkpoint_steps(job_dir) and len(live_group_pids(tmp_path)) == 3,
               "a checkpoint and a group of a launcher + 2 TP ranks", abort=running)
    first.kill()
    first.wait()
    wait_until(lambda: not live_group_pids(tmp_path), "every rank of the first run gone", timeout=5, interval=0.1)
    resume_from = checkpoint_steps(job_dir)[-1]

    second = supervisors(path, job_dir)
    running = lambda: None if second.poll() is None else pytest.fail(second.stderr.read()[-3000:])  # noqa: E731
    started = wait_until(lambda: [e["replica_id"] for e in events(tmp_path)[1:] if e["event"] == "group_started"
                                  and e["replica_id"] != "g0000"], "the second run's group", abort=running)
    assert started == ["g0001"], "a resumed run must not reuse a dead run's group directories"
    first_row = wait_until(lambda: [r["step"] for g in started if (job_dir / "groups" / g / "train_log.jsonl").exists()
                                    for r in train_rows(tmp_path, g)[:1]], "the resumed run's first step",
                           abort=running)
    assert min(first_row) == resume_from + 1

    third = run_watchtower("supervise", str(path))
    assert third.returncode == 2 and "live supervisor" in third.stderr.strip().splitlines()[-1], third.stderr

    lighthouse = next(e["lighthouse"] for e in reversed(events(tmp_path)) if e["event"] == "job_started")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 143, second.stderr.read()[-3000:]
    wait_until(lambda: not live_group_pids(tmp_path, run=1), "every rank of the second run gone", timeout=1)
    last = events(tmp_path)[-1]
    assert last["event"] == "job_stopped" and last["signal"] == "SIGTERM" and last["exit_code"] == 143
    host, port = lighthouse.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # the Lighthouse went with its supervisor
        socket.create_connection((host, int(port)), timeout=1).close()


def assert_valid_checkpoint(job_dir: Path, step: int) -> None:
    """step-N/ has a sound manifest and every file it lists has the size and sha256 it records."""
    import hashlib

    from watchtower.trainer.checkpoint import manifest_problem

    (folder,) = [m.parent for m in (job_dir / "checkpoints").glob(f"step-{step:08d}*/manifest.json")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest_problem(manifest) is None, manifest
    for entry in manifest["files"]:
        data = (folder / entry["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), entry


def test_sigusr1_lost_the_steps_since_the_last_checkpoint_now_every_group_saves_at_one_agreed_step(
        tmp_path, supervisors):
    """Issue 13, item 4: Slurm's time-limit warning (SIGUSR1) killed every group at once and the next
    run resumed from the last periodic checkpoint, losing up to an interval. Now the supervisor asks
    every group to save after one agreed step (ahead of all of them) and exit: a valid checkpoint of
    that step between the periodic ones, each group exiting on request by itself, exit 138, no rank
    left; the next `supervise` resumes right after that step."""
    job_dir = tmp_path / "job"
    path = job_file(tmp_path, steps=3000, active=2, spares=0, nodes=2, interval=500,
                    train_overrides=["train.log_interval=1"])
    first = supervisors(path, job_dir)
    running = lambda: None if first.poll() is None else pytest.fail(first.stderr.read()[-3000:])  # noqa: E731
    wait_until(lambda: (job_dir / "groups" / "g0000" / "train_log.jsonl").exists(), "the first logged step",
               abort=running)
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=60) == 138, first.stderr.read()[-3000:]
    wait_until(lambda: not live_group_pids(tmp_path), "every rank of the first run gone", timeout=1)
    ev = events(tmp_path)
    (asked,) = [e for e in ev if e["event"] == "stop_requested"]
    step = asked["stop_after_step"]
    stopped = ev[-1]
    assert stopped["event"] == "job_stopped" and stopped["signal"] == "SIGUSR1", stopped
    assert stopped["checkpoint_saved"] and stopped["groups_killed"] == [], stopped
    assert stopped["groups_stopped"] == ["g0000", "g0001"], stopped
    assert checkpoint_steps(job_dir) == [step] and step % 500, "not the agreed step, or a periodic one"
    assert_valid_checkpoint(job_dir, step)
    assert max(r["step"] for g in ("g0000", "g0001") for r in logged_rows(tmp_path, g)) == step
    assert not (job_dir / "stop-request.json").exists(), "a stale request would stop the next run"

    second = supervisors(path, job_dir)
    running = lambda: None if second.poll() is None else pytest.fail(second.stderr.read()[-3000:])  # noqa: E731
    first_row = wait_until(lambda: [r["step"] for g in ("g0002", "g0003") for r in logged_rows(tmp_path, g)[:1]],
                           "the resumed run's first step", abort=running)
    assert min(first_row) == step + 1
    second.send_signal(signal.SIGTERM)  # stops at once (the 15 s guarantee), no save
    assert second.wait(timeout=15) == 143, second.stderr.read()[-3000:]
    assert events(tmp_path)[-1].get("checkpoint_saved") is None


def test_a_checkpoint_save_longer_than_the_heartbeat_timeout_is_not_judged_a_hang(tmp_path, monkeypatch):
    """Review 12, U2: the heartbeat moves only when a step ends, and a save reported nothing, so a save
    longer than heartbeat_timeout_s made the saver the only stale group not waiting on peers: killed
    as a hang, its node drained, its checkpoint never committed (the final save too). The trainer now
    reports progress around the save; what its /metrics says mid-save, the policy judges a slow phase."""
    from prometheus_client import generate_latest

    from watchtower.supervisor.hangs import silence_s
    from watchtower.supervisor.policy_types import GroupView, PolicyConfig
    from watchtower.trainer import train as train_mod

    cfg = load_config("tiny", [("train.steps", 2), ("run.output_dir", str(tmp_path)), ("monitor.port", 0),
                               ("data.max_bytes", 200_000), ("checkpoint.interval_steps", 1),
                               ("checkpoint.dir", str(tmp_path / "checkpoints"))])
    trainer = train_mod.Trainer(cfg)
    policy = PolicyConfig(nodes=("n0",), heartbeat_timeout_s=30, startup_grace_s=60)
    judged = []
    save = trainer.checkpointer.save

    def judged_mid_save(step, state, meta):
        rank = samples(generate_latest(trainer.monitor.registry).decode())
        beat = value(rank, "watchtower_heartbeat_timestamp_seconds")
        mid_save = GroupView("g0000", "n0", 0.0, heartbeat=beat, step=step,
                             progress_at=value(rank, "watchtower_progress_timestamp_seconds"))
        judged.append(silence_s(mid_save, beat + 45, policy))  # 45 s into the save: past the heartbeat timeout
        save(step, state, meta)

    monkeypatch.setattr(trainer.checkpointer, "save", judged_mid_save)
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    assert len(judged) == 2 and all(s < 0 for s in judged), judged  # step 1's save and the final one
