"""Slurm's command lines and the parsing of their output, as pure functions (no process is run).

Apart from the launcher (slurm.py, the I/O edge) so each is a table-tested function with runnable
examples, and so the bench and the test cluster (slurm_testbed.py) read `squeue` / `scontrol` output
the way the launcher does without importing the launcher.
"""

from __future__ import annotations

import re
import string
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from watchtower.validation import ConfigError, require

if TYPE_CHECKING:
    from watchtower.supervisor.config import ClusterSection

STEP_PREFIX = "watchtower-"  # job step names: watchtower-<replica_id>, watchtower-check-<node>, watchtower-standby-<node>-<n>
DOWN_STATES = frozenset({"DOWN", "FAIL", "FAILING"})


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show node|job` output: one record per line, `Key=Value` pairs. A value with spaces
    (a Reason) continues until the next `Key=`.

    >>> n1, n2 = parse_records("NodeName=n1 NodeAddr=10.0.0.1 State=IDLE Reason=bad gpu [root@t]\\nNodeName=n2 State=DOWN*")
    >>> n1["Reason"], n2
    ('bad gpu [root@t]', {'NodeName': 'n2', 'State': 'DOWN*'})
    """
    records = []
    for line in text.splitlines():
        record: dict[str, str] = {}
        key = None
        for token in line.split():
            name, eq, value = token.partition("=")
            if eq and re.fullmatch(r"[A-Za-z][\w/:]*", name):
                key, record[name] = name, value
            elif key is not None:
                record[key] += " " + token
        if record:
            records.append(record)
    return records


def is_down(state: str) -> bool:
    """A Slurm node state (`DOWN*`, `IDLE+DRAIN`, `MIXED`) says the node is gone for us.

    >>> [is_down(s) for s in ("DOWN*", "DOWN+DRAIN", "FAIL", "ALLOCATED*", "MIXED+DRAIN", "IDLE")]
    [True, True, True, False, False, False]
    """
    return bool(DOWN_STATES & set(state.rstrip("*~#!%$@^-").split("+")))


def select_nodes(allocation: list[str], listed: list[str], groups: int, job_id: str,
                 exclude: list[str] = ()) -> list[str]:
    """The nodes the job uses: `cluster.nodes` (a subset of the allocation) or the whole allocation,
    less `cluster.exclude` (sbatch was asked to leave those out; one allocated anyway is dropped, one
    absent is simply absent); a ConfigError when a listed node is not allocated or there are fewer
    nodes than groups.

    >>> select_nodes(["n1", "n2", "n3"], [], 2, "7", exclude=["n2", "n9"])
    ['n1', 'n3']
    >>> select_nodes(["n1", "n2"], [], 3, "7")
    Traceback (most recent call last):
    ...
    watchtower.validation.ConfigError: config error: cluster.active_groups + spare_groups = 3: needs 3 nodes; allocation 7 has 2 (n1, n2): ask sbatch for more nodes or run fewer groups
    """
    for i, node in enumerate(listed):
        require(node in allocation or node in exclude, f"cluster.nodes[{i}]", node,
                f"is not in allocation {job_id} ({', '.join(allocation)}): list only allocated nodes")
    nodes = [node for node in (listed or allocation) if node not in exclude]
    require(groups <= len(nodes), "cluster.active_groups + spare_groups", groups,
            f"needs {groups} nodes; {'cluster.nodes lists' if listed else f'allocation {job_id} has'} "
            f"{len(nodes)} ({', '.join(nodes)}){' besides cluster.exclude' if exclude else ''}: "
            "ask sbatch for more nodes or run fewer groups")
    return nodes


def allocated_cluster(cluster: ClusterSection, nodes: list[str]) -> ClusterSection:
    """`[cluster]` as the job runs it: `nodes` the ones `select_nodes` kept (the excluded ones are
    already out of them, so nothing is left to exclude), validated again; a ConfigError under `cluster`."""
    try:
        return replace(cluster, nodes=list(nodes), exclude=[])
    except ConfigError as err:
        raise err.under("cluster") from None


def expand_cache_dir(template: str, node: str, env: Mapping[str, str]) -> str:
    """`data.cache_dir` for one node: `{node}` is its Slurm name, `$VAR` / `${VAR}` come from the
    supervisor's environment (inside the allocation: the job's, as every node sees it).

    >>> expand_cache_dir("${TMPDIR}/wt/{node}", "n2", {"TMPDIR": "/local"})
    '/local/wt/n2'
    >>> expand_cache_dir("$SCRATCH/{node}", "n2", {})
    Traceback (most recent call last):
    ...
    watchtower.validation.ConfigError: config error: data.cache_dir = '$SCRATCH/{node}': uses $SCRATCH, which is not set in the supervisor's environment
    """
    try:
        return string.Template(template.replace("{node}", node)).substitute(env)
    except KeyError as err:
        raise ConfigError("data.cache_dir", template,
                          f"uses ${err.args[0]}, which is not set in the supervisor's environment") from None
    except ValueError as err:
        raise ConfigError("data.cache_dir", template, f"{err}; write $$ for a literal $") from None


def step_name(replica_id: str) -> str:
    return f"{STEP_PREFIX}{replica_id}"


def srun_argv(job_id: str, node: str, ntasks: int, name: str, extra: list[str], command: list[str]) -> list[str]:
    """One job step on one node of the allocation, started at once (`--overlap`: it may share the
    node with the batch step); `--kill-on-bad-exit`: a TP group with a dead rank can only hang (a rank
    that stopped on request tells Slurm 0, `slurm_task.slurm_exit`, so its peers finish their writes).

    >>> srun_argv("12", "n3", 2, "watchtower-g0001", ["--cpu-bind=none"], ["python", "x.py"])
    ['srun', '--jobid=12', '--nodes=1', '--nodelist=n3', '--ntasks=2', '--overlap', '--kill-on-bad-exit=1', \
'--job-name=watchtower-g0001', '--cpu-bind=none', 'python', 'x.py']
    """
    return ["srun", f"--jobid={job_id}", "--nodes=1", f"--nodelist={node}", f"--ntasks={ntasks}", "--overlap",
            "--kill-on-bad-exit=1", f"--job-name={name}", *extra, *command]


def task_argv(config_path: Path, master_addr: str) -> list[str]:
    """What each task of a group's step runs: become a TP rank, then `watchtower train --config`."""
    return [sys.executable, "-m", "watchtower.supervisor.slurm_task", "--master-addr", master_addr, str(config_path)]


def standby_task_argv(order_path: Path, master_addr: str) -> list[str]:
    """What each task of a standby step runs (`slurm_task --standby`): a group's task, waiting for its order."""
    return [sys.executable, "-m", "watchtower.supervisor.slurm_task", "--master-addr", master_addr,
            "--standby", str(order_path)]


def drain_argv(node: str, cause: str, step: int) -> list[str]:
    """Drain `node` in Slurm with our reason (`sinfo -R` shows it); usually needs admin rights.

    >>> drain_argv("n2", "exit", 40)
    ['scontrol', 'update', 'nodename=n2', 'state=drain', 'reason=watchtower: exit at step 40']
    """
    return ["scontrol", "update", f"nodename={node}", "state=drain", f"reason=watchtower: {cause} at step {step}"]


def steps(squeue_steps: str) -> list[tuple[str, str, str]]:
    """(step id, name, node list) of each line of `squeue -h -s -o "%i %j %N"`.

    >>> steps("12.batch batch n1\\n12.3 watchtower-g0001 n3\\n")
    [('12.batch', 'batch', 'n1'), ('12.3', 'watchtower-g0001', 'n3')]
    """
    return [(parts[0], parts[1], parts[2]) for parts in map(str.split, squeue_steps.splitlines()) if len(parts) == 3]
