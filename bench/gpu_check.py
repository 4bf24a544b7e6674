"""GPU check: what Watchtower claims about GPUs, measured in one process; one JSON object on the last line.

Each part is a key of that object. A part that needs CUDA reads `{"skipped": "no CUDA device"}` on a
machine without one: never a made-up number. A part that failed reads `{"error": "..."}` and the
others still run (a GPU run is scarce: one crash must not cost the whole run).

  throughput     smol-135m, bf16, TP=1, seq 2048, the largest micro-batch that fits (halving from
                 --max-micro-batch on OOM): tokens/s and MFU of the bundled Trainer, run as users run it
                 (intra-document masking on, the default), and the same without it (plain causal)
  hook_overhead  the same trainer steps in interleaved blocks, bare and monitored: overhead_ratio
  host_syncs     monitored steps under torch.cuda.set_sync_debug_mode("warn") with nonfinite_action
                 "count": the sync warnings raised from the monitor's own code, by file:line
  scrape         the rank's /metrics: every GPU gauge of the catalog present and plausible, promtool-clean
                 in text and OpenMetrics, the median time of 100 scrapes (asked for as Prometheus asks)
  step_time      CUDA-event step time ÷ wall step time, per step (they agree when the loop is GPU-bound)
  memory         the allocator's peaks, retries and OOMs as /metrics exports them (absent on a CPU)

On a CPU it runs the `tiny` preset for the parts that mean something there (overhead, scrape, the
memory metrics declared but absent) in seconds; tests/test_gpu_check.py runs it so. Progress goes to
stderr; --out keeps the scraped bodies (text and OpenMetrics) for a later `promtool check metrics`.

    python bench/gpu_check.py [--out DIR] [--max-micro-batch 64] [--steps 40] [--blocks 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

import watchtower.hooks
from watchtower.config import TrainConfig, load_config
from watchtower.direct_http import open_direct
from watchtower.hooks import Monitor, MonitorConfig, RankIdentity
from watchtower.hooks.allocator import ALLOCATOR_STATS
from watchtower.hooks.flops import peak_flops_for
from watchtower.launch import free_port
from watchtower.metric_catalog import RANK_LABELS, RANK_METRICS
from watchtower.trainer.model import flops_per_token
from watchtower.trainer.parallel import clip_grads_, grad_norm
from watchtower.trainer.train import Trainer

GPU_PRESET, CPU_PRESET = "smol-135m", "tiny"
NO_CUDA = {"skipped": "no CUDA device"}
TEXT_FORMAT = "text/plain; version=0.0.4"
OPENMETRICS = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
               "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # the Accept header Prometheus scrapes with
SYNC_WARNING = "synchronizing CUDA operation"  # the text of set_sync_debug_mode's warnings
GPU_METRICS = [s for s in RANK_METRICS.values() if "gpu" in s.labels]
# what a healthy GPU's gauges can read; a gauge added to the catalog without a range is reported as such
PLAUSIBLE = {
    "watchtower_gpu_utilization_ratio": (0.0, 1.0),
    "watchtower_gpu_memory_used_bytes": (1e6, 1e12),
    "watchtower_gpu_memory_total_bytes": (1e9, 1e12),
    "watchtower_gpu_temperature_celsius": (5.0, 110.0),
    "watchtower_gpu_power_watts": (5.0, 2000.0),
    "watchtower_gpu_sm_clock_hertz": (1e8, 4e9),
    "watchtower_gpu_throttled": (0.0, 1.0),
    "watchtower_gpu_memory_peak_allocated_bytes": (1e6, 1e12),
    "watchtower_gpu_memory_peak_reserved_bytes": (1e6, 1e12),
}


def say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


PARTIAL: Path | None = None  # --out/gpu_check.partial.json: each part's result as it ends


def part(name: str, fn: Callable[[], dict]) -> dict:
    """Run one part; a failure becomes {"error": ...} (its traceback on stderr), never the end of the run.
    With --out, the part's result is added to gpu_check.partial.json as it ends: a run stopped at its
    time limit still gives back the parts it finished."""
    say(f"{name} ...")
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - report it and go on with the next part
        traceback.print_exc()
        out = {"error": f"{type(err).__name__}: {err}"}
    say(f"{name} done in {time.perf_counter() - start:.1f}s")
    if PARTIAL is not None:
        try:
            done = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
            done[name] = out
            PARTIAL.write_text(json.dumps(done))
        except (OSError, ValueError, TypeError) as err:
            say(f"could not keep {name} in {PARTIAL}: {err}")
    return out


def free_cuda() -> None:
    """Give back what a failed (OOM) attempt left in the caching allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainer_config(preset: str, out: str, steps: int, micro_batch: int | None, cuda: bool,
                   extra: list[tuple[str, Any]] = ()) -> TrainConfig:
    """Each trainer writes into a folder of its own under `out` (a second trainer in one folder would
    meet the first one's checkpoints as another run's)."""
    overrides: list[tuple[str, Any]] = [*extra, ("run.output_dir", tempfile.mkdtemp(dir=out)),
                                        ("train.steps", steps), ("train.tp", 1),
                                        ("monitor.port", 0), ("checkpoint.resume", False),
                                        ("checkpoint.interval_steps", 0)]
    if micro_batch:
        overrides.append(("train.micro_batch_size", micro_batch))
    overrides.append(("train.device", "cuda" if cuda else "cpu"))
    if cuda:
        overrides.append(("train.mixed_precision", "bf16"))
    return load_config(preset, overrides)


