"""Every metric Watchtower exports: name, type, help and labels, declared once.

The exporter builds its families from this table; alert rules, dashboards and the TUI may use only
names declared here, and a test fails when one does not. Names follow Prometheus conventions (base
units, `_total` on counters, `_seconds`, `_bytes`, `_ratio`) so `promtool check metrics` is clean.
Labels never carry a step, a loss value or anything unbounded.

Every name must stay unique in both formats Prometheus reads. It asks for OpenMetrics first, where a
counter's family is named without `_total` (its samples keep it, and `_created` is reserved): a gauge
`x_seconds` beside a counter `x_seconds_total` would be two families named `x_seconds`, which is
a parse error for promtool and a clash for Prometheus. A test checks the whole table.

Steps: `watchtower_steps_total` and `watchtower_tokens_total` count only steps whose update was
applied; a step skipped for a non-finite loss or grad norm (nonfinite_action = "skip_step") adds to
`watchtower_skipped_steps_total` instead. An attempt that torchft did not commit (a peer failed
mid-step) is thrown away and redone under the same step number: it adds to
`watchtower_uncommitted_steps_total` only, never to steps, skips or tokens, so each committed step
is counted once, as applied or as skipped. Wall time still counts: the step-time gauge and
`watchtower_step_seconds_total` are per attempt, skipped, redone or applied (the rank was busy all
the same), and tokens/s (and MFU) is applied tokens per wall second, so skips and redos show up as
lost throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

from watchtower.compute_budget import COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER

RANK_LABELS = ("run", "replica_group", "rank", "node")
GPU_LABELS = RANK_LABELS + ("gpu",)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed; counters end in _total
    kind: str  # counter | gauge
    help: str
    labels: tuple[str, ...] = RANK_LABELS

    @property
    def family(self) -> str:
        """The family name prometheus-client is given: a counter's without `_total` (it adds it back)."""
        return self.name[: -len("_total")] if self.kind == "counter" else self.name


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


