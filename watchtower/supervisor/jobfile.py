"""Writing a job file from plain dicts: for tests, benchmarks and tools that generate jobs.

The supervisor reads job files with `load_job` (TOML, validated); this is the inverse for the
handful of value types a job file holds. A key whose value is None is left out.
"""

from __future__ import annotations

from typing import Any

from watchtower.toml_dataclasses import dump_toml


def job_toml(job: dict[str, Any], cluster: dict[str, Any], supervisor: dict[str, Any] | None = None,
             slurm: dict[str, Any] | None = None, remediation: dict[str, Any] | None = None) -> str:
    optional = {name: table for name, table in (("slurm", slurm), ("remediation", remediation)) if table}
    return dump_toml({"job": job, "cluster": cluster, "supervisor": supervisor or {}, **optional})
