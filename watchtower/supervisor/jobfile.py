"""Writing a job file from plain dicts: for tests, benchmarks and tools that generate jobs.

The supervisor reads job files with `load_job` (TOML, validated); this is the inverse for the
handful of value types a job file holds. A key whose value is None is left out.
"""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"a job file holds strings, numbers, booleans and lists, not {type(value).__name__}")


def job_toml(job: dict[str, Any], cluster: dict[str, Any], supervisor: dict[str, Any] | None = None) -> str:
    lines = []
    for section, keys in (("job", job), ("cluster", cluster), ("supervisor", supervisor or {})):
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items() if value is not None]
        lines.append("")
    return "\n".join(lines)
