"""Warm standbys (watchtower.standby, launcher.Standbys): a trainer interpreter with torch imported,
started on a free node, that becomes the next group launched there.

Real processes: one real standby that trains (its imports are the point), and `sleep` processes for
the bookkeeping of which node keeps which standby (a standby's launcher cannot tell the difference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from waiting import wait_until
from watchtower.orphan_guard import guarded
from watchtower.standby import READY_SUFFIX
from watchtower.supervisor.launcher import GroupSpec, LocalLauncher, Standby, Standbys


@pytest.fixture
def procs():
    """Every process a test starts, SIGKILLed and reaped after it, pass or fail."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, 9)
            except (ProcessLookupError, PermissionError):
                p.kill()
        p.wait(timeout=10)


def tiny_config(tmp_path: Path, steps: int = 2) -> Path:
    path = tmp_path / "trainer.toml"
    path.write_text(f'[run]\noutput_dir = "{tmp_path / "run"}"\n[train]\nsteps = {steps}\n[monitor]\nport = 0\n'
                    '[model]\ndim = 32\nn_layers = 1\nn_heads = 2\n')
    return path


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def test_a_local_standby_imports_first_then_becomes_the_launched_group(tmp_path, procs):
    """keep_warm starts a standby on each free node; a launch there hands it the group (same pid, the
    group's log, its exit code), the other node's standby is stopped once that node is not free, and
    its ready marker goes with it: nothing of an unused standby is left."""
    launcher = LocalLauncher(tmp_path / "nodes")
    standbys = {}
    for node in ("n1", "n2"):  # one at a time: the second only once the first has imported
        launcher.keep_warm(["n1", "n2"])
        assert launcher.standbys.nodes() == sorted(standbys) + [node]
        standbys[node] = launcher.standbys._by_node[node]
        procs.append(standbys[node].proc)
        launcher.keep_warm(["n1", "n2"])
        assert launcher.standbys.nodes() == sorted(standbys), "a second standby started while one imports"
        wait_until(standbys[node].ready, f"the standby on {node} ready",
                   abort=lambda s=standbys[node]: None if alive(s.proc) else pytest.fail(f"standby {s.node} exited"))
    spec = GroupSpec("g0003", 3, "n1", tiny_config(tmp_path), tmp_path / "g0003" / "group.log")
    group = launcher.launch(spec)
    assert group.warm and group.standby_ready and group.pid == standbys["n1"].proc.pid
    launcher.keep_warm(["n2"], start_new=False)  # n1 now busy; n2 still free: kept
    assert alive(standbys["n2"].proc)
    assert group.proc.wait(timeout=120) == 0, spec.log_path.read_text()[-2000:]
    log = spec.log_path.read_text()
    assert "step     2" in log, log[-2000:]
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "nodes" / "n1").glob("standby-*")), "a taken order must not be found again"
    launcher.keep_warm([])  # no free node left
    assert standbys["n2"].proc.poll() is not None
    assert not list((tmp_path / "nodes" / "n2").glob(f"*{READY_SUFFIX}"))
    launcher.finish()


def sleeper(tmp_path: Path, procs: list, started: list[str]):
    """A start function for Standbys whose standbys are `sleep` processes, guarded, in their own session."""
    def start(node: str, name: str) -> Standby:
        proc = subprocess.Popen(guarded(["sleep", "600"]), start_new_session=True)
        procs.append(proc)
        started.append(node)
        standby = Standby(node, proc, tmp_path / f"{node}-{name}.order", f"standby-{name}")
        Path(str(standby.order_path) + READY_SUFFIX).touch()  # as if its imports were done
        return standby
    return start


def test_standby_bookkeeping_keeps_takes_and_gives_up_on_a_node_whose_standby_died(tmp_path, procs):
    started: list[str] = []
    pool = Standbys(sleeper(tmp_path, procs, started))
    pool.keep(["a", "b"], start_new=False)  # a group still starting: none started
    assert pool.nodes() == [] and started == []
    pool.keep(["a", "b"])  # one new standby per call
    assert pool.nodes() == ["a"] and started == ["a"]
    Path(str(pool._by_node["a"].order_path) + READY_SUFFIX).unlink()  # a still importing: no second one
    pool.keep(["a", "b"])
    assert pool.nodes() == ["a"]
    Path(str(pool._by_node["a"].order_path) + READY_SUFFIX).touch()
    pool.keep(["a", "b"])
    assert pool.nodes() == ["a", "b"] and started == ["a", "b"]
    pool.keep(["a", "b"])  # already there: none started twice
    assert started == ["a", "b"]
    taken = pool.take("a")
    assert taken is not None and alive(taken.proc) and pool.nodes() == ["b"]
    pool.keep(["b", "c"], start_new=False)  # c became free while a group starts: not yet
    assert pool.nodes() == ["b"]
    b = pool._by_node["b"]
    os.killpg(b.proc.pid, 9)
    b.proc.wait(timeout=10)
    pool.keep(["b", "c"])  # b's standby died unused: not restarted there (a loop of failing imports)
    assert pool.nodes() == ["c"] and started == ["a", "b", "c"]
    names = [s.order_path.name for s in (taken, pool._by_node["c"])]
    later = Standbys(sleeper(tmp_path, procs, []))  # a job resumed in the same directory: new order names
    later.keep(["a"])
    assert later._by_node["a"].order_path.name not in names and len(set(names)) == 2
    later.stop_all()
    assert pool.take("b") is None
    c = pool._by_node["c"]
    os.killpg(c.proc.pid, 9)
    c.proc.wait(timeout=10)
    assert pool.take("c") is None, "a dead standby must not be handed a group"
    pool.keep(["c"])
    assert started == ["a", "b", "c"]
    assert alive(taken.proc), "a standby taken by a launch is the group's: keep never stops it"
    pool.stop_all()
    assert pool.nodes() == []


def test_a_standby_without_an_order_dies_with_its_parent(tmp_path, procs):
    """The launcher starts standbys through the orphan guard: a supervisor SIGKILLed leaves none
    behind (they would sit on every free node with torch loaded until the allocation ends)."""
    script = ("import sys, time\nfrom pathlib import Path\nfrom watchtower.supervisor.launcher import LocalLauncher\n"
              f"launcher = LocalLauncher(Path({str(tmp_path / 'nodes')!r}))\nlauncher.keep_warm(['n1'])\n"
              "print(next(iter(launcher.standbys._by_node.values())).proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    procs.append(parent)
    pid = int(parent.stdout.readline())
    wait_until(lambda: list((tmp_path / "nodes" / "n1").glob(f"*{READY_SUFFIX}")), "the standby ready",
               abort=lambda: None if alive(parent) else pytest.fail("the parent exited"))
    parent.kill()
    parent.wait(timeout=10)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
               "the standby gone with its parent")


def test_an_order_without_an_argv_is_refused_in_one_line(tmp_path):
    order = tmp_path / "x.order"
    order.write_text(json.dumps({"env": {}}))
    result = subprocess.run([sys.executable, "-c", "from watchtower.standby import wait_for_order; from pathlib import "
                             f"Path; wait_for_order(Path({str(order)!r}))"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"watchtower.standby: {order}: not an order (needs an argv list)"], result.stderr