# ---- the steps: the bundled trainer's loop body, on its own model, optimizer and data ----------------------

class Loop:
    """One replica group's step of `Trainer.train` (TP=1), timed by whichever monitor is passed in.

    The trainer's own loop owns its monitor; to compare bare and monitored steps on one model in one
    process, this runs the same body (forward_backward, grad norm, clip, record, optimizer step)
    under either of two monitors.
    """

    def __init__(self, trainer: Trainer):
        self.t = trainer
        tc = trainer.cfg.train
        self.tokens = tc.micro_batch_size * tc.seq_len * tc.grad_accum_steps
        self.cuda = trainer.device.type == "cuda"

    def step(self, monitor: Monitor, loader) -> None:
        t = self.t
        with monitor.step(tokens=self.tokens) as s:
            losses = [t.forward_backward(next(loader), None) for _ in range(t.cfg.train.grad_accum_steps)]
            norm = grad_norm(t.params, t.tp_group)
            if t.cfg.optim.grad_clip:
                clip_grads_(t.params, norm, t.cfg.optim.grad_clip)
            s.record(loss=torch.stack(losses).mean(), grad_norm=norm, lr=t.optimizer.param_groups[0]["lr"])
            if s.should_step():
                t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)

    def run(self, monitor: Monitor, steps: int) -> None:
        loader = monitor.wrap(self.t.data)
        for _ in range(steps):
            self.step(monitor, loader)

    def block(self, monitor: Monitor, steps: int) -> float:
        """Seconds per step over `steps`, the device drained before and after."""
        self.sync()
        start = time.perf_counter()
        self.run(monitor, steps)
        self.sync()
        return (time.perf_counter() - start) / steps

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ---- 1. throughput ----------------------------------------------------------------------------------------

def largest_micro_batch(start: int, out: str, extra: list[tuple[str, Any]]) -> tuple[int, dict[str, str]]:
    """Halve the micro-batch from `start` until three steps of smol-135m fit (the optimizer's state
    is made on the first step, the peak comes in a later one)."""
    tried: dict[str, str] = {}
    size = start
    while size >= 1:
        trainer = None
        try:
            trainer = Trainer(trainer_config(GPU_PRESET, out, 3, size, cuda=True, extra=extra))
            Loop(trainer).block(Monitor(MonitorConfig(enabled=False)), 3)
            tried[str(size)] = "fits"
            return size, tried
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            tried[str(size)] = "oom"
            say(f"micro-batch {size}: out of memory")
        finally:
            if trainer is not None:
                trainer.close()
            del trainer
            free_cuda()
        size //= 2
    raise RuntimeError(f"not even a micro-batch of 1 fits: {tried}")


