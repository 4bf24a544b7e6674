"""The monitor inside the real trainer (TP=2 on Gloo, TP=1 where the test is not about TP), read over
HTTP from /metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import Processes, free_port_pair, value, wait_for_metrics, watchtower_cmd
from waiting import wait_until
from test_metrics import assert_promtool_clean

DETECTORS = ("loss_spike", "nonfinite", "data_stall", "data_wait_rising", "throughput_drop",
             "tp_replicated_divergence", "tp_identical_shards", "dp_drift")


def tiny_parameters() -> int:
    """The `tiny` preset's whole model, counted here independently of the trainer."""
    from watchtower.config import load_config
    from watchtower.trainer.model import Transformer

    return sum(p.numel() for p in Transformer(load_config("tiny").model).parameters())


def events(scraped, rank: str) -> dict[str, float]:
    return {d: sum(value(scraped, "watchtower_detector_events_total", detector=d, rank=rank, severity=s) or 0
                   for s in ("warning", "critical")) for d in DETECTORS}


def start_run(processes, tmp_path, steps: int, *flags: str, tp: int = 2):
    """`processes`: the registry (a Processes) that stops the run. Returns each rank's /metrics port,
    as the rank wrote it: rank 1 asks for base + 1, but binds it seconds later (after torch's import)
    and moves up if a connection took it meanwhile (seen under the suite's two lanes).
    A TP=2 run costs ~10 s more than TP=1 before its first step (two ranks import torch on 2 cores)
    and about twice as much per step: `tp=1` where the test is not about TP."""
    out = tmp_path / "run"
    proc = processes.start(watchtower_cmd(
        "train", "--config", "tiny", "--tp", str(tp), "--steps", str(steps), "--port", str(free_port_pair()),
        "--run", "live", "--output-dir", str(out), "--monitor.linger_s", "30", "--monitor.bind", "127.0.0.1",
        *flags), stderr=subprocess.PIPE, text=True)
    final = lambda s: value(s, "watchtower_train_step") == steps  # noqa: E731
    return served_ports(proc, out, tp), proc, final


def served_ports(proc: subprocess.Popen, out: Path, tp: int) -> dict[str, int]:
    """{rank: port} from the endpoint file each rank writes once its /metrics is up."""
    def every() -> dict[str, int] | None:
        try:
            return {str(rank): json.loads((out / f"endpoint-r{rank}.json").read_text())["port"] for rank in range(tp)}
        except (OSError, ValueError):  # not written yet
            return None

    def exited() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"the run exited with {proc.returncode} before every rank served /metrics")

    return wait_until(every, "every rank's endpoint file", abort=exited)


def test_clean_run_exports_every_rank_and_fires_nothing(processes, tmp_path):
    # 30 steps (was 60, ~1 s a step under the suite's load): the loss detector judges the 10 after
    # its 20-step warmup; parallel checks every 20 steps, so steps 1 and 20 check (tiny: every 50)
    steps = 30
    ports, proc, final = start_run(processes, tmp_path, steps, "--monitor.parallel_check_interval", "20")
    for rank, p in ports.items():
        s = wait_for_metrics(p, final, proc=proc)
        assert value(s, "watchtower_run_info", run="live", rank=rank, replica_group="0") == 1
        assert value(s, "watchtower_steps_total") == steps
        assert value(s, "watchtower_tokens_total") == steps * 8 * 128
        assert value(s, "watchtower_tokens_per_second") > 0
        # D/N: the whole model's parameters on both TP ranks (a DTensor counts in full), planned = now at the end
        assert value(s, "watchtower_tokens_per_parameter") == pytest.approx(steps * 8 * 128 / tiny_parameters())
        assert value(s, "watchtower_planned_tokens_per_parameter") == value(s, "watchtower_tokens_per_parameter")
        assert 0 <= value(s, "watchtower_data_wait_ratio") < 0.5
        assert value(s, "watchtower_loss") < 5.0
        assert value(s, "watchtower_grad_norm") > 0
        assert value(s, "watchtower_heartbeat_timestamp_seconds") > 1e9
        assert value(s, "watchtower_process_resident_memory_bytes") > 1e6
        assert value(s, "watchtower_parallel_check_ok", check="tp_replicated") == 1
        assert value(s, "watchtower_parallel_check_ok", check="tp_shards_distinct") == 1
        assert value(s, "watchtower_parallel_checks_total", check="tp_replicated") == 2  # steps 1 and 20
        assert events(s, rank) == dict.fromkeys(DETECTORS, 0), "a clean run must not fire"
        hook_errors = [v for (name, _), v in s.items() if name == "watchtower_hook_errors_total"]
        assert hook_errors and not any(hook_errors), "every hook's error counter exists, at 0"


