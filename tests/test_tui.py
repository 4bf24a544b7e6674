"""The terminal UI: Pilot tests drive the keys, snapshot tests pin the screens, a real trainer's
numbers appear in the table, a target that dies turns "DOWN" within two polls, and tmux shows it
working in a real terminal."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from conftest import REPO, free_port, run_watchtower, samples, scrape_text, value, wait_for_metrics, watchtower_cmd
from held_start import HeldStart
from served_text import ServedText
from waiting import WAIT_CEILING_S, wait_for_loss_spike_page, wait_until
from watchtower.tui.app import HelpScreen, RunScreen, RunsScreen, WatchtowerApp
from watchtower.tui.sources import ScrapeSource

DATA = Path(__file__).parent / "data" / "tui"
HEARTBEAT = re.compile(r"^(watchtower_heartbeat_timestamp_seconds\{[^}]*\}) \S+$", re.M)


class RecordedRanks:
    """Serves /metrics recorded from a real TP=2 run (tests/data/tui/*.prom), one port per rank,
    with the heartbeat set to the time of each scrape (so the heartbeat age reads 0s)."""

    def __init__(self) -> None:
        self.servers = []
        self.targets = []
        for path in sorted(DATA.glob("*.prom")):
            served = ServedText(lambda text=path.read_text(): HEARTBEAT.sub(lambda m: f"{m.group(1)} {time.time()}", text))
            self.servers.append(served)
            self.targets.append(served.address)

    def close(self) -> None:
        for served in self.servers:
            served.close()


@pytest.fixture
def recorded():
    ranks = RecordedRanks()
    yield ranks
    ranks.close()


@pytest.fixture
def utc():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ")
    else:
        os.environ["TZ"] = old
    time.tzset()


def recorded_app(recorded, run=None, dead=False) -> WatchtowerApp:
    targets = recorded.targets + ([f"127.0.0.1:{free_port()}"] if dead else [])
    return WatchtowerApp(ScrapeSource(targets, events_file=DATA / "events.jsonl"), interval=3600, run=run,
                         timestamps=False)


async def polls(app: WatchtowerApp, pilot, n: int, timeout: float = WAIT_CEILING_S) -> None:
    deadline = time.monotonic() + timeout
    while app.polls < n:
        assert time.monotonic() < deadline, f"only {app.polls} polls in {timeout}s"
        await pilot.pause(0.05)
    await pilot.pause()


def table_rows(app: WatchtowerApp, table_id: str) -> list[list[str]]:
    table = app.screen.query_one(f"#{table_id}", DataTable)
    return [[str(c).strip() for c in table.get_row_at(i)] for i in range(table.row_count)]


async def first_poll(pilot) -> None:
    await polls(pilot.app, pilot, 1)


# ---- Pilot: keys ------------------------------------------------------------------------------------

def test_keys_open_a_run_sort_filter_jump_to_the_worst_and_help(recorded):
    async def drive():
        app = recorded_app(recorded, dead=True)
        async with app.run_test(size=(80, 24)) as pilot:
            await polls(app, pilot, 1)
            assert isinstance(app.screen, RunsScreen)
            runs = {row[0]: row for row in table_rows(app, "runs")}
            assert runs["smol"][1:4] == ["2", "4", "0"] and runs["unreachable"][3] == "1"
            assert runs["smol"][7] == "1", "the loss-spike detector event counts as an alert of run smol"
            await pilot.press("down" if table_rows(app, "runs")[0][0] != "smol" else "up", "enter")
            assert isinstance(app.screen, RunScreen) and app.screen.run == "smol"
            rows = table_rows(app, "ranks")
            assert rows[0][:2] == ["1", "1"] and rows[0][9].endswith("!"), "worst first: the straggler, marked"
            await pilot.press("s")  # worst -> rank
            assert [(r[0], r[1]) for r in table_rows(app, "ranks")] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
            await pilot.press("w")
            assert app.screen.query_one("#ranks", DataTable).cursor_row == 3
            await pilot.press("slash", *"node-a", "enter")
            assert {r[2] for r in table_rows(app, "ranks")} == {"node-a"}
            await pilot.press("escape")  # clears the filter
            assert len(table_rows(app, "ranks")) == 4
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert isinstance(app.screen, RunScreen)
            await pilot.press("escape")
            assert isinstance(app.screen, RunsScreen)
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(drive())


def test_run_view_shows_the_goodput_line_its_supervisor_serves(recorded, tmp_path):
    """Issue 14, item 3: the run view's goodput line, read from the supervisor's /metrics (found in
    supervisor_targets.json beside the ranks' targets.json, as the supervisor writes them)."""
    body = ('watchtower_goodput_ratio{run="smol"} 0.62\n'
            'watchtower_badput_seconds_total{cause="startup",run="smol"} 40.0\n'
            'watchtower_badput_seconds_total{cause="idle_spare",run="smol"} 12.5\n'
            'watchtower_badput_seconds_total{cause="recovery",run="smol"} 0.0\n')
    supervisor = ServedText(lambda: body)
    (tmp_path / "targets.json").write_text(json.dumps([{"targets": recorded.targets, "labels": {}}]))
    (tmp_path / "supervisor_targets.json").write_text(json.dumps([{"targets": [supervisor.address], "labels": {}}]))

    async def drive():
        app = WatchtowerApp(ScrapeSource(targets_file=tmp_path / "targets.json"), interval=3600, run="smol",
                            timestamps=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await polls(app, pilot, 1)
            line = app.screen.query_one("#goodput")
            assert line.display and str(line.render()) == "goodput 62%   lost: startup 40s, idle_spare 12s"

    try:
        asyncio.run(drive())
    finally:
        supervisor.close()


def test_run_view_shows_a_ranks_gpu_memory_peaks_and_marks_allocator_retries():
    """Issue 16, item 6: a rank with CUDA serves the allocator's peaks, retries and OOMs; its mem cell
    is marked and the line under the table spells them out for the highlighted rank (hidden on CPU)."""
    rank = 'run="gpu",replica_group="0",rank="0",node="n0"'
    body = (f'watchtower_train_step{{{rank}}} 40\n'
            f'watchtower_gpu_memory_used_bytes{{{rank},gpu="0"}} 6.0e10\n'
            f'watchtower_gpu_memory_total_bytes{{{rank},gpu="0"}} 8.0e10\n'
            f'watchtower_gpu_memory_peak_allocated_bytes{{{rank},gpu="0"}} 5.12e10\n'
            f'watchtower_gpu_memory_peak_reserved_bytes{{{rank},gpu="0"}} 6.5e10\n'
            f'watchtower_gpu_allocator_retries_total{{{rank},gpu="0"}} 7\n'
            f'watchtower_gpu_allocator_ooms_total{{{rank},gpu="0"}} 0\n')
    served = ServedText(lambda: body)

    async def drive():
        app = WatchtowerApp(ScrapeSource([served.address]), interval=3600, run="gpu", timestamps=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await polls(app, pilot, 1)
            assert table_rows(app, "ranks")[0][11] == "75%!"
            line = app.screen.query_one("#memory")
            assert line.display and str(line.render()) == (
                "g0 r0 n0  GPU peak 51.2G alloc / 65.0G reserved of 80.0G  retries 7  OOMs 0")

    try:
        asyncio.run(drive())
    finally:
        served.close()


def test_run_view_shows_tokens_per_parameter_beside_the_compute_optimal_reference():
    """Issue 15, item 4: D/N now and planned, the busiest rank's (a hot spare reports none), beside
    Chinchilla's 20; hidden while no rank reports it (the recorded runs above predate the metric)."""
    body = ('watchtower_train_step{run="d",replica_group="0",rank="0",node="n0"} 300\n'
            'watchtower_tokens_per_parameter{run="d",replica_group="0",rank="0",node="n0"} 3.21\n'
            'watchtower_planned_tokens_per_parameter{run="d",replica_group="0",rank="0",node="n0"} 4400\n'
            'watchtower_train_step{run="d",replica_group="1",rank="0",node="n1"} 300\n')
    served = ServedText(lambda: body)

    async def drive():
        app = WatchtowerApp(ScrapeSource([served.address]), interval=3600, run="d", timestamps=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await polls(app, pilot, 1)
            line = app.screen.query_one("#budget")
            assert line.display and str(line.render()) == "tokens/param 3.2 now, 4,400 planned   compute-optimal 20"

    try:
        asyncio.run(drive())
    finally:
        served.close()


# ---- snapshots -------------------------------------------------------------------------------------

def test_snapshot_runs_view(recorded, utc, snap_compare):
    assert snap_compare(recorded_app(recorded, dead=True), terminal_size=(80, 24), run_before=first_poll)


def test_snapshot_run_view(recorded, utc, snap_compare):
    assert snap_compare(recorded_app(recorded, run="smol"), terminal_size=(80, 24), run_before=first_poll)


def test_snapshot_help(recorded, utc, snap_compare):
    assert snap_compare(recorded_app(recorded, run="smol"), press=["question_mark"], terminal_size=(80, 24),
                        run_before=first_poll)


# ---- a real trainer ----------------------------------------------------------------------------------

# The TUI shows numbers, not their quality: a step on 2x32 tokens costs ~9 ms of CPU against ~95 ms at
# tiny's 8x128 (measured 2026-11-27), on a CI machine whose 2 cores the other lane shares.
LIGHT_BATCH = ("--train.seq_len", "32", "--train.micro_batch_size", "2")


def start_trainer(processes, tmp_path, run: str, steps: int, *extra: str,
                  port: int | None = None) -> tuple[int, subprocess.Popen]:
    """A tiny trainer on `port` (a free one by default) that keeps serving its last /metrics after
    the run for longer than any test lasts (the `processes` fixture ends it)."""
    port = port or free_port()
    proc = processes.start(watchtower_cmd(
        "train", "--config", "tiny", "--steps", str(steps), "--run", run, "--port", str(port),
        "--output-dir", str(tmp_path / run), "--monitor.bind", "127.0.0.1", "--monitor.linger_s", "600",
        *LIGHT_BATCH, *extra),
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return port, proc


SHOWN = ("watchtower_train_step", "watchtower_loss", "watchtower_data_wait_ratio")  # the row's numbers compared


def test_real_trainer_numbers_appear_and_a_dead_rank_turns_down_within_two_polls(processes, tmp_path):
    port, proc = start_trainer(processes, tmp_path, "live", 30)
    wait_for_metrics(port, lambda s: value(s, "watchtower_train_step") == 30, proc=proc)

    async def drive():
        app = WatchtowerApp(ScrapeSource([f"127.0.0.1:{port}"]), interval=0.5, run="live")
        async with app.run_test(size=(80, 24)) as pilot:
            # The step counts as done before its loss and data-wait reach the metrics (the monitor's
            # flush, at the run's end for the last step): compare with numbers served unchanged from
            # before a poll until after it, so that poll read those (two polls: one may be under way).
            deadline = time.monotonic() + WAIT_CEILING_S
            while True:
                served = samples(scrape_text(port))
                await polls(app, pilot, app.polls + 2)
                scraped = samples(scrape_text(port))
                if all(value(served, name) == value(scraped, name) for name in SHOWN):
                    break
                assert time.monotonic() < deadline, "the rank's numbers never held still for a poll"
            row = table_rows(app, "ranks")[0]
            assert row[3] == "up" and row[4] == "30"
            assert row[5] == f"{value(scraped, 'watchtower_loss'):.3f}"
            assert row[8] == f"{value(scraped, 'watchtower_data_wait_ratio'):.0%}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = app.polls
            await polls(app, pilot, killed_at + 2)
            row = table_rows(app, "ranks")[0]
            assert row[3] == "DOWN" and row[4] == "-", row
            assert "up 0/1" in app.status_line()

    asyncio.run(drive())


def test_tmux_smoke_in_a_real_terminal(recorded):
    assert shutil.which("tmux"), "tmux is missing: .ci/run installs it"
    session = f"wt{os.getpid()}"
    cmd = " ".join(watchtower_cmd("tui", "--targets", ",".join(recorded.targets), "--interval", "1"))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"cd {REPO} && {cmd}"],
                   check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        def wait_for(text: str) -> str:
            def shown() -> str | None:
                text_now = screen()
                return text_now if text in text_now else None
            try:
                return wait_until(shown, f"{text!r} on the screen")
            except AssertionError as e:
                raise AssertionError(f"{e}; the screen:\n{screen()}") from None

        shown = wait_for("smol")
        assert "up 4/4" in shown
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        shown = wait_for("node-b")
        assert "loss" in shown and "tokens/s" in shown
        subprocess.run(["tmux", "send-keys", "-t", session, "?"], check=True)
        wait_for("jump to the worst rank")
        subprocess.run(["tmux", "send-keys", "-t", session, "Escape"], check=True)
        # (the next key waits for the help to close: one sent right after Escape would read as Alt+key)
        wait_until(lambda: "jump to the worst rank" not in screen(), "escape to close the help")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        wait_until(lambda: subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0,
                   "q to quit the TUI")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.parametrize("args, field", [
    (["--targets", "nohost"], "--targets"),
    (["--prometheus", "prometheus:9090"], "--prometheus"),
    (["--targets-file", "/nonexistent/targets.json"], "--targets-file"),
    (["--targets", "127.0.0.1:1", "--interval", "0"], "--interval"),
])
def test_bad_tui_arguments_are_refused_naming_the_flag(args, field, tmp_path):
    result = run_watchtower("tui", *args, cwd=tmp_path)
    assert result.returncode == 2 and field in result.stderr, result.stderr


def test_prometheus_source_reads_ranks_alerts_and_down_targets(processes, tmp_path):
    """Through a real Prometheus and Alertmanager: the trainers' numbers, the loss-spike page as an
    alert, and a killed rank as DOWN (Prometheus's `up`)."""
    from watchtower.alerting_stack import AlertingStack
    from watchtower.prometheus_config import Target
    from watchtower.tui.sources import PrometheusSource

    ports = {"spiky": free_port(), "victim": free_port()}
    with AlertingStack(tmp_path / "stack") as stack:
        stack.set_targets([Target(f"127.0.0.1:{ports['spiky']}", "spiky", 0, 0, "node-s"),
                           Target(f"127.0.0.1:{ports['victim']}", "victim", 0, 0, "node-v")])
        # Prometheus must read the spike counter at 0 before step 40 (see wait_for_loss_spike_page): the
        # trainers start at once, held before their first step, and train once Prometheus scraped both.
        held = HeldStart(tmp_path / "cache")
        _, spiky = start_trainer(processes, tmp_path, "spiky", 60, "--inject", "loss_spike@40", *held.trainer_args,
                                 port=ports["spiky"])
        _, victim = start_trainer(processes, tmp_path, "victim", 60, *held.trainer_args, port=ports["victim"])
        wait_until(lambda: len(stack.prometheus_api("/api/v1/query", query='up{job="watchtower-ranks"} == 1')["result"]) == 2,
                   "Prometheus to scrape both held trainers")
        held.release()
        for port, proc in ((ports["spiky"], spiky), (ports["victim"], victim)):
            wait_for_metrics(port, lambda s: value(s, "watchtower_train_step") == 60, proc=proc)
        wait_for_loss_spike_page(stack, "spiky")
        source = PrometheusSource(stack.prometheus_url, stack.alertmanager_url)

        def both_runs_at_step_60():
            snap = source.poll()
            rows = {r.run: r for r in snap.rows}
            done = {"spiky", "victim"} <= set(rows) and all(r.step == 60 for r in rows.values())
            return (snap, rows) if done else None

        snap, rows = wait_until(both_runs_at_step_60, "PrometheusSource to show both runs at step 60", interval=0.5)
        assert not snap.error
        assert rows["spiky"].node == "node-s" and rows["spiky"].loss is not None and rows["spiky"].up
        assert any(a.name == "WatchtowerLossSpike" and a.run == "spiky" and a.severity == "page" for a in snap.alerts)
        os.killpg(victim.pid, signal.SIGKILL)
        wait_until(lambda: any(r.run == "victim" and not r.up for r in source.poll().rows),
                   "the killed rank to turn DOWN", interval=0.5)
    broken = PrometheusSource(f"http://127.0.0.1:{free_port()}").poll()
    assert broken.error and not broken.rows  # an unreachable Prometheus is a status line, not a crash


def test_direct_scrapes_ignore_an_http_proxy_in_the_environment(recorded, monkeypatch):
    """A login node often exports http_proxy for the outside world; urllib would send our own
    scrapes to it and every rank would read DOWN. Direct scrapes never use a proxy."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: a proxied request fails
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    snap = ScrapeSource(recorded.targets).poll()
    assert len(snap.rows) == len(recorded.targets)
    assert all(row.up for row in snap.rows), [(r.target, r.up) for r in snap.rows]
