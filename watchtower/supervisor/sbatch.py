"""`watchtower sbatch job.toml`: the batch script of a supervised Slurm job, written and submitted.

The script asks for one node per replica group (active + spare, plus `[slurm] reserve_nodes`), each
with TP tasks, and `--no-kill`, so a node that dies shrinks the allocation instead of ending it. Its
batch step `exec`s `watchtower supervise`, which starts every group as a job step of this allocation
(`slurm.py`); `exec` makes the supervisor the batch shell itself, so `--signal=B:USR1@N` (the time
limit's warning) and scancel's SIGTERM reach it and it stops every group cleanly.

    >>> from watchtower.supervisor.config import JobConfig, JobSection, ClusterSection
    >>> job = JobConfig(JobSection(name="demo", trainer_config="tiny", output_dir="/runs/demo"),
    ...                 ClusterSection(active_groups=2, spare_groups=1, launcher="slurm"))
    >>> print(batch_script(job, tp=1, job_path=Path("/jobs/demo.toml"), overrides=[], python="/venv/bin/python",
    ...                    cwd=Path("/work")))  # doctest: +ELLIPSIS
    #!/bin/bash
    #SBATCH --job-name=demo
    #SBATCH --nodes=3
    #SBATCH --ntasks-per-node=1
    #SBATCH --no-kill
    #SBATCH --signal=B:USR1@60
    #SBATCH --output=/runs/demo/slurm-%j.out
    # Written by `watchtower sbatch`: ...
    cd /work
    exec /venv/bin/python -m watchtower.cli supervise /jobs/demo.toml
    <BLANKLINE>
"""

from __future__ import annotations

import shlex
from pathlib import Path

from watchtower.supervisor.config import JobConfig
from watchtower.supervisor.slurm import slurm

SCRIPT = "sbatch.sh"


def node_count(job: JobConfig) -> int:
    """Nodes to ask for: the listed ones (less the excluded), else one per group plus the reserve."""
    c = job.cluster
    return len(usable_nodes(job)) if c.nodes else c.active_groups + c.spare_groups + job.slurm.reserve_nodes


def usable_nodes(job: JobConfig) -> list[str]:
    return [node for node in job.cluster.nodes if node not in job.cluster.exclude]


def sbatch_options(job: JobConfig, tp: int) -> list[str]:
    """The #SBATCH options, in the order they are written: `[slurm] extra` first, then watchtower's own.
    sbatch reads the lines in order and the last one of an option wins, so nothing in `extra` can undo
    an option watchtower writes (`cluster.exclude`, the checked `--signal`), whatever its spelling: an
    abbreviation (`--exclud`), several options on one line, bundled short ones (`-sxn9`). Refusing those
    by spelling could never be complete; the exact names are still refused (slurm_section.py), to say
    which key to set instead."""
    c, s, out = job.cluster, job.slurm, job.job.output_path.absolute()
    options = [*s.extra, f"--job-name={job.job.name}", f"--nodes={node_count(job)}", f"--ntasks-per-node={tp}",
               "--no-kill"]
    options += [f"--signal=B:USR1@{s.stop_warning_s}"] if s.stop_warning_s else []  # 0: no warning asked for
    options += [f"--output={out / 'slurm-%j.out'}"]
    options += [f"--nodelist={','.join(usable_nodes(job))}"] if c.nodes else []
    options += [f"--exclude={','.join(c.exclude)}"] if c.exclude else []  # known-bad: never allocated
    options += [f"--{key}={value}" for key, value in (("partition", s.partition), ("account", s.account),
                                                      ("time", s.time)) if value]
    options += [f"--gpus-per-node={s.gpus_per_node}"] if s.gpus_per_node else []
    return options


def batch_script(job: JobConfig, tp: int, job_path: Path, overrides: list[str], python: str, cwd: Path) -> str:
    """The whole script: #SBATCH lines, then the supervisor as the batch shell."""
    command = [python, "-m", "watchtower.cli", "supervise", str(job_path.absolute()), *overrides]
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in sbatch_options(job, tp)),
             "# Written by `watchtower sbatch`: the supervisor runs in the batch step and starts each replica",
             "# group as a job step of this allocation (srun --overlap); exec: Slurm's signals reach it.",
             f"cd {shlex.quote(str(cwd))}", "exec " + shlex.join(command), ""]
    return "\n".join(lines)


def submit(script: Path, timeout_s: float) -> str:
    """`sbatch --parsable SCRIPT`; the job id (a SlurmError if sbatch refuses)."""
    return slurm(["sbatch", "--parsable", str(script)], timeout_s).strip().split(";")[0]
