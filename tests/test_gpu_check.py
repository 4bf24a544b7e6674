"""bench/gpu_check.py in its CPU mode: one JSON object on the last line, every part present, the parts
that need CUDA saying so (never a number), and the CPU parts measured: overhead, a promtool-clean
scrape, the GPU memory metrics declared but absent. The GPU figures come from a run on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

PARTS = {"throughput", "hook_overhead", "host_syncs", "scrape", "step_time", "memory"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU mode runs where there is no CUDA")
def test_cpu_mode_reports_gpu_parts_as_skipped_and_measures_the_rest(tmp_path):
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--blocks", "1", "--block-steps", "1",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert PARTS | {"device", "torch", "preset", "goals"} == set(result)
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    for name in ("throughput", "host_syncs", "step_time"):
        assert result[name] == {"skipped": "no CUDA device"}, name
    assert result["hook_overhead"]["overhead_ratio"] > 0
    scrape = result["scrape"]
    assert scrape["promtool"] == {"text": "clean", "openmetrics": "clean"}
    assert scrape["openmetrics_parse"] == "clean" and scrape["hook_errors"] == 0
    assert scrape["scrapes"] == 100 and scrape["scrape_median_ms"] > 0
    assert scrape["gpu_gauges"] == {"skipped": "no CUDA device", "present_on_cpu": []}
    memory = result["memory"]
    assert memory["skipped"] == "no CUDA device" and memory["absent_from_scrape"] is True
    assert len(memory["declared"]) == 4
    assert result["goals"]["mfu_ratio >= 0.30"] is None and result["goals"]["overhead_ratio >= 0.99"] is not None
    assert (tmp_path / "metrics.prom").read_text().startswith("# HELP")
    assert (tmp_path / "metrics.openmetrics.txt").read_text().endswith("# EOF\n")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_check


def test_bad_arguments_are_one_line_naming_the_flag(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--blocks", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--blocks must be >= 1" in err[0], err


def test_gpu_gauges_report_missing_and_implausible_values(gpu_check):
    """The GPU run's judgement, on samples a GPU could serve: used above total, a cold 0 °C reading and
    a gauge not served at all are each named; the healthy ones are kept with their labels."""
    gpu = {"gpu": "0"}
    found = {"watchtower_gpu_utilization_ratio": [(gpu, 0.97)], "watchtower_gpu_memory_total_bytes": [(gpu, 8e10)],
             "watchtower_gpu_memory_used_bytes": [(gpu, 9e10)], "watchtower_gpu_temperature_celsius": [(gpu, 0.0)],
             "watchtower_gpu_throttled": [({"gpu": "0", "reason": "hw_slowdown"}, 0.0)]}
    report = gpu_check.gpu_gauges(found)
    assert report["implausible"] == ["watchtower_gpu_memory_used_bytes", "watchtower_gpu_temperature_celsius"]
    assert "watchtower_gpu_power_watts" in report["missing"] and "watchtower_gpu_utilization_ratio" not in report["missing"]
    assert report["values"]["watchtower_gpu_throttled"] == {"gpu=0,reason=hw_slowdown": 0.0}
    gauges = {s.name for s in gpu_check.GPU_METRICS if s.kind == "gauge"}
    assert gauges == set(gpu_check.PLAUSIBLE), "every GPU gauge of the catalog needs a plausible range"
