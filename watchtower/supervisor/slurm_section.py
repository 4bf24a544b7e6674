"""`[slurm]` of the job file: the batch script `watchtower sbatch` writes and what the launcher may
do to nodes.

Apart from the launcher (slurm.py) so the job file is read and validated (config.py, sbatch.py)
without loading the launcher and its process machinery: one validated dataclass, nothing run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from watchtower.validation import require

STOP_KILL_MARGIN_S = 10.0  # after stop_grace_s: kill what remains (a step's scancel), stop the Lighthouse, exit
# sbatch options `watchtower sbatch` writes from the job file (sbatch.py), refused in `extra` by their exact
# names to say which key to set instead; any other spelling (`--exclud`, `-sxn9`) is harmless: sbatch.py
# writes `extra` first and the last #SBATCH line of an option wins
WRITTEN_OPTIONS = {"--job-name": "job.name", "-J": "job.name", "--nodes": "cluster.nodes or the group counts",
                   "-N": "cluster.nodes or the group counts", "--nodelist": "cluster.nodes", "-w": "cluster.nodes",
                   "--nodefile": "cluster.nodes", "-F": "cluster.nodes",
                   "--exclude": "cluster.exclude", "-x": "cluster.exclude", "--ntasks-per-node": "train.tp",
                   "--signal": "slurm.stop_warning_s", "--output": "job.output_dir", "-o": "job.output_dir",
                   "--partition": "slurm.partition", "-p": "slurm.partition", "--account": "slurm.account",
                   "-A": "slurm.account", "--time": "slurm.time", "-t": "slurm.time",
                   "--gpus-per-node": "slurm.gpus_per_node", "--no-kill": "(always written)", "-k": "(always written)"}
MAX_COMMAND_TIMEOUT_S = 3600.0  # beyond this a client call is hung (and ~9.2e9 s overflows subprocess's clock)


@dataclass
class SlurmSection:
    """`[slurm]`: the batch script `watchtower sbatch` writes, and what the launcher may do to nodes.

    partition, account, time: sbatch's --partition, --account, --time ("" : the site's default;
        time as Slurm writes it, like "04:00:00" or "2-00:00:00").
    gpus_per_node: --gpus-per-node (0: none asked for; CPU jobs).
    reserve_nodes: nodes asked for beyond active + spare groups: replacements for the spare pool
        after failures, without a wait in the queue.
    extra: more #SBATCH lines, like "--qos=high" or "--constraint=h100"; not an option watchtower
        writes itself (WRITTEN_OPTIONS: --exclude, --signal, ...: set its key). Written before
        watchtower's own lines, so no spelling of such an option overrides them (sbatch.py).
    srun_args: added to every group's srun, like "--gpus-per-task=1" or "--cpu-bind=cores".
    drain_failed_nodes: drain a node whose group failed in Slurm too (`scontrol update ... state=drain`);
        usually needs admin rights: a refusal is an event and a warning, the node is excluded anyway.
    stop_warning_s: Slurm signals the supervisor (USR1) this long before the time limit, so every group
        saves at one agreed step and exits before the SIGKILL; it must cover `supervisor.stop_grace_s`
        plus 10 s to kill what remains (checked when the job is read); 0 with stop_grace_s = 0: no warning
        and no graceful stop (the time limit kills the job; it resumes from its last periodic checkpoint).
    command_timeout_s: the longest an scontrol / squeue / scancel call may take (a slow controller);
        at most an hour.
    """

    partition: str = ""
    account: str = ""
    time: str = ""
    gpus_per_node: int = 0
    reserve_nodes: int = 0
    extra: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    drain_failed_nodes: bool = False
    stop_warning_s: int = 60
    command_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for key in ("partition", "account", "time"):
            value = getattr(self, key)
            require(re.fullmatch(r"[\w.:,+-]*", value) is not None, key, value,
                    "must be one word as sbatch takes it (letters, digits, . : , + - _)")
        require(self.gpus_per_node >= 0, "gpus_per_node", self.gpus_per_node, "must be >= 0")
        require(self.reserve_nodes >= 0, "reserve_nodes", self.reserve_nodes, "must be >= 0")
        for key in ("extra", "srun_args"):
            for i, item in enumerate(getattr(self, key)):
                require(item.startswith("-") and "\n" not in item, f"{key}[{i}]", item,
                        "must be one option, like --qos=high")
        for i, item in enumerate(self.extra):
            name = written_option(item)
            require(name is None, f"extra[{i}]", item,
                    f"{name} is written by watchtower sbatch from the job file: set {WRITTEN_OPTIONS.get(name)} instead")
        require(self.stop_warning_s >= 0, "stop_warning_s", self.stop_warning_s,
                "must be >= 0 seconds (its minimum, stop_grace_s + 10, is checked with [supervisor])")
        require(0 < self.command_timeout_s <= MAX_COMMAND_TIMEOUT_S, "command_timeout_s", self.command_timeout_s,
                f"must be > 0 and <= {MAX_COMMAND_TIMEOUT_S:g} seconds (a Slurm client call that takes longer is hung)")


def written_option(item: str) -> str | None:
    """The option of WRITTEN_OPTIONS that an `extra` item names exactly (`--exclude=n3`, `-x n3`, `-xn3`, also
    after another option on the same line), or None. Other spellings need no refusal (see WRITTEN_OPTIONS).

    >>> [written_option(o) for o in ("--exclude=n3", "-x n3", "-xn3", "--qos=high --exclude=n9", "--exclusive")]
    ['--exclude', '-x', '-x', '--exclude', None]
    """
    for token in (t for t in item.split() if t.startswith("-")):
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        if name in WRITTEN_OPTIONS:
            return name
    return None
