"""Grafana dashboards: generated JSON is committed, names are declared, every query returns data from
a real Prometheus that scraped a real supervised run, and push is idempotent against Grafana's API."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, watchtower_cmd
from held_start import HeldStart
from waiting import wait_for_loss_spike_page, wait_until
from watchtower.alerting_stack import AlertingStack
from watchtower.dashboards import FOLDER_UID, JSON_DIR, PROVISIONING_DIR, load_dashboards, panel_queries
from watchtower.metric_catalog import declared_series
from watchtower.supervisor.jobfile import job_toml

RUN = "dash"
NODES = ("n0", "n1", "n2", "n3")


def test_committed_json_is_what_the_code_builds():
    from watchtower.dashboards import build  # the SDK is in the dev extra

    rendered = build.render()
    committed = {p.name: p.read_text() for p in JSON_DIR.glob("*.json")}
    assert set(rendered) == set(committed) == {"run-overview.json", "ranks.json", "fault-tolerance.json"}
    for name, text in rendered.items():
        assert text == committed[name], f"{name} is stale: run `watchtower dashboards build` and commit"


def test_dashboards_use_only_declared_metric_names_and_known_variables():
    for name, dashboard in load_dashboards().items():
        text = json.dumps(dashboard)
        used = set(re.findall(r"\b(watchtower_[a-z_]+)\b", text))
        assert used and used <= declared_series(), (name, used - declared_series())
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "run"} <= variables
        for _, expr in panel_queries(dashboard):
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables or var == "__rate_interval", (name, var, expr)
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids must be unique"
        assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "targets" in p)


def test_provisioning_points_at_the_dashboards_and_a_prometheus():
    datasources = yaml.safe_load((PROVISIONING_DIR / "datasources" / "watchtower.yml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "watchtower.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["folderUid"] == FOLDER_UID


# ---- every query against a real Prometheus that scraped a real run ------------------------------------

def substitute(expr: str) -> str:
    return (expr.replace("$run", RUN).replace("$replica_group", ".*").replace("$rank", ".*")
            .replace("$__rate_interval", "15s"))


LIGHT_MODEL = ["train.seq_len=32", "train.micro_batch_size=2"]  # the panels need numbers, not compute


def job_events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_panel_query_returns_data_from_a_real_supervised_run(tmp_path):
    """A supervised CPU job (2 groups + 1 hot spare, a loss spike and a group crash injected), scraped
    every second by a real Prometheus with our rules: each panel, annotation and variable query,
    variables substituted, must return data. GPU panels must parse and run; they can only return
    data where the ranks have a GPU, and this machine has none."""
    job_dir = tmp_path / "job"
    # peak_flops: a CPU has no entry in the table of known parts, so MFU needs the peak given
    overrides = ["train.steps=2000", "monitor.system_interval_s=1.0", "checkpoint.interval_steps=500", *LIGHT_MODEL,
                 "data.stage=always",
                 "monitor.peak_flops=1e12"]
    job = tmp_path / "job.toml"
    job.write_text(job_toml(
        {"name": RUN, "trainer_config": "tiny", "output_dir": str(job_dir), "train_overrides": overrides,
         "inject": ["loss_spike@30", "crash@50:group=0"]},
        {"nodes": list(NODES), "active_groups": 2, "spare_groups": 1},
        {"base_port": free_port(), "metrics_port": free_port()}))
    # Every group is held before its first step (held_start: the lock of its node's data cache, which
    # `data.stage=always` takes) until Prometheus scrapes all three: with the light batch the spike at
    # step 30 came within a second of the first step, before the file_sd targets were discovered under a
    # loaded CI, so the spike counter was first read at 1 and the page could never fire (CI of e6bf478).
    held = [HeldStart(job_dir / "nodes" / node / "cache") for node in NODES]
    with AlertingStack(tmp_path / "stack", targets_file=job_dir / "targets.json",
                       supervisor_targets_file=job_dir / "supervisor_targets.json") as stack:
        started = time.time()
        # stderr to a file, never a pipe nobody reads while waiting: past 64 KiB the supervisor blocks on its
        # next write, its in-process Lighthouse with it (RUST_LOG=info: 147 KB, every quorum timed out)
        stderr = tmp_path / "supervise.stderr"
        with stderr.open("w") as err:
            proc = subprocess.Popen(watchtower_cmd("supervise", str(job)), cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=err)

        def supervisor_alive() -> None:
            assert proc.poll() is None, stderr.read_text()[-3000:]

        try:
            wait_until(lambda: len(stack.prometheus_api("/api/v1/query", query='up{job="watchtower-ranks"} == 1')
                                   ["result"]) == 3, "Prometheus to scrape the three held groups", abort=supervisor_alive)
            for hold in held:
                hold.release()
            wait_until(lambda: {"recovered", "spares_refilled"} <= {e["event"] for e in job_events(job_dir)},
                       "the job to recover and refill its spares", interval=0.5, abort=supervisor_alive)
            wait_for_loss_spike_page(stack, RUN)  # ALERTS has a firing series
            # Queried over the whole run, as a dashboard showing it would: once a panel's series has
            # points (rates over 15s need two scrapes of the refilled pool), it keeps them.
            gpu = bool(stack.prometheus_api("/api/v1/query", query="watchtower_gpu_memory_total_bytes")["result"])
            empty: list[tuple[str, str, str]] = []

            def every_panel_has_data() -> bool:
                empty[:] = [(name, title, expr) for name, dashboard in load_dashboards().items()
                            for title, expr in panel_queries(dashboard)
                            if not stack.prometheus_api("/api/v1/query_range", query=substitute(expr),
                                                        start=str(started), end=str(time.time()), step="1")["result"]
                            and (gpu or "watchtower_gpu_" not in expr)]
                return not empty

            try:
                wait_until(every_panel_has_data, "every panel query to return data", interval=1)
            except AssertionError as e:
                raise AssertionError(f"{e}; panels with no data:\n" + "\n".join(map(str, empty))) from None
            for name, dashboard in load_dashboards().items():
                for var in dashboard["templating"]["list"]:
                    if var["type"] != "query":
                        continue
                    metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]).groups()
                    values = stack.prometheus_api(f"/api/v1/label/{label}/values", **{"match[]": substitute(metric)})
                    assert values, (name, var["name"])
                    if label == "run":
                        assert RUN in values
        finally:
            for hold in held:
                hold.release()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the supervisor stops its groups on the way out
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for e in job_events(job_dir):
                if e["event"] == "group_started":
                    try:
                        os.killpg(e["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass


# ---- push against Grafana's HTTP API on loopback -------------------------------------------------------

class GrafanaAPI:
    """Answers the part of Grafana's HTTP API that push uses, as Grafana documents it (folders by uid,
    dashboards by uid, POST /api/dashboards/db), keeps what it is sent, and records every request."""

    TOKEN = "glsa_test_token"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {api.TOKEN}":
                    return self._reply(401, {"message": "invalid API key"})
                code, reply = api.route(method, self.path, body)
                self._reply(code, reply)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def do_PUT(self):  # noqa: N802
                self._handle("PUT")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # close() waits for serve_forever's next poll: 0.5 s by default, at every teardown
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def route(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if method == "GET" and path.startswith("/api/folders/"):
            uid = path.rsplit("/", 1)[1]
            return (200, self.folders[uid]) if uid in self.folders else (404, {"message": "folder not found"})
        if method == "POST" and path == "/api/folders":
            uid = body.get("uid")
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[uid] = {"id": len(self.folders) + 1, "uid": uid, "title": body["title"],
                                 "url": f"/dashboards/f/{uid}/", "version": 1}
            return 200, self.folders[uid]
        if method == "GET" and path.startswith("/api/dashboards/uid/"):
            uid = path.rsplit("/", 1)[1]
            if uid not in self.dashboards:
                return 404, {"message": "Dashboard not found"}
            return 200, self.dashboards[uid]
        if method == "POST" and path == "/api/dashboards/db":
            d = dict(body["dashboard"])
            held = self.dashboards.get(d["uid"])
            if held and not body.get("overwrite"):
                return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
            version = held["dashboard"]["version"] + 1 if held else 1
            d.update(id=held["dashboard"]["id"] if held else len(self.dashboards) + 1, version=version)
            self.dashboards[d["uid"]] = {"dashboard": d, "meta": {"folderUid": body.get("folderUid"),
                                                                  "version": version}}
            return 200, {"id": d["id"], "uid": d["uid"], "url": f"/d/{d['uid']}", "status": "success",
                         "version": version, "slug": d["uid"]}
        return 404, {"message": "Not found"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana():
    api = GrafanaAPI()
    yield api
    api.close()


@pytest.fixture
def push(capsys, caplog, monkeypatch):
    """`watchtower dashboards push ...` through `cli.main` in this process, as (exit code, stdout, stderr):
    what the command says is the same, without an interpreter start per call (~1 s of CPU each). A log
    record or a warning would reach a user's stderr too (pytest captures them apart): each is added to
    stderr as a line of its own, so "one line" still counts everything a user would read."""
    from watchtower import cli

    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)  # the fallback for an empty --token: never the caller's

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli.main(["dashboards", "push", *args])
        out, err = capsys.readouterr()
        err += "".join(f"{r.levelname}: {r.getMessage()}\n" for r in caplog.records)
        err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
        return subprocess.CompletedProcess(["watchtower", "dashboards", "push", *args], code, out, err)
    return run


def test_push_creates_then_changes_nothing(grafana, push):
    first = push("--url", grafana.url, "--token", GrafanaAPI.TOKEN)
    assert first.returncode == 0, first.stderr
    assert "folder 'Watchtower': created" in first.stdout
    committed = load_dashboards()
    assert set(grafana.dashboards) == {d["uid"] for d in committed.values()}
    for d in committed.values():
        held = grafana.dashboards[d["uid"]]
        assert held["meta"]["folderUid"] == FOLDER_UID and held["dashboard"]["panels"] == d["panels"]
    writes = [r for r in grafana.requests if r[0] != "GET"]
    assert len(writes) == 1 + len(committed)

    grafana.requests.clear()
    second = push("--url", grafana.url, "--token", GrafanaAPI.TOKEN)
    assert second.returncode == 0, second.stderr
    assert [r for r in grafana.requests if r[0] != "GET"] == [], "a second push must change nothing"
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert all(h["dashboard"]["version"] == 1 for h in grafana.dashboards.values())

    edited = dict(grafana.dashboards["watchtower-run"]["dashboard"], title="edited in the UI")
    grafana.dashboards["watchtower-run"]["dashboard"] = edited
    third = push("--url", grafana.url, "--token", GrafanaAPI.TOKEN)
    assert "watchtower-run: updated" in third.stdout
    assert grafana.dashboards["watchtower-run"]["dashboard"]["title"] == "Watchtower / Run overview"


def test_push_with_a_bad_token_says_so_in_one_line(grafana, push):
    result = push("--url", grafana.url, "--token", "wrong")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the token (401" in lines[0] and "--token" in lines[0], result.stderr
    assert not grafana.dashboards and not grafana.folders
    missing = push("--url", grafana.url, "--token", "")
    assert missing.returncode == 1 and "GRAFANA_TOKEN" in missing.stderr
