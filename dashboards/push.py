"""Upload the committed dashboards to a Grafana through its HTTP API (grafana-client), idempotently.

A push makes sure the folder exists, then for each dashboard reads what Grafana holds under its uid
and writes only when it differs, so pushing twice changes nothing (no new dashboard version, no
"changed by" noise in Grafana's history). Authentication is a service-account token (Bearer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from watchtower.dashboards import FOLDER_TITLE, FOLDER_UID, load_dashboards

# Fields Grafana adds or bumps on save; they say nothing about the dashboard's content.
VOLATILE = ("id", "version")


class PushError(Exception):
    """A push that cannot go on; the message is one line that says what to do."""


@dataclass
class PushResult:
    folder: str = "unchanged"  # created | unchanged | renamed
    dashboards: dict[str, str] = field(default_factory=dict)  # uid -> created | updated | unchanged


def _content(dashboard: dict) -> dict:
    return {k: v for k, v in dashboard.items() if k not in VOLATILE}


def _explain(err: Exception, url: str) -> PushError:
    if isinstance(err, GrafanaUnauthorizedError):
        return PushError(f"Grafana at {url} refused the token (401 Unauthorized): pass a service-account token "
                         f"with the Editor role as --token or $GRAFANA_TOKEN")
    if isinstance(err, GrafanaException) and err.status_code == 403:
        return PushError(f"Grafana at {url} says the token may not write dashboards (403 Forbidden): give its "
                         f"service account the Editor role on folder '{FOLDER_TITLE}'")
    if isinstance(err, GrafanaException):
        return PushError(f"Grafana at {url} answered {err.status_code}: {err.message}")
    return PushError(f"cannot reach Grafana at {url}: {err} (check --url)")


def _missing(err: GrafanaClientError) -> bool:
    return err.status_code == 404


def push(url: str, token: str, dashboards: dict[str, dict] | None = None, folder_uid: str = FOLDER_UID,
         folder_title: str = FOLDER_TITLE, timeout: float = 10.0) -> PushResult:
    if not token:
        raise PushError("no Grafana token: pass --token or set $GRAFANA_TOKEN (a service-account token, Editor role)")
    dashboards = load_dashboards() if dashboards is None else dashboards
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    result = PushResult()
    try:
        try:
            folder = api.folder.get_folder(folder_uid)
            if folder.get("title") != folder_title:
                api.folder.update_folder(folder_uid, title=folder_title, overwrite=True)
                result.folder = "renamed"
        except GrafanaClientError as err:
            if not _missing(err):
                raise
            api.folder.create_folder(folder_title, uid=folder_uid)
            result.folder = "created"
        for dashboard in dashboards.values():
            uid = dashboard["uid"]
            try:
                held = api.dashboard.get_dashboard(uid)
            except GrafanaClientError as err:
                if not _missing(err):
                    raise
                held = None
            if held is not None and _content(held["dashboard"]) == _content(dashboard) \
                    and held.get("meta", {}).get("folderUid") == folder_uid:
                result.dashboards[uid] = "unchanged"
                continue
            api.dashboard.update_dashboard({"dashboard": {**_content(dashboard), "id": None}, "folderUid": folder_uid,
                                            "overwrite": True, "message": "watchtower dashboards push"})
            result.dashboards[uid] = "created" if held is None else "updated"
    except Exception as err:  # noqa: BLE001 - every transport/API failure becomes one clear line
        raise _explain(err, url) from err
    return result