def is_oom(err: BaseException) -> bool:
    """The allocator's OOM, or a library's failed allocation inside it (cuBLAS, cuDNN workspaces)."""
    return isinstance(err, torch.OutOfMemoryError) or any(
        text in str(err) for text in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def measure_trainer(size: int, steps: int, out: str, extra: list[tuple[str, Any]] = ()) -> tuple[Trainer, dict]:
    """The real Trainer.train() at `size`: tokens/s and MFU of its last log interval (steady state)
    and over the whole run (warm-up included), as its own monitor computed them."""
    trainer = Trainer(trainer_config(GPU_PRESET, out, steps, size, cuda=True, extra=extra))
    trainer.train()
    s, cfg = trainer.monitor.state, trainer.cfg
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_flops_for(torch.cuda.get_device_name(trainer.device))  # the table the monitor's MFU uses
    whole = s.tokens_total / s.step_time_total_s
    return trainer, {
        "preset": GPU_PRESET, "micro_batch_size": size, "seq_len": cfg.train.seq_len, "steps": steps,
        "tokens_per_second": round(s.tokens_per_s, 1),
        "mfu_ratio": None if s.mfu is None else round(s.mfu, 4),
        "tokens_per_second_whole_run": round(whole, 1),
        "mfu_ratio_whole_run": round(whole * fpt / peak, 4) if peak else None,
        "flops_per_token": fpt, "peak_flops_per_second": peak, "losses": first_losses(trainer),
    }


def first_losses(trainer: Trainer, count: int = 10) -> list[float]:
    """The first `count` losses the run logged (train_log.jsonl): what a compiled run is compared on."""
    path = Path(trainer.cfg.run.output_dir) / "train_log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [round(r["loss"], 5) for r in rows if "loss" in r][:count]


def compile_overrides(args) -> list[tuple[str, Any]]:
    return [("train.compile", True), ("train.compile_backend", "inductor")] if args.compile else []


def throughput(args, out: str) -> tuple[Trainer | None, dict]:
    extra = compile_overrides(args)
    size, tried = largest_micro_batch(args.max_micro_batch, out, extra)
    say(f"largest micro-batch that fits: {size}")
    eager_reference: dict | None = None
    if args.compile:  # the same steps eager (masked), first (two trainers at once would not fit): the
        # compiled blocks (flex_attention) must train the same
        try:
            eager, reference = measure_trainer(size, 10, out)
            eager.close()
            del eager
            eager_reference = {"losses": reference["losses"]}
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            eager_reference = {"error": f"{type(err).__name__}: {err}"}
        free_cuda()
    # plain causal attention (the flash kernel), then the default's intra-document masking (eager: a
    # dense mask, which SDPA serves with a slower kernel; compiled: flex_attention): what masking costs.
    # Each trainer is closed before the next.
    try:
        causal, plain = measure_trainer(size, args.steps, out, [*extra, ("data.document_masking", False)])
        causal.close()
        del causal
    except Exception as err:  # noqa: BLE001 - a figure beside the main one: report it, go on
        traceback.print_exc()
        plain = {"error": f"{type(err).__name__}: {err}"}
    free_cuda()
    trainer, result = measure_trainer(size, args.steps, out, extra)
    result["document_masking"] = True
    result["without_document_masking"] = {k: plain.get(k) for k in (
        "tokens_per_second", "mfu_ratio", "tokens_per_second_whole_run", "mfu_ratio_whole_run", "error")
        if k in plain}
    result["micro_batch_search"] = tried
    result["compiled"] = args.compile  # train.compile: each block torch.compile'd (inductor)
    result["without_document_masking"]["losses"] = plain.get("losses")
    if eager_reference is not None:
        if "losses" in eager_reference:
            pairs = list(zip(result["losses"], eager_reference["losses"]))
            eager_reference["max_abs_loss_difference"] = round(max(abs(a - b) for a, b in pairs), 5)
        result["eager_reference"] = eager_reference
    return trainer, result


# ---- 2. hook overhead --------------------------------------------------------------------------------------

def hook_overhead(loop: Loop, on: Monitor, off: Monitor, blocks: int, block_steps: int) -> dict:
    loop.block(off, 2)
    loop.block(on, 2)  # warm both paths
    bare, monitored = [], []
    for _ in range(blocks):
        bare.append(loop.block(off, block_steps))
        monitored.append(loop.block(on, block_steps))
    t_bare, t_on = statistics.median(bare), statistics.median(monitored)
    return {"overhead_ratio": round(t_bare / t_on, 4), "seconds_per_step_bare": round(t_bare, 5),
            "seconds_per_step_monitored": round(t_on, 5), "blocks": blocks, "block_steps": block_steps}


# ---- 3. host syncs ------------------------------------------------------------------------------------------

@contextmanager
def sync_warnings(into: list[dict]):
    """Record every sync warning of torch.cuda.set_sync_debug_mode("warn") with the innermost frame
    of the monitor's own code on the stack when it was raised (None: not the monitor's)."""
    hooks_dir = os.path.realpath(os.path.dirname(watchtower.hooks.__file__))

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if os.path.realpath(f.filename).startswith(hooks_dir)]
        where = ours[-1] if ours else None
        into.append({"at": f"{filename}:{lineno}",
                     "monitor": None if where is None else
                     f"hooks/{os.path.relpath(os.path.realpath(where.filename), hooks_dir)}:{where.lineno} "
                     f"in {where.name}"})

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