RANK_METRICS = _specs(
    MetricSpec("watchtower_run_info", "gauge", "Always 1; labels describe the run (model, config hash, version).",
               RANK_LABELS + ("model", "config_hash", "version")),
    MetricSpec("watchtower_train_step", "gauge", "Last optimizer step this rank completed."),
    MetricSpec("watchtower_steps_total", "counter",
               "Steps this process applied (a step skipped for a non-finite loss or grad norm is not one)."),
    MetricSpec("watchtower_skipped_steps_total", "counter",
               "Steps whose update was skipped: non-finite loss or grad norm with nonfinite_action=skip_step."),
    MetricSpec("watchtower_uncommitted_steps_total", "counter",
               "Step attempts the replica groups did not commit (a peer failed mid-step); each is redone, and "
               "counts neither as a step, a skip nor tokens."),
    MetricSpec("watchtower_step_time_seconds", "gauge",
               "Mean wall time per step attempt over the last log interval, skipped and redone ones included."),
    MetricSpec("watchtower_step_seconds_total", "counter",
               "Wall time spent in step attempts, skipped and redone ones included."),
    MetricSpec("watchtower_tokens_total", "counter", "Tokens of the steps this rank applied."),
    MetricSpec("watchtower_tokens_per_parameter", "gauge",
               "Training tokens the model has seen per parameter (D/N): the job's mean tokens per step times "
               "the step, over the whole model's parameters. Compute-optimal (Chinchilla) is about "
               f"{COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER:g}."),
    MetricSpec("watchtower_planned_tokens_per_parameter", "gauge",
               "D/N the run will reach at its configured total steps, at the current tokens per step."),
    MetricSpec("watchtower_tokens_per_second", "gauge",
               "Tokens of applied steps per second of wall time over the last log interval."),
    MetricSpec("watchtower_mfu_ratio", "gauge", "Model FLOPs utilisation: achieved / peak FLOP/s of the device."),
    MetricSpec("watchtower_data_wait_seconds_total", "counter", "Time spent waiting for the next batch."),
    MetricSpec("watchtower_checkpoint_save_seconds_total", "counter",
               "Time spent saving checkpoints (only the group that writes them has any)."),
    MetricSpec("watchtower_collective_wait_seconds_total", "counter",
               "Time spent waiting on other replica groups (quorum, gradient all-reduce, commit)."),
    MetricSpec("watchtower_skipped_batches_total", "counter",
               "Global batches of data left unread by data.skip_steps (e.g. the data behind a loss spike)."),
    MetricSpec("watchtower_data_wait_ratio", "gauge", "Share of step time spent waiting for data, last interval."),
    MetricSpec("watchtower_loss", "gauge", "Training loss of the last step copied to the host."),
    MetricSpec("watchtower_grad_norm", "gauge", "Global gradient norm of the last step copied to the host."),
    MetricSpec("watchtower_learning_rate", "gauge", "Learning rate of the last step."),
    MetricSpec("watchtower_heartbeat_timestamp_seconds", "gauge",
               "Unix time when this rank last finished a step attempt (a redone one included)."),
    MetricSpec("watchtower_progress_timestamp_seconds", "gauge",
               "Unix time of this rank's last progress report before its first step (staging, init, resume, "
               "healing); a supervisor counts a starting group's grace from it."),
    MetricSpec("watchtower_detector_events_total", "counter", "Incidents reported by a detector.",
               RANK_LABELS + ("detector", "severity")),
    MetricSpec("watchtower_detector_last_event_step", "gauge", "Step of the detector's most recent incident.",
               RANK_LABELS + ("detector",)),
    MetricSpec("watchtower_parallel_check_ok", "gauge",
               "1 if the last TP/DP fingerprint check passed, 0 if it failed.", RANK_LABELS + ("check",)),
    MetricSpec("watchtower_parallel_checks_total", "counter", "TP/DP fingerprint checks run.", RANK_LABELS + ("check",)),
    MetricSpec("watchtower_replica_participants", "gauge",
               "Replica groups contributing gradients in this rank's current torchft quorum."),
    MetricSpec("watchtower_replica_participating", "gauge",
               "1 if this rank's group contributes gradients, 0 while it is a hot spare."),
    MetricSpec("watchtower_replica_in_collective", "gauge",
               "1 while this rank waits on other replica groups (quorum, gradient all-reduce, commit)."),
    MetricSpec("watchtower_hook_errors_total", "counter", "Exceptions caught inside the monitor (never raised).",
               RANK_LABELS + ("hook",)),
    # host (psutil)
    MetricSpec("watchtower_host_cpu_utilization_ratio", "gauge", "Host CPU utilisation, all cores."),
    MetricSpec("watchtower_host_memory_used_ratio", "gauge", "Share of host memory in use."),
    MetricSpec("watchtower_process_resident_memory_bytes", "gauge", "Resident memory of this rank's process."),
    MetricSpec("watchtower_host_disk_read_bytes_total", "counter", "Bytes read from the host's disks."),
    MetricSpec("watchtower_host_disk_written_bytes_total", "counter", "Bytes written to the host's disks."),
    MetricSpec("watchtower_host_network_received_bytes_total", "counter", "Bytes received on the host's interfaces."),
    MetricSpec("watchtower_host_network_sent_bytes_total", "counter", "Bytes sent on the host's interfaces."),
    # GPU (NVML); absent on machines without one
    MetricSpec("watchtower_gpu_utilization_ratio", "gauge", "GPU busy share over the driver's sample period.", GPU_LABELS),
    MetricSpec("watchtower_gpu_memory_used_bytes", "gauge", "GPU memory in use.", GPU_LABELS),
    MetricSpec("watchtower_gpu_memory_total_bytes", "gauge", "GPU memory installed.", GPU_LABELS),
    MetricSpec("watchtower_gpu_temperature_celsius", "gauge", "GPU core temperature.", GPU_LABELS),
    MetricSpec("watchtower_gpu_power_watts", "gauge", "GPU power draw.", GPU_LABELS),
    MetricSpec("watchtower_gpu_sm_clock_hertz", "gauge", "GPU SM clock.", GPU_LABELS),
    MetricSpec("watchtower_gpu_throttled", "gauge", "1 while the GPU clocks are held down for this reason.",
               GPU_LABELS + ("reason",)),
    MetricSpec("watchtower_gpu_ecc_errors_total", "counter", "ECC errors since the driver loaded (volatile).",
               GPU_LABELS + ("type",)),
    MetricSpec("watchtower_gpu_xid_errors_total", "counter", "XID errors reported by the driver, by code.",
               GPU_LABELS + ("xid",)),
    # GPU memory as PyTorch's caching allocator sees it (torch.cuda.memory_stats, read each log interval);
    # absent on ranks without CUDA. See watchtower/hooks/allocator.py.
    MetricSpec("watchtower_gpu_memory_peak_allocated_bytes", "gauge",
               "Most GPU memory held by tensors at once, since the process started or the loop last reset the "
               "allocator's peaks (the monitor never does).", GPU_LABELS),
    MetricSpec("watchtower_gpu_memory_peak_reserved_bytes", "gauge",
               "Most GPU memory the caching allocator held from the driver at once, over the same span.",
               GPU_LABELS),
    MetricSpec("watchtower_gpu_allocator_retries_total", "counter",
               "Times the caching allocator found no free block, freed its cache and retried cudaMalloc "
               "(fragmentation: rising, a throughput drop or an OOM is near).", GPU_LABELS),
    MetricSpec("watchtower_gpu_allocator_ooms_total", "counter",
               "Out-of-memory errors the caching allocator raised (the loop may have caught them).", GPU_LABELS),
)

