"""Grafana dashboards as code (imported as `watchtower.dashboards`).

`build.py` describes the three dashboards with Grafana's own builder, grafana-foundation-sdk, and
writes them as JSON into `json/`; the JSON is committed and ships with the package, so pushing or
provisioning needs no SDK (it is a build-time tool, in the dev extra). `push.py` uploads them through
grafana-client; `provisioning/` is Grafana's file-provisioning config for the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from watchtower import shipped

JSON_DIR = shipped.dashboards_json_dir()
PROVISIONING_DIR = shipped.provisioning_dir()
FOLDER_UID = "watchtower"
FOLDER_TITLE = "Watchtower"


def load_dashboards(json_dir: Path = JSON_DIR) -> dict[str, dict]:
    """The committed dashboards, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(json_dir.glob("*.json"))}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and annotation query of a dashboard."""
    out = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    out.append((inner.get("title", ""), target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((f"annotation: {annotation.get('name')}", annotation["expr"]))
    return out