def host_syncs(loop: Loop, on: Monitor, off: Monitor, steps: int) -> dict:
    counts = {}
    monitor_caused: list[dict] = []
    for name, monitor in (("bare", off), ("monitored", on)):
        caught: list[dict] = []
        loop.sync()
        with sync_warnings(caught):
            loop.run(monitor, steps)  # no synchronize of our own inside the window
        loop.sync()
        counts[name] = len(caught)
        monitor_caused += [c for c in caught if c["monitor"]]
    return {"steps": steps, "log_interval": on.cfg.log_interval, "nonfinite_action": on.cfg.nonfinite_action,
            "sync_warnings_bare": counts["bare"], "sync_warnings_monitored": counts["monitored"],
            "monitor_sync_warnings": len(monitor_caused),
            "remaining": sorted({c["monitor"] for c in monitor_caused})}


# ---- 5. CUDA-event vs wall step time -----------------------------------------------------------------------

def step_time(loop: Loop, on: Monitor, steps: int, warmup: int = 3) -> dict:
    """Per step: GPU time between events recorded at the step's start and end, ÷ the wall time from the
    previous step's end to this one's (the monitor's own two measures, taken alongside it)."""
    loader = on.wrap(loop.t.data)
    marks, walls = [], []
    loop.sync()
    last = time.perf_counter()
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loop.step(on, loader)
        end.record()
        now = time.perf_counter()
        marks.append((start, end))
        walls.append(now - last)
        last = now
    loop.sync()
    gpu = [s.elapsed_time(e) / 1000.0 for s, e in marks][warmup:]
    ratios = sorted(g / w for g, w in zip(gpu, walls[warmup:]))
    return {"steps": len(ratios), "agreement_ratio_median": round(statistics.median(ratios), 4),
            "agreement_ratio_min": round(ratios[0], 4), "agreement_ratio_max": round(ratios[-1], 4),
            "within_5_percent": sum(abs(r - 1) <= 0.05 for r in ratios),
            "gpu_step_seconds_median": round(statistics.median(gpu), 5),
            "wall_step_seconds_median": round(statistics.median(walls[warmup:]), 5),
            "monitor_step_time_seconds": on.state.step_time_s}


# ---- 4. the scrape -----------------------------------------------------------------------------------------