SUPERVISOR_LABELS = ("run",)

SUPERVISOR_METRICS = _specs(
    MetricSpec("watchtower_supervisor_groups", "gauge", "Replica groups by state (active, spare, starting).",
               SUPERVISOR_LABELS + ("state",)),
    MetricSpec("watchtower_supervisor_nodes", "gauge", "Nodes by state (busy, free, draining, drained, down).",
               SUPERVISOR_LABELS + ("state",)),
    MetricSpec("watchtower_supervisor_spares_available", "gauge", "Hot-spare groups in sync and ready to take over.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_free_nodes", "gauge", "Nodes a new spare could start on.", SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_failures_total", "counter",
               "Group failures by reason (exit, hang, deadlock, node_down, lighthouse, drained, launch: the launcher "
               "could not start a group on the node).",
               SUPERVISOR_LABELS + ("reason",)),
    MetricSpec("watchtower_supervisor_errors_total", "counter",
               "Exceptions the supervisor caught, by stage of its loop (e.g. scrape, events, file_sd, kill); "
               "logged once per stage, never fatal to a group.",
               SUPERVISOR_LABELS + ("stage",)),
    MetricSpec("watchtower_supervisor_lighthouse_up", "gauge",
               "1 while the torchft Lighthouse answers the supervisor's health probe.", SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_restarts_total", "counter",
               "Recoveries started: a new spare group, the whole job from its checkpoint, or the Lighthouse.",
               SUPERVISOR_LABELS + ("kind",)),
    MetricSpec("watchtower_supervisor_recovery_seconds", "gauge",
               "Seconds from the last failure until the quorum was back at full strength.", SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_quorum_participants", "gauge", "Groups contributing gradients now.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_active_groups_target", "gauge", "Groups that should contribute gradients.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_spare_groups_target", "gauge", "Hot-spare groups the job asks for.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_job_step", "gauge", "Highest step any live group has finished.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_goodput_ratio", "gauge",
               "Productive step time over the job's wall time since the supervisor started.", SUPERVISOR_LABELS),
    MetricSpec("watchtower_remediations_total", "counter",
               "Critical loss spikes every contributing group agreed on, by what was done: rewind (restart from an "
               "earlier checkpoint, skipping the data window), page ([remediation] loss_spike, max_rewinds) or "
               "rewind_failed (the job stopped, exit 6).",
               SUPERVISOR_LABELS + ("action",)),
    MetricSpec("watchtower_badput_seconds_total", "counter",
               "Wall time lost, by cause: startup, data_wait, checkpoint, detection, recovery, recompute, "
               "collective, idle_spare (see watchtower/supervisor/goodput.py).", SUPERVISOR_LABELS + ("cause",)),
    MetricSpec("watchtower_supervisor_crash_loop", "gauge", "1 once the job was stopped as a crash loop.",
               SUPERVISOR_LABELS),
    MetricSpec("watchtower_supervisor_heartbeat_timestamp_seconds", "gauge", "Unix time of the supervisor's last loop.",
               SUPERVISOR_LABELS),
)

ALL_METRICS: dict[str, MetricSpec] = {**RANK_METRICS, **SUPERVISOR_METRICS}


def series_names(spec: MetricSpec) -> set[str]:
    """The series names a metric exposes (what PromQL can select)."""
    return {spec.name}


def declared_series() -> set[str]:
    return {n for spec in ALL_METRICS.values() for n in series_names(spec)}
