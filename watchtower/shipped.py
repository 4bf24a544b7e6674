"""Where the files Watchtower ships live: alert rules, Alertmanager config, dashboards, Grafana
provisioning, config presets and the demo's job file. The one place that knows.

They are package data, read through `importlib.resources`, so a wheel installed anywhere finds them in
its own site-packages and never looks for a repository. pyproject's `package-dir` maps the
repository's folders onto packages (`alerts/` -> `watchtower.alerts`, `configs/` ->
`watchtower.configs`, `dashboards/` -> `watchtower.dashboards`), so there is one copy of each file:
an editable install (a checkout) reads the repository's own files, a wheel its installed copies.

Prometheus, Alertmanager and Grafana need real paths, and every install pip makes unpacks its files,
so each answer is a `Path` (one attribute lookup, no I/O until it is read).

>>> rules_file().name, preset_file("tiny").name
('rules.yml', 'tiny.toml')
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ALERTS = "watchtower.alerts"
PRESETS = "watchtower.configs"
DASHBOARDS = "watchtower.dashboards"
DEMO_JOB = "demo-job"  # a supervisor job file beside the presets, not a trainer preset


def _dir(package: str) -> Path:
    """The folder of a data package; a zipped install (no real files) is refused, not half-served."""
    found = files(package)
    if not isinstance(found, Path):
        raise RuntimeError(f"{package} is not on the file system ({found!r}); install Watchtower unzipped")
    return found


def alerts_dir() -> Path:
    """Prometheus rules (`rules.yml`) and the Alertmanager config (`alertmanager.yml`)."""
    return _dir(ALERTS)


def rules_file() -> Path:
    return alerts_dir() / "rules.yml"


def alertmanager_file() -> Path:
    return alerts_dir() / "alertmanager.yml"


def preset_file(name: str) -> Path:
    """`configs/<name>.toml`; may not exist (callers list `preset_names()` when it does not)."""
    return _dir(PRESETS) / f"{name}.toml"


def preset_names() -> list[str]:
    """The trainer presets (`tiny`, `smol-135m`, ...), without the demo's job file."""
    return sorted(p.stem for p in _dir(PRESETS).glob("*.toml") if p.stem != DEMO_JOB)


def demo_job_file() -> Path:
    """The supervisor job `watchtower demo` runs."""
    return preset_file(DEMO_JOB)


def dashboards_json_dir() -> Path:
    """The built dashboards (what `watchtower dashboards build` writes and `push` uploads)."""
    return _dir(DASHBOARDS) / "json"


def provisioning_dir() -> Path:
    """Grafana's file-provisioning config for the same dashboards."""
    return _dir(DASHBOARDS) / "provisioning"
