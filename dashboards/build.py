"""The three Watchtower dashboards, described with grafana-foundation-sdk (Grafana's own builder).

Why the SDK and not hand-written JSON or grafanalib: its types are generated from Grafana's schema
(11.6 here, schemaVersion 41), so a misspelt option fails at build time, not silently in the browser;
and it is what Grafana itself publishes and keeps current. It is needed only to *build*:
`watchtower dashboards build` writes `json/*.json`, which is committed, provisioned and pushed as is.

Every query uses only names from watchtower/metric_catalog.py (a test checks) and the variables
$run, $replica_group, $rank; a test runs each one against a real Prometheus that scraped a real run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (BigValueGraphMode, GraphDrawStyle, LegendDisplayMode,
                                                   LegendPlacement, StackingMode, VisibilityMode)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

from watchtower.compute_budget import COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER
from watchtower.dashboards import JSON_DIR

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run=~"$run"'
RANKS = 'run=~"$run", replica_group=~"$replica_group", rank=~"$rank"'
RATE = "$__rate_interval"
RANK_LEGEND = "g{{replica_group}} r{{rank}} {{node}}"


@dataclass
class Q:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class P:
    """One panel: kind is timeseries | stat | heatmap | state | table | bars; w/h in grid units."""

    kind: str
    title: str
    queries: list[Q]
    unit: str = ""
    description: str = ""
    w: int = 12
    h: int = 8
    min: float | None = None
    max: float | None = None
    stack: bool = False
    extra: dict = field(default_factory=dict)


def _target(q: Q, ref: str) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(q.expr).ref_id(ref).datasource(DS)
    if q.legend:
        t = t.legend_format(q.legend)
    if q.instant:
        t = t.instant().format(PromQueryFormat.TABLE)
    return t


def _panel(p: P):
    builders = {"timeseries": timeseries.Panel, "bars": timeseries.Panel, "stat": stat.Panel,
                "heatmap": heatmap.Panel, "state": statetimeline.Panel, "table": table.Panel}
    b = builders[p.kind]().title(p.title).datasource(DS).span(p.w).height(p.h)
    if p.description:
        b = b.description(p.description)
    if p.unit:
        b = b.unit(p.unit)
    if p.min is not None:
        b = b.min(p.min)
    if p.max is not None:
        b = b.max(p.max)
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, chr(ord("A") + i)))
    if p.kind in ("timeseries", "bars"):
        b = b.legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True).calcs([]))
        if p.kind == "bars":
            b = b.draw_style(GraphDrawStyle.BARS).fill_opacity(60)
        else:
            b = b.line_width(1).fill_opacity(10 if p.stack else 0)
        if p.stack:
            b = b.stacking(StackingConfig().mode(StackingMode.NORMAL))
    elif p.kind == "stat":
        b = b.graph_mode(BigValueGraphMode.AREA).reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
    elif p.kind == "heatmap":
        b = b.calculate(False)
    elif p.kind == "state":
        b = b.show_value(VisibilityMode.AUTO)
    return b


def _dashboard(uid: str, title: str, description: str, tags: list[str], rows: list[tuple[str, list[P]]],
               per_rank: bool, annotations: list[tuple[str, str, str]] = ()) -> dict:
    d = (gd.Dashboard(title).uid(uid).description(description).tags(["watchtower", *tags])
         .refresh("30s").time("now-1h", "now").timezone("browser").editable()
         .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(gd.QueryVariable("run").label("Run").datasource(DS)
                        .query("label_values(watchtower_train_step, run)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)))
    if per_rank:
        d = (d.with_variable(gd.QueryVariable("replica_group").label("Replica group").datasource(DS)
                             .query('label_values(watchtower_train_step{run=~"$run"}, replica_group)')
                             .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                             .all_value(".*").sort(VariableSort.NUMERICAL_ASC))
             .with_variable(gd.QueryVariable("rank").label("Rank").datasource(DS)
                            .query('label_values(watchtower_train_step{run=~"$run", '
                                   'replica_group=~"$replica_group"}, rank)')
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                            .all_value(".*").sort(VariableSort.NUMERICAL_ASC)))
    for name, expr, color in annotations:
        d = d.annotation(gd.AnnotationQuery().name(name).datasource(DS).enable(True).icon_color(color)
                         .expr(expr))
    for row_title, panels in rows:
        d = d.with_row(gd.Row(row_title))
        for p in panels:
            d = d.with_panel(_panel(p))
    out = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for panel_id, panel in enumerate(out["panels"], start=1):  # Grafana wants ids unique per dashboard
        panel["id"] = panel_id
    return out


# ---- 1. run overview ----------------------------------------------------------------------------------

SPIKES = (f'increase(watchtower_detector_events_total{{{RUN}, detector=~"loss_spike|nonfinite"}}[1m]) > 0')
FAILURES = f'increase(watchtower_supervisor_failures_total{{{RUN}}}[1m]) > 0'
BUDGET_CARD = (
    "D/N: training tokens seen per model parameter (the busiest rank's view: a hot spare trains on none); "
    "planned: where the run ends at its configured total steps. Chinchilla's compute-optimal point, "
    f"D/N ≈ {COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER:g}, is the least compute to reach a given loss, not the best "
    "model to serve: small models are trained far past it on purpose (SmolLM's 135M saw about 600B tokens, "
    "D/N ≈ 4,400), because inference cost grows with N and more data keeps improving a small model. "
    "Information only: no alert.")


def run_overview() -> dict:
    g = 'replica_group=~"$replica_group", rank=~"$rank"'
    health = [
        P("stat", "Step", [Q(f"max(watchtower_train_step{{{RUN}}})")], w=4, h=4),
        P("stat", "Tokens/s (all groups)", [Q(f"sum(watchtower_tokens_per_second{{{RUN}, rank=\"0\"}})")],
          unit="short", w=4, h=4,
          description="Tokens per second summed over replica groups (rank 0 of each group: TP ranks share tokens)."),
        P("stat", "MFU", [Q(f"avg(watchtower_mfu_ratio{{{RUN}}})")], unit="percentunit", w=4, h=4,
          description="Model FLOPs utilisation: FLOPs/token × tokens/s ÷ the device's peak."),
        P("stat", "Goodput", [Q(f"watchtower_goodput_ratio{{{RUN}}}")], unit="percentunit", w=4, h=4,
          min=0, max=1, description="Productive step time over the job's wall time (the supervisor's ledger)."),
        P("stat", "Data-wait share", [Q(f"max(watchtower_data_wait_ratio{{{RUN}}})")], unit="percentunit", w=4, h=4,
          description="The worst rank's share of step time spent waiting for the next batch."),
        P("stat", "Firing alerts", [Q(f'count(ALERTS{{{RUN}, alertstate="firing"}}) or vector(0)')], w=4, h=4),
    ]
    training = [
        P("timeseries", "Loss", [Q(f"avg by (replica_group) (watchtower_loss{{{RUN}, {g}}})", "group {{replica_group}}")],
          description="Loss per replica group; red marks are loss-spike and non-finite detector events."),
        P("timeseries", "Grad norm", [Q(f"max by (replica_group) (watchtower_grad_norm{{{RUN}, {g}}})",
                                        "group {{replica_group}}")]),
        P("timeseries", "Tokens/s", [Q(f'sum by (replica_group) (watchtower_tokens_per_second{{{RUN}, {g}, rank="0"}})',
                                       "group {{replica_group}}")], unit="short"),
        P("timeseries", "MFU", [Q(f"avg by (replica_group) (watchtower_mfu_ratio{{{RUN}, {g}}})", "group {{replica_group}}")],
          unit="percentunit", min=0),
        P("timeseries", "Step time", [
            Q(f"max by (replica_group) (watchtower_step_time_seconds{{{RUN}, {g}}})", "last g{{replica_group}}"),
            Q(f"sum by (replica_group) (rate(watchtower_step_seconds_total{{{RUN}, {g}}}[{RATE}])) / "
              f"(sum by (replica_group) (rate(watchtower_steps_total{{{RUN}, {g}}}[{RATE}])) + "
              f"sum by (replica_group) (rate(watchtower_skipped_steps_total{{{RUN}, {g}}}[{RATE}])))",
              "mean g{{replica_group}}")],
          unit="s", min=0, description="Wall time per step, skipped steps included (they took the time too)."),
        P("timeseries", "Data-wait share", [Q(f"max by (replica_group) (watchtower_data_wait_ratio{{{RUN}, {g}}})",
                                              "group {{replica_group}}")], unit="percentunit", min=0),
        P("timeseries", "Learning rate", [Q(f'max(watchtower_learning_rate{{{RUN}}})', "lr")], unit="short", w=8),
        P("timeseries", "Goodput", [Q(f"watchtower_goodput_ratio{{{RUN}}}", "goodput")],
          unit="percentunit", min=0, max=1, w=8),
        P("timeseries", "Detector events", [Q(f"sum by (detector) (increase(watchtower_detector_events_total{{{RUN}}}[{RATE}]))",
                                              "{{detector}}")], w=8),
        P("bars", "Skipped steps", [Q(f'max by (replica_group) (increase(watchtower_skipped_steps_total{{{RUN}, {g}}}[{RATE}]))',
                                      "group {{replica_group}}")], w=24, h=6,
          description="Steps not applied because the loss or grad norm was non-finite (nonfinite_action = "
                      "skip_step); they are not in steps or tokens. Repeated skips: WatchtowerStepsSkipped."),
    ]
    optimal = f"vector({COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER:g})"
    budget = [
        P("stat", "Tokens per parameter (D/N)", [Q(f"max(watchtower_tokens_per_parameter{{{RUN}}})", "now"),
                                                 Q(f"max(watchtower_planned_tokens_per_parameter{{{RUN}}})", "planned"),
                                                 Q(optimal, "compute-optimal")], w=8, h=6, description=BUDGET_CARD),
        P("timeseries", "Tokens per parameter over the run",
          [Q(f"max(watchtower_tokens_per_parameter{{{RUN}}})", "now"),
           Q(f"max(watchtower_planned_tokens_per_parameter{{{RUN}}})", "planned at the last step"),
           Q(optimal, "compute-optimal (Chinchilla)")], w=16, h=6, min=0, description=BUDGET_CARD),
    ]
    alerts = [P("table", "Active alerts", [Q(f'ALERTS{{{RUN}, alertstate="firing"}}', instant=True)], w=24, h=7,
                description="Prometheus's firing alerts for this run (rules in alerts/rules.yml).")]
    return _dashboard("watchtower-run", "Watchtower / Run overview",
                      "Is the run healthy: loss, throughput, MFU, goodput, data wait, alerts.", ["run"],
                      [("Health", health), ("Training", training), ("Compute budget", budget), ("Alerts", alerts)],
                      per_rank=True,
                      annotations=[("Loss spikes", SPIKES, "red"), ("Group failures", FAILURES, "orange")])


# ---- 2. ranks ------------------------------------------------------------------------------------------

def ranks() -> dict:
    median = f"quantile by (run) (0.5, watchtower_step_time_seconds{{{RUN}}})"
    steps = [
        P("timeseries", "Step time per rank", [Q(f"watchtower_step_time_seconds{{{RANKS}}}", RANK_LEGEND)], unit="s", min=0),
        P("timeseries", "Straggler ratio (step time ÷ run median)",
          [Q(f"watchtower_step_time_seconds{{{RANKS}}} / on (run) group_left () {median}", RANK_LEGEND)], min=0,
          description="Above ~1.2 for long: this rank slows every collective (WatchtowerStragglerRank)."),
        P("heatmap", "Straggler ratio by rank",
          [Q(f"watchtower_step_time_seconds{{{RANKS}}} / on (run) group_left () {median}", RANK_LEGEND)], w=24,
          description="One row per rank; a rank that stays hot is the straggler."),
        P("timeseries", "Data-wait share per rank", [Q(f"watchtower_data_wait_ratio{{{RANKS}}}", RANK_LEGEND)],
          unit="percentunit", min=0),
        P("timeseries", "Heartbeat age", [Q(f"time() - watchtower_heartbeat_timestamp_seconds{{{RANKS}}}", RANK_LEGEND)],
          unit="s", min=0, description="Seconds since the rank last finished a step (a hang grows without bound)."),
    ]
    gpu = [
        P("timeseries", "GPU utilisation", [Q(f"watchtower_gpu_utilization_ratio{{{RANKS}}}", RANK_LEGEND + " gpu{{gpu}}")],
          unit="percentunit", min=0, max=1, w=8),
        P("timeseries", "GPU memory used", [Q(f"watchtower_gpu_memory_used_bytes{{{RANKS}}} / "
                                              f"watchtower_gpu_memory_total_bytes{{{RANKS}}}", RANK_LEGEND + " gpu{{gpu}}")],
          unit="percentunit", min=0, max=1, w=8),
        P("timeseries", "GPU temperature", [Q(f"watchtower_gpu_temperature_celsius{{{RANKS}}}", RANK_LEGEND + " gpu{{gpu}}")],
          unit="celsius", w=8),
        P("timeseries", "GPU power", [Q(f"watchtower_gpu_power_watts{{{RANKS}}}", RANK_LEGEND + " gpu{{gpu}}")],
          unit="watt", w=8),
        P("timeseries", "SM clock", [Q(f"watchtower_gpu_sm_clock_hertz{{{RANKS}}}", RANK_LEGEND + " gpu{{gpu}}")],
          unit="hertz", w=8),
        P("state", "Throttling", [Q(f"max by (node, gpu, reason) (watchtower_gpu_throttled{{{RANKS}}})",
                                    "{{node}} gpu{{gpu}} {{reason}}")], w=8),
        P("timeseries", "GPU memory peaks (allocator)", [
            Q(f"watchtower_gpu_memory_peak_reserved_bytes{{{RANKS}}}", "reserved " + RANK_LEGEND + " gpu{{gpu}}"),
            Q(f"watchtower_gpu_memory_peak_allocated_bytes{{{RANKS}}}", "allocated " + RANK_LEGEND + " gpu{{gpu}}"),
            Q(f"max by (node, gpu) (watchtower_gpu_memory_total_bytes{{{RANKS}}})", "installed {{node}} gpu{{gpu}}")],
          unit="bytes", min=0,
          description="The caching allocator's high-water marks per rank (since start). Reserved near the card's "
                      "size with allocated well below it is fragmentation; both near it is too little memory."),
        P("bars", "Allocator retries and OOMs", [
            Q(f"increase(watchtower_gpu_allocator_retries_total{{{RANKS}}}[{RATE}])", "retries " + RANK_LEGEND),
            Q(f"increase(watchtower_gpu_allocator_ooms_total{{{RANKS}}}[{RATE}])", "OOMs " + RANK_LEGEND)],
          min=0, description="Retries: no cached block fit, so the allocator freed its cache and called cudaMalloc "
                             "again (each one stalls the step). Rising for 30 minutes opens a ticket "
                             "(WatchtowerGpuAllocatorRetries)."),
        P("bars", "ECC and XID errors", [
            Q(f"sum by (node, gpu, type) (increase(watchtower_gpu_ecc_errors_total{{{RANKS}}}[{RATE}]))",
              "ECC {{type}} {{node}} gpu{{gpu}}"),
            Q(f"sum by (node, gpu, xid) (increase(watchtower_gpu_xid_errors_total{{{RANKS}}}[{RATE}]))",
              "XID {{xid}} {{node}} gpu{{gpu}}")], w=24, h=6),
    ]
    host = [
        P("timeseries", "Host CPU", [Q(f"max by (node) (watchtower_host_cpu_utilization_ratio{{{RANKS}}})", "{{node}}")],
          unit="percentunit", min=0, max=1, w=8),
        P("timeseries", "Host memory used", [Q(f"max by (node) (watchtower_host_memory_used_ratio{{{RANKS}}})", "{{node}}")],
          unit="percentunit", min=0, max=1, w=8),
        P("timeseries", "Rank RSS", [Q(f"watchtower_process_resident_memory_bytes{{{RANKS}}}", RANK_LEGEND)],
          unit="bytes", min=0, w=8),
        P("timeseries", "Disk I/O", [
            Q(f"max by (node) (rate(watchtower_host_disk_read_bytes_total{{{RANKS}}}[{RATE}]))", "read {{node}}"),
            Q(f"max by (node) (rate(watchtower_host_disk_written_bytes_total{{{RANKS}}}[{RATE}]))", "write {{node}}")],
          unit="Bps", min=0),
        P("timeseries", "Network I/O", [
            Q(f"max by (node) (rate(watchtower_host_network_received_bytes_total{{{RANKS}}}[{RATE}]))", "rx {{node}}"),
            Q(f"max by (node) (rate(watchtower_host_network_sent_bytes_total{{{RANKS}}}[{RATE}]))", "tx {{node}}")],
          unit="Bps", min=0),
        P("timeseries", "Hook errors", [Q(f"sum by (rank, hook) (increase(watchtower_hook_errors_total{{{RANKS}}}[{RATE}]))",
                                          "r{{rank}} {{hook}}")], w=24, h=6,
          description="Failures inside Watchtower's own hooks (counted, never raised into training)."),
    ]
    return _dashboard("watchtower-ranks", "Watchtower / Ranks",
                      "Which rank is the problem: step time, stragglers, data wait, GPU and host health.", ["ranks"],
                      [("Steps", steps), ("GPU", gpu), ("Host", host)], per_rank=True)


# ---- 3. fault tolerance ---------------------------------------------------------------------------------

def fault_tolerance() -> dict:
    now = [
        P("stat", "Quorum", [Q(f"watchtower_supervisor_quorum_participants{{{RUN}}}", "participants"),
                             Q(f"watchtower_supervisor_active_groups_target{{{RUN}}}", "target")], w=6, h=4),
        P("stat", "Hot spares", [Q(f"watchtower_supervisor_spares_available{{{RUN}}}", "available"),
                                 Q(f"watchtower_supervisor_spare_groups_target{{{RUN}}}", "target")], w=6, h=4),
        P("stat", "Free nodes", [Q(f"watchtower_supervisor_free_nodes{{{RUN}}}")], w=4, h=4),
        P("stat", "Last recovery", [Q(f"watchtower_supervisor_recovery_seconds{{{RUN}}}")], unit="s", w=4, h=4,
          description="Seconds from the last failure until the quorum was back at full strength."),
        P("stat", "Goodput", [Q(f"watchtower_goodput_ratio{{{RUN}}}")], unit="percentunit", w=4, h=4),
    ]
    groups = [
        P("timeseries", "Replica groups by state", [Q(f"watchtower_supervisor_groups{{{RUN}}}", "{{state}}")],
          stack=True, min=0),
        P("timeseries", "Nodes by state", [Q(f"watchtower_supervisor_nodes{{{RUN}}}", "{{state}}")], stack=True, min=0),
        P("state", "Group role (1 contributes, 0 spare)",
          [Q(f"max by (replica_group) (watchtower_replica_participating{{{RUN}}})", "group {{replica_group}}")], w=24,
          description="Each group's torchft role over time: a spare turning 1 is a takeover."),
        P("timeseries", "Quorum size", [Q(f"watchtower_supervisor_quorum_participants{{{RUN}}}", "participants"),
                                        Q(f"watchtower_supervisor_active_groups_target{{{RUN}}}", "target")], min=0),
        P("timeseries", "Job step", [Q(f"watchtower_supervisor_job_step{{{RUN}}}", "step")], min=0),
    ]
    failures = [
        P("bars", "Failures by reason", [Q(f"sum by (reason) (increase(watchtower_supervisor_failures_total{{{RUN}}}[{RATE}]))",
                                           "{{reason}}")], w=8),
        P("bars", "Restarts by kind", [Q(f"sum by (kind) (increase(watchtower_supervisor_restarts_total{{{RUN}}}[{RATE}]))",
                                         "{{kind}}")], w=8),
        P("timeseries", "Recovery seconds", [Q(f"watchtower_supervisor_recovery_seconds{{{RUN}}}", "recovery")],
          unit="s", min=0, w=8),
    ]
    supervisor = [
        P("state", "Lighthouse up", [Q(f"watchtower_supervisor_lighthouse_up{{{RUN}}}", "lighthouse")], w=8,
          description="1 while the torchft Lighthouse answers the supervisor's probe. A dip is a restart; "
                      "down for a minute pages (WatchtowerLighthouseDown): no quorum can form."),
        P("bars", "Supervisor errors by stage",
          [Q(f"sum by (stage) (increase(watchtower_supervisor_errors_total{{{RUN}}}[{RATE}]))", "{{stage}}")], w=16,
          description="Exceptions the supervisor caught in a stage of its loop; the job goes on, the stage's work "
                      "does not. A burst while a group is killed is normal; errors for 15 minutes open a ticket "
                      "(WatchtowerSupervisorStageFailing). Failed launches are failures (reason launch), not errors."),
    ]
    goodput = [
        P("timeseries", "Badput by cause (share of wall time)",
          [Q(f"sum by (cause) (rate(watchtower_badput_seconds_total{{{RUN}}}[{RATE}]))", "{{cause}}")],
          unit="percentunit", min=0, stack=True, w=24,
          description="Seconds lost per wall second, by cause; the gap to 100% is productive step time. "
                      "Startup, detection, recovery, recompute and idle spares are the supervisor's timeline; "
                      "data wait, checkpoint and collective come from the ranks' own timers."),
    ]
    return _dashboard("watchtower-fault-tolerance", "Watchtower / Fault tolerance",
                      "torchft replica groups, hot spares, failures and recoveries (the supervisor's view).", ["ft"],
                      [("Now", now), ("Groups", groups), ("Failures", failures),
                       ("Supervisor", supervisor), ("Goodput", goodput)], per_rank=False,
                      annotations=[("Group failures", FAILURES, "red")])


DASHBOARDS = {"run-overview": run_overview, "ranks": ranks, "fault-tolerance": fault_tolerance}


def render() -> dict[str, str]:
    """File name → JSON text, exactly as committed."""
    return {f"{name}.json": json.dumps(make(), indent=2, sort_keys=True) + "\n" for name, make in DASHBOARDS.items()}


def write(json_dir: Path = JSON_DIR) -> list[Path]:
    json_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = json_dir / name
        path.write_text(text)
        written.append(path)
    return written
