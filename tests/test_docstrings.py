"""The runnable examples in public docstrings stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["watchtower.trainer.model", "watchtower.trainer.data", "watchtower.hooks.monitor",
           "watchtower.hooks.allocator",
           "watchtower.hooks.config", "watchtower.hooks.detectors.loss_spike", "watchtower.compute_budget",
           "watchtower.integrations.step_feed",
           "watchtower.hooks.detectors.data_stall", "watchtower.hooks.detectors.throughput",
           "watchtower.supervisor.node_check", "watchtower.supervisor.health",
           "watchtower.supervisor.policy", "watchtower.supervisor.policy_types", "watchtower.supervisor.failure_budget",
           "watchtower.supervisor.hangs", "watchtower.supervisor.launches", "watchtower.supervisor.slurm_commands", "watchtower.supervisor.slurm_task",
           "watchtower.supervisor.sbatch", "watchtower.supervisor.lighthouse",
           "watchtower.supervisor.contract", "watchtower.supervisor.errors", "watchtower.supervisor.lock",
           "watchtower.supervisor.observe", "watchtower.supervisor.goodput", "watchtower.supervisor.timeline",
           "watchtower.supervisor.remediation", "watchtower.supervisor.rewind",
           "watchtower.tui.model", "watchtower.supervisor.launcher", "watchtower.toml_dataclasses",
           "watchtower.atomic_write", "watchtower.exposition", "watchtower.orphan_guard",
           "watchtower.shipped", "watchtower.alert_export", "watchtower.config_flags",
           "watchtower.trainer.compiling", "watchtower.supervisor.pool"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
