"""A throwaway alerting stack on loopback: Prometheus, Alertmanager and a webhook "pager".

For fire drills, the alert-latency benchmark and the end-to-end tests: the real Debian binaries,
started in a temp dir with short intervals, our own `alerts/rules.yml`, and a pager that records
every notification Alertmanager sends. Everything it starts is stopped on exit, also on errors.

Example:
    with AlertingStack(Path(tmp), interval="1s") as stack:
        stack.set_targets([Target("127.0.0.1:9400", "myrun", 0, 0, "node-a")])
        page = stack.pager.wait_for("WatchtowerLossSpike", timeout=30, run="myrun")
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from watchtower.direct_http import get_direct, open_direct
from watchtower.launch import free_ports
from watchtower.prometheus_config import Target, render_prometheus_config, write_file_sd


class Pager:
    """A webhook receiver on loopback; `pages` holds every firing alert, with its arrival time."""

    def __init__(self) -> None:
        self.pages: list[dict] = []
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.time()
                pager.pages.extend({**a, "received_at": now} for a in body["alerts"] if a["status"] == "firing")
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/page"
        # close() waits for serve_forever's next poll: 0.5 s by default, at every teardown
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def find(self, alertname: str, **labels: str) -> dict | None:
        """The first page of `alertname` whose labels include `labels`, or None."""
        for page in list(self.pages):
            if page["labels"]["alertname"] == alertname and labels.items() <= page["labels"].items():
                return page
        return None

    def wait_for(self, alertname: str, timeout: float, **labels: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = self.find(alertname, **labels)
            if page is not None:
                return page
            time.sleep(0.1)
        seen = [p["labels"] for p in self.pages]
        raise TimeoutError(f"no page {alertname} {labels} within {timeout}s; pages: {seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get_direct(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready in {timeout}s")


class AlertingStack:
    def __init__(self, workdir: Path, interval: str = "1s", group_wait: str = "1s",
                 alertmanager_config: dict | None = None, targets_file: Path | None = None,
                 supervisor_targets_file: Path | None = None, rules: bool = True):
        """targets_file / supervisor_targets_file: file_sd files to scrape, e.g. the ones a supervisor
        writes; by default an empty targets file of our own that set_targets() fills.
        rules: False starts Prometheus scraping with no rule file, until `load_rules()`: a test of a
        path that must reach Alertmanager before the rule does (a direct page) orders the two for sure
        (a rule evaluated in the same second merges into it first, whatever its interval)."""
        self.workdir = Path(workdir)
        self.interval, self.group_wait = interval, group_wait
        self.rules = rules
        self.pager = Pager()
        self.alertmanager_config = alertmanager_config
        self.procs: list[subprocess.Popen] = []
        self.targets_file = Path(targets_file) if targets_file else self.workdir / "targets.json"
        self.supervisor_targets_file = supervisor_targets_file

    def __enter__(self) -> "AlertingStack":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _binary(self, name: str) -> str:
        path = shutil.which(name)
        if not path:
            raise FileNotFoundError(f"{name} is not installed (Debian: apt-get install prometheus prometheus-alertmanager)")
        return path

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        am_port, prom_port = free_ports(2)
        self.alertmanager_url = f"http://127.0.0.1:{am_port}"
        self.prometheus_url = f"http://127.0.0.1:{prom_port}"
        am_config = self.workdir / "alertmanager.yml"
        am_config.write_text(json.dumps(self.alertmanager_config or {
            "route": {"receiver": "pager", "group_by": ["run", "alertname"], "group_wait": self.group_wait,
                      "group_interval": self.group_wait, "repeat_interval": "1h"},
            "receivers": [{"name": "pager", "webhook_configs": [{"url": self.pager.url}]}]}))
        self.procs.append(subprocess.Popen(
            [self._binary("prometheus-alertmanager"), f"--config.file={am_config}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
             f"--storage.path={self.workdir / 'alertmanager-data'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for path in (self.targets_file, self.supervisor_targets_file):
            if path is not None and not Path(path).exists():
                write_file_sd(path, [])  # Prometheus must find the file; the supervisor fills it later
        self._am_address = f"127.0.0.1:{am_port}"
        prom_config = self._write_prometheus_config()
        self.procs.append(subprocess.Popen(
            [self._binary("prometheus"), f"--config.file={prom_config}", f"--web.listen-address=127.0.0.1:{prom_port}",
             f"--storage.tsdb.path={self.workdir / 'prometheus-data'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"{self.alertmanager_url}/-/ready")
        wait_ready(f"{self.prometheus_url}/-/ready")

    def _write_prometheus_config(self) -> Path:
        prom_config = self.workdir / "prometheus.yml"
        prom_config.write_text(render_prometheus_config(
            str(self.targets_file), self._am_address, None if self.rules else [], self.interval, self.interval,
            str(self.supervisor_targets_file) if self.supervisor_targets_file else None))
        return prom_config

    def load_rules(self) -> None:
        """Give a stack started with rules=False our rules now (SIGHUP: Prometheus reloads its config,
        keeping what it scraped), and wait until they are loaded."""
        self.rules = True
        self._write_prometheus_config()
        self.procs[1].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # a reload takes well under a second; this only ends a stuck one
        while not self.prometheus_api("/api/v1/rules")["groups"]:
            if time.monotonic() > deadline:
                raise TimeoutError("Prometheus did not load the rules after SIGHUP")
            time.sleep(0.2)

    def set_targets(self, targets: list[Target]) -> None:
        write_file_sd(self.targets_file, targets)

    def post_alerts(self, alerts: list[dict]) -> None:
        """Send alerts straight to Alertmanager's v2 API (for routing and inhibition checks)."""
        req = urllib.request.Request(f"{self.alertmanager_url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with open_direct(req, timeout=5) as r:
            r.read()

    def alertmanager_alerts(self) -> list[dict]:
        with open_direct(f"{self.alertmanager_url}/api/v2/alerts", timeout=5) as r:
            return json.loads(r.read())

    # Prometheus's own view, read once per call: what tests and drills wait on instead of a clock.

    def prometheus_api(self, path: str, **params: str) -> dict | list:
        """The `data` of a GET on Prometheus's HTTP API, e.g. `prometheus_api("/api/v1/query", query="up")`."""
        url = f"{self.prometheus_url}{path}?{urllib.parse.urlencode(params)}"
        with open_direct(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def scraping(self, address: str) -> bool:
        """Prometheus has discovered `address` and tried to scrape it at least once (up or not): its
        scrape loop runs, so a server that comes up there is scraped within one interval."""
        return any(t["labels"].get("instance") == address and t["health"] != "unknown"
                   for t in self.prometheus_api("/api/v1/targets", state="active")["activeTargets"])

    def rule_evaluations(self) -> dict[str, str]:
        """Each rule group's last evaluation time (RFC 3339), by group name."""
        return {g["name"]: g["lastEvaluation"] for g in self.prometheus_api("/api/v1/rules")["groups"]}

    def prometheus_alerts(self, **labels: str) -> list[dict]:
        """Prometheus's pending and firing alerts whose labels include `labels` (before Alertmanager)."""
        return [a for a in self.prometheus_api("/api/v1/alerts")["alerts"] if labels.items() <= a["labels"].items()]

    def scraped_values(self, selector: str, window: str = "1h") -> list[list[float]]:
        """The raw scraped values of each series `selector` picks, oldest first, over the last `window`."""
        result = self.prometheus_api("/api/v1/query", query=f"{selector}[{window}]")["result"]
        return [[float(v) for _, v in series["values"]] for series in result]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        self.pager.close()
