"""The node health gate: a node is checked right before a group starts on it, and is not used again
once it fails. A restart onto a bad node is the most expensive mistake a supervisor makes: the
group dies (or worse, runs slowly) and the failure budget pays for the node's fault.

When. Each time the policy decides to launch on a node (the first groups, a spare refill, a restart),
in that same poll and before the launch: `gated_decision` runs the policy, checks the nodes its
launches name, and if any fails decides again with them in `View.unhealthy_nodes`, so the group goes
to the next free node at once. A healthy node is checked again before each later launch on it (a
disk fills, a GPU falls off the bus between launches); nodes that run a group are not re-checked. A
node that fails stays out for the job's life (the policy retires it, `node_unhealthy` event with
the check's output): the site check is the operator's word, a node failing it needs a person, and
re-admitting a flapping node would cost a check timeout per launch. It never counts as a failure.

What. One `Launcher.run_on_node` per node, bounded by `cluster.health_check_timeout_s`, running
`python -m watchtower.supervisor.node_check` (data source readable, node cache writable with
`health_min_free_bytes` free, GPUs visible with free memory on a CUDA job) which then becomes the
site's `cluster.health_check` (`/bin/sh -c`; `$WATCHTOWER_NODE` names the node,
`$WATCHTOWER_NODE_CACHE_DIR` is its cache). Exit 0 is healthy; any other exit, a timeout, or a check
that cannot be started (counted under stage "health") is unhealthy.

Cost, and the poll loop. Checks of one poll run in parallel threads, so the loop waits for the
slowest node: an interpreter start (~0.2 s here; an srun step on Slurm) plus the site command, and
at most the timeout (the check is killed then). Each re-decision checks only nodes not yet checked
this poll, so one poll waits at most (unhealthy nodes found + 1) timeouts. Meanwhile nothing is
observed, but nothing is lost: running groups train on (torchft needs no supervisor), hangs are
judged at the next poll from the groups' own heartbeat timestamps (the wait makes no false hang).
A stop signal does not wait for the checks: the loop waits in WAIT_SLICE_S slices, and on a signal
every running check is killed (on Slurm its srun; the step's cancel, one squeue and one scancel, goes
on in the background so a slow controller does not delay the stop), the poll decides nothing and the
loop stops at once; a check cut short says nothing of its node. Polls that launch nothing run no check.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from watchtower.supervisor.errors import StageErrors
from watchtower.supervisor.launcher import Launcher
from watchtower.supervisor.policy import decide
from watchtower.supervisor.policy_types import Action, Launch, PolicyConfig, PolicyState, View

if TYPE_CHECKING:
    from watchtower.config import TrainConfig
    from watchtower.supervisor.config import JobConfig

WAIT_SLICE_S = 0.1  # the loop's wait for the checks is cut into slices: a stop signal is seen within one


@dataclass(frozen=True)
class HealthCheck:
    """What a node must pass. gpus: GPUs a group uses (train.tp on a CUDA job, else 0: skipped).

    >>> HealthCheck(command="nvidia-smi -L").argv(Path("/c"))[-5:]
    ['0.9', '--', '/bin/sh', '-c', 'nvidia-smi -L']
    """

    data_source: str = ""
    min_free_bytes: int = 1 << 30
    gpus: int = 0
    min_gpu_free_fraction: float = 0.9
    command: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def for_job(cls, job: JobConfig, trainer: TrainConfig) -> HealthCheck:
        """A job on `train.device = "auto"` runs wherever it lands (CPU when no GPU): no GPU check."""
        c = job.cluster
        return cls(trainer.data.source, c.health_min_free_bytes,
                   trainer.train.tp if trainer.train.device == "cuda" else 0, c.health_min_gpu_free_fraction,
                   c.health_check, c.health_check_timeout_s)

    def argv(self, cache_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "watchtower.supervisor.node_check", "--cache", str(cache_dir),
                "--data", self.data_source, "--min-free-bytes", str(self.min_free_bytes), "--gpus", str(self.gpus),
                "--min-gpu-free-fraction", str(self.min_gpu_free_fraction)]
        return argv + (["--", "/bin/sh", "-c", self.command] if self.command else [])


class HealthGate:
    """Runs the checks on nodes through the launcher; `unhealthy(nodes)` → {node: why, with output}."""

    def __init__(self, check: HealthCheck, launcher: Launcher, errors: StageErrors):
        self.check, self.launcher, self.errors = check, launcher, errors

    def unhealthy(self, nodes: list[str], interrupted: Callable[[], bool] = lambda: False) -> dict[str, str] | None:
        """Check `nodes` at once, one thread each (the loop waits for the slowest node, not the sum);
        None when `interrupted()` turned true first: every check still running is killed within
        WAIT_SLICE_S (its Slurm step cancelled in the background), and a check cut short says nothing
        of its node."""
        cancel, found = threading.Event(), {}
        threads = [threading.Thread(target=lambda n=n: found.update({n: self.verdict(n, cancel)}),
                                    name=f"health-{n}", daemon=True) for n in nodes]
        for t in threads:  # joined below before returning: no check (nor its process) outlives the gate
            t.start()
        for t in threads:
            while t.is_alive():
                if not cancel.is_set() and interrupted():
                    cancel.set()
                t.join(WAIT_SLICE_S)
        if cancel.is_set():
            return None
        return {node: found[node] for node in nodes if found.get(node) is not None}

    def verdict(self, node: str, cancel: threading.Event | None = None) -> str | None:
        """None when healthy; else the verdict's first line, then the check's output."""
        try:
            code, output = self.launcher.run_on_node(node, self.check.argv(self.launcher.node_cache_dir(node)),
                                                     self.check.timeout_s, cancel)
        except Exception as err:  # noqa: BLE001 - a check that cannot run cannot vouch for its node
            self.errors.record("health", err)
            return f"the health check could not run: {type(err).__name__}: {err}"
        if code == 0:
            return None
        verdict = f"timed out after {self.check.timeout_s:g} s" if code is None else f"exit code {code}"
        return f"{verdict}\n{output}".strip()


def gated_decision(state: PolicyState, view: View, cfg: PolicyConfig, gate: HealthGate,
                   interrupted: Callable[[], bool] = lambda: False) -> tuple[PolicyState, list[Action]] | None:
    """`policy.decide`, with every node a launch names checked first; a node that fails is shown to
    the policy (`View.unhealthy_nodes`) and it decides again, from the same state: the decision stays
    pure and the policy's own. Ends: each round checks new nodes only, and there are finitely many.
    None when `interrupted()` (a stop signal) cut a check short: this poll decides nothing."""
    checked: set[str] = set()
    while True:
        decided, actions = decide(state, view, cfg)
        fresh = list(dict.fromkeys(a.node for a in actions if isinstance(a, Launch) and a.node not in checked))
        if not fresh:
            return decided, actions
        checked.update(fresh)
        found = gate.unhealthy(fresh, interrupted)
        if found is None:
            return None
        if not found:
            return decided, actions
        view = replace(view, unhealthy_nodes={**view.unhealthy_nodes, **found})