FAULTED_STEPS = 30
STALL_STEP, SPIKE_STEP, NAN_STEP = 10, 24, 27  # the spike after the loss detector's 20-step warmup


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    """One TP=2 run with a stall, a loss spike and a NaN step (skipped: tiny's nonfinite_action), shared by
    the tests that read its final scrape: each of them used to start a run of its own (~12 s each on 2
    cores). Yields the ports of ranks 0 and 1, each scraped to its final step; the run lingers 30 s."""
    registry = Processes()
    try:
        ports, proc, final = start_run(registry, tmp_path_factory.mktemp("faulted"), FAULTED_STEPS,
                                       "--inject", f"loss_spike@{SPIKE_STEP}", "--inject", f"nonfinite@{NAN_STEP}",
                                       "--inject", f"stall@{STALL_STEP}:2s")
        finals = {rank: wait_for_metrics(p, final, proc=proc) for rank, p in ports.items()}
        yield ports, finals
    finally:
        registry.stop_all()


def test_injected_faults_move_exactly_their_counters(faulted_run):
    _, finals = faulted_run
    s = finals["0"]
    fired = events(s, "0")
    assert fired == {**dict.fromkeys(DETECTORS, 0), "loss_spike": 1, "nonfinite": 1, "data_stall": 1}
    assert value(s, "watchtower_detector_events_total", detector="loss_spike", severity="critical") == 1
    assert value(s, "watchtower_detector_last_event_step", detector="loss_spike") == SPIKE_STEP
    assert value(s, "watchtower_detector_last_event_step", detector="nonfinite") == NAN_STEP
    assert value(s, "watchtower_detector_last_event_step", detector="data_stall") == STALL_STEP
    assert value(s, "watchtower_data_wait_seconds_total") >= 2.0
    # the NaN step was skipped, so training went on with finite numbers
    assert value(s, "watchtower_loss") < 5.0


def test_skipped_nonfinite_step_counts_as_skipped_not_as_a_step(faulted_run):
    _, finals = faulted_run
    for rank, s in finals.items():
        assert value(s, "watchtower_skipped_steps_total", rank=rank) == 1
        assert value(s, "watchtower_steps_total", rank=rank) == FAULTED_STEPS - 1
        assert value(s, "watchtower_tokens_total", rank=rank) == (FAULTED_STEPS - 1) * 8 * 128
        assert value(s, "watchtower_train_step", rank=rank) == FAULTED_STEPS, "the skipped step still counts as done"


def test_live_rank_scrape_is_promtool_clean_in_text_and_openmetrics(faulted_run):
    """Both TP ranks, with detector events exported, asked for each format the way Prometheus asks
    (OpenMetrics first)."""
    ports, _ = faulted_run
    for p in ports.values():
        assert_promtool_clean(p)


def test_slow_data_raises_the_wait_trend(processes, tmp_path):
    # The detector judges the wait's share of the step time, and the step time is the machine's: with
    # the defaults (share >= 0.2, rising 0.15) the injected wait (3 ms more every 10 steps) fired only
    # while steps took no more than ~1.25x what they took beside the other test lane. With 0.05 / 0.05
    # it fires exactly once over a wide range of step times. TP=1: the trend is one rank's own (a TP=2
    # run doubled the cost of this test). 32 steps, the wait growing 4 ms a step from step 10, fitted
    # over 20 steps: replayed on the step times of the suite's runs under load (0.03 to 0.8 s of
    # compute a step; this run's is ~0.1-0.3 s), it fired exactly once in 99-100% of them (the 70-step
    # TP=2 run, 30-step window, 3 ms a step from step 20: 92-98%: the only failure is a second event
    # after a burst of slow steps re-arms it, and fewer steps after the first event leave less room
    # for one); without noise it fires once up to 1.2 s of compute a step.
    ramp_start, ramp_per_10, steps = 10, 0.04, 32
    ports, proc, final = start_run(processes, tmp_path, steps, "--inject", f"slow_data@{ramp_start}:{ramp_per_10}s",
                                   "--monitor.data_stall.trend_window", "20",
                                   "--monitor.data_stall.min_share", "0.05", "--monitor.data_stall.share_rise", "0.05",
                                   tp=1)
    s = wait_for_metrics(ports["0"], final, proc=proc)
    fired = events(s, "0")
    assert fired["data_wait_rising"] == 1
    assert fired["loss_spike"] == fired["nonfinite"] == fired["data_stall"] == 0
    # The wait the fault injected (0.04 s x (step - 9) / 10 for steps 10..32) is a floor that does not
    # depend on how fast this machine computes; the wait *ratio* does (a loaded CI box halves it).
    injected = sum(ramp_per_10 * (step - ramp_start + 1) / 10 for step in range(ramp_start, steps + 1))
    assert value(s, "watchtower_data_wait_seconds_total") >= injected
    assert value(s, "watchtower_data_wait_ratio") > 0


def test_tp_seed_bug_is_flagged_at_the_first_check(processes, tmp_path):
    # 2 steps (was 5): the first check is step 1's; the run is almost all start-up either way
    ports, proc, final = start_run(processes, tmp_path, 2, "--inject", "tp_seed_bug")
    for rank, p in ports.items():
        s = wait_for_metrics(p, final, proc=proc)
        assert value(s, "watchtower_parallel_check_ok", check="tp_shards_distinct") == 0
        assert value(s, "watchtower_parallel_check_ok", check="tp_replicated") == 1
        assert value(s, "watchtower_detector_last_event_step", detector="tp_identical_shards") == 1
        assert events(s, rank)["tp_identical_shards"] == 1
