"""What a launcher pays before its ranks start: no torch import (~4 s idle, more under load).

`watchtower train --tp 2` reads and validates the config, then spawns the ranks, which import torch
themselves; a torch import in the launcher ran before any rank started, so every TP launch took it
twice, one after the other. The same holds for every process that only validates (a config error's
exit 2, `watchtower supervise` / `sbatch` checking a job before the Lighthouse).
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Runs in a fresh interpreter (this one has torch already). Each step reports whether torch was in
# sys.modules when it ended; the TP launcher's spawn is replaced by a probe, so no rank starts.
PROBE = r"""
import json, sys
seen = {}

def torch_loaded():
    return sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:3]

import watchtower.config
watchtower.config.load_config("tiny")
seen["load_config"] = torch_loaded()

import watchtower.launch
from watchtower import cli

def spawn_probe(argv, tp):
    seen["tp2_launcher_at_spawn"] = torch_loaded()
    return 0

watchtower.launch.launch_local = spawn_probe
out, bad_job, good_job = sys.argv[1:4]
tp2 = ["train", "--config", "tiny", "--tp", "2", "--steps", "1", "--output-dir", out, "--port", "0"]
seen["tp2_exit"] = cli.main(tp2)
seen["bad_train_exit"] = cli.main(["train", "--config", "tiny", "--model.dim", "-3", "--output-dir", out])
seen["bad_supervise_exit"] = cli.main(["supervise", bad_job])
seen["after_config_errors"] = torch_loaded()

from watchtower.supervisor.config import load_job
job, trainer = load_job(good_job)
cli.check_job(job, trainer)
seen["after_check_job"] = torch_loaded()
print(json.dumps(seen))
"""


def test_launcher_and_config_errors_import_no_torch(tmp_path):
    """Defect: `import watchtower.config` imported torch (through the hooks package's Monitor and the
    trainer modules that held the config dataclasses), so the TP launcher, every config error and a
    supervisor's check of its job each paid ~4 s before doing anything."""
    from watchtower.supervisor.jobfile import job_toml

    bad_job = tmp_path / "bad.toml"
    bad_job.write_text(job_toml({"name": "cj", "trainer_config": "tiny", "output_dir": str(tmp_path / "bad-out"),
                                 "train_overrides": ["model.dim=-3"]}, {"nodes": ["a"]}))
    good_job = tmp_path / "good.toml"
    good_job.write_text(job_toml({"name": "cj", "trainer_config": "tiny", "output_dir": str(tmp_path / "good-out")},
                                 {"nodes": ["a"]}))
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run"), str(bad_job), str(good_job)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert (seen["tp2_exit"], seen["bad_train_exit"], seen["bad_supervise_exit"]) == (0, 2, 2), result.stderr
    assert seen == {"load_config": [], "tp2_launcher_at_spawn": [], "tp2_exit": 0, "bad_train_exit": 2,
                    "bad_supervise_exit": 2, "after_config_errors": [], "after_check_job": []}, seen