def fetch(port: int, accept: str) -> tuple[str, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    start = time.perf_counter()
    with open_direct(request, timeout=5) as r:
        body = r.read().decode()
    return body, time.perf_counter() - start


def promtool_findings(text: str, om: str) -> dict:
    """What `promtool check metrics` says of each body, beyond what is expected: nothing for 0.0.4
    text; for OpenMetrics (promtool parses only the 0.0.4 grammar) exactly "x_total no help text"
    once per counter family, and no parse error (exit 1: e.g. a second HELP line)."""
    exe = shutil.which("promtool")
    if exe is None:
        return {"skipped": "promtool not on PATH (check the bodies kept with --out)"}

    def check(body: str) -> tuple[int, list[str]]:
        r = subprocess.run([exe, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
        return r.returncode, (r.stdout + r.stderr).strip().splitlines()

    code, lines = check(text)
    text_problems = [] if code == 0 and not lines else lines or [f"exit {code}"]
    counters = set(re.findall(r"^# TYPE (\S+) counter$", om, re.M))
    code, lines = check(om)
    expected = {f"{c}_total no help text" for c in counters}
    om_problems = (["exit 1 (parse error)"] if code == 1 else []) + [x for x in lines if x not in expected]
    return {"text": text_problems or "clean", "openmetrics": om_problems or "clean"}


def samples_of(text: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in parse_text(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def gpu_gauges(found: dict[str, list[tuple[dict, float]]]) -> dict:
    """Every GPU gauge of the catalog: its values and whether each is in the range a healthy GPU reads."""
    report, missing, implausible = {}, [], []
    for spec in GPU_METRICS:
        if spec.kind != "gauge":
            continue
        values = [v for _, v in found.get(spec.name, [])]
        if not values:
            missing.append(spec.name)
            continue
        low, high = PLAUSIBLE.get(spec.name, (None, None))
        ok = low is not None and all(low <= v <= high for v in values)
        if spec.name == "watchtower_gpu_memory_used_bytes":  # used within total, on the same GPU
            total = [v for _, v in found.get("watchtower_gpu_memory_total_bytes", [])]
            ok = ok and bool(total) and max(values) <= max(total)
        extra = [label for label in spec.labels if label not in RANK_LABELS]  # gpu, reason
        report[spec.name] = {",".join(f"{k}={labels[k]}" for k in extra): v for labels, v in found[spec.name]}
        if not ok:
            implausible.append(spec.name if low is not None else f"{spec.name} (no plausible range in gpu_check)")
    return {"values": report, "missing": missing, "implausible": implausible}


def scrape(port: int, cuda: bool, keep: Path | None, scrapes: int = 100) -> tuple[dict, dict]:
    """The scrape report, and the samples it read (for the memory part)."""
    text, _ = fetch(port, TEXT_FORMAT)
    om, _ = fetch(port, OPENMETRICS)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "metrics.prom").write_text(text)
        (keep / "metrics.openmetrics.txt").write_text(om)
    found = samples_of(text)
    names = [f.name for f in parse_openmetrics(om)]  # the strict parser: raises on a second HELP/TYPE
    times = [fetch(port, OPENMETRICS)[1] for _ in range(scrapes)]
    report: dict[str, Any] = {
        "promtool": promtool_findings(text, om),
        "openmetrics_parse": "clean" if len(names) == len(set(names)) else sorted({n for n in names
                                                                                   if names.count(n) > 1}),
        "scrape_median_ms": round(statistics.median(times) * 1000, 3), "scrapes": scrapes,
        "families": len(names), "bytes": len(om),
        "hook_errors": sum(v for _, v in found.get("watchtower_hook_errors_total", [])),
    }
    if cuda:
        report["gpu_gauges"] = gpu_gauges(found)
    else:
        report["gpu_gauges"] = dict(NO_CUDA, present_on_cpu=sorted(s.name for s in GPU_METRICS if s.name in found))
    return report, found


# ---- 6. memory ---------------------------------------------------------------------------------------------

def memory(found: dict[str, list[tuple[dict, float]]], cuda: bool, search_ooms: int) -> dict:
    if not found:
        raise RuntimeError("the scrape failed: no samples to read")
    names = list(ALLOCATOR_STATS.values())
    declared = [n for n in names if n in RANK_METRICS]
    if not cuda:
        return dict(NO_CUDA, declared=declared, absent_from_scrape=not any(n in found for n in names))
    exported = {n: found[n][0][1] if n in found else None for n in names}
    return {"exported": exported, "declared": declared,
            "torch_max_memory_allocated": torch.cuda.max_memory_allocated(),
            "torch_max_memory_reserved": torch.cuda.max_memory_reserved(),
            "ooms_seen_by_the_micro_batch_search": search_ooms,
            "note": "peaks since reset_peak_memory_stats() after the throughput part; retries and OOMs since "
                    "the process started (the search's OOMs included)"}


# ---- the run -------------------------------------------------------------------------------------------------

def goals(result: dict) -> dict:
    """The issue's goals, each true/false, or None where the figure is missing (skipped, failed)."""
    def get(*path):
        node = result
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, (int, float)) else None

    checks = {"mfu_ratio >= 0.30": (get("throughput", "mfu_ratio"), lambda v: v >= 0.30),
              "overhead_ratio >= 0.99": (get("hook_overhead", "overhead_ratio"), lambda v: v >= 0.99),
              "monitor_sync_warnings == 0": (get("host_syncs", "monitor_sync_warnings"), lambda v: v == 0),
              "scrape_median_ms <= 5": (get("scrape", "scrape_median_ms"), lambda v: v <= 5),
              "step time agreement within 5%": (get("step_time", "agreement_ratio_median"),
                                                lambda v: abs(v - 1) <= 0.05)}
    return {name: None if value is None else bool(ok(value)) for name, (value, ok) in checks.items()}


def monitored_parts(trainer: Trainer, cuda: bool, blocks: int, block_steps: int, keep: Path | None,
                    search_ooms: int) -> dict:
    """Parts 2-6 on one built trainer, with a monitor serving /metrics (scraped once a second, as
    Prometheus would, while the overhead blocks run) and a disabled one for the bare steps."""
    cfg = trainer.cfg
    on = Monitor(MonitorConfig(port=free_port(), bind="127.0.0.1", log_interval=10, system_interval_s=1.0,
                               nonfinite_action="count"), RankIdentity(run="gpu-check", node=socket.gethostname()),
                 device=trainer.device, flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                 model_name=GPU_PRESET if cuda else CPU_PRESET)
    off = Monitor(MonitorConfig(enabled=False))
    loop = Loop(trainer)
    stop = threading.Event()

    def prometheus() -> None:
        while not stop.wait(1.0):
            try:
                fetch(on.port, OPENMETRICS)
            except OSError:
                pass

    threading.Thread(target=prometheus, daemon=True).start()
    out: dict[str, Any] = {}
    try:
        out["hook_overhead"] = part("hook_overhead", lambda: hook_overhead(loop, on, off, blocks, block_steps))
        out["host_syncs"] = part("host_syncs", lambda: host_syncs(loop, on, off, 2 * on.cfg.log_interval + 1)
                                 ) if cuda else dict(NO_CUDA)
        out["step_time"] = part("step_time", lambda: step_time(loop, on, 3 * on.cfg.log_interval)
                                ) if cuda else dict(NO_CUDA)
        if cuda:
            loop.run(on, on.cfg.log_interval)  # ends on a flush: the allocator's counters are fresh
        found: dict = {}

        def run_scrape() -> dict:
            report, seen = scrape(on.port, cuda, keep)
            found.update(seen)
            return report

        out["scrape"] = part("scrape", run_scrape)
        out["memory"] = part("memory", lambda: memory(found, cuda, search_ooms))
    finally:
        stop.set()
        on.close()
    return out



class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line naming the flag, exit 2 (argparse's default adds the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"gpu_check: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the scraped /metrics bodies here")
    ap.add_argument("--max-micro-batch", type=int, default=64, help="the micro-batch search starts here (GPU)")
    ap.add_argument("--steps", type=int, default=40, help="Trainer.train() steps for the throughput figure (GPU)")
    ap.add_argument("--blocks", type=int, default=None, help="bare/monitored block pairs (default 8 GPU, 3 CPU)")
    ap.add_argument("--block-steps", type=int, default=None, help="steps per block (default 10 GPU, 2 CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="every trainer with train.compile (inductor, per block); GPU only, ignored on a CPU")
    args = ap.parse_args(argv)
    for name in ("max_micro_batch", "steps", "blocks", "block_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    global PARTIAL
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        PARTIAL = args.out / "gpu_check.partial.json"
        PARTIAL.unlink(missing_ok=True)  # our own file, from an earlier run into the same folder
    cuda = torch.cuda.is_available()
    if not cuda:  # a smoke run, often on a shared machine: OpenMP's spin-waits under load cost 10x a step
        torch.set_num_threads(1)
    blocks, block_steps = args.blocks or (8 if cuda else 3), args.block_steps or (10 if cuda else 2)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                              "preset": GPU_PRESET if cuda else CPU_PRESET}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as out:
        trainer = None
        if cuda:
            def run_throughput() -> dict:
                nonlocal trainer
                trainer, report = throughput(args, out)
                return report

            result["throughput"] = part("throughput", run_throughput)
            torch.cuda.reset_peak_memory_stats()  # the memory part's peaks: the chosen micro-batch's
        else:
            result["throughput"] = dict(NO_CUDA)
        if trainer is None:  # CPU, or the throughput part failed: a trainer (the preset's micro-batch) all the same
            trainer = Trainer(trainer_config(GPU_PRESET if cuda else CPU_PRESET, out, 10, None, cuda,
                                             extra=compile_overrides(args) if cuda else []))
        try:
            result.update(monitored_parts(trainer, cuda, blocks, block_steps, args.out,
                                          search_ooms=sum(v == "oom" for v in
                                                          result["throughput"].get("micro_batch_search", {}).values())))
        finally:
            trainer.close()
    result["goals"] = goals(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
