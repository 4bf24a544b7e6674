"""The config is discoverable: `watchtower train --help` lists every key the dataclasses define, and
`watchtower config show` prints a preset as TOML that loads back to the same config. In-process
(`cli.main`), milliseconds each; the config errors these flags keep are in test_config_errors.py."""

from __future__ import annotations

import re

import pytest

from watchtower import cli
from watchtower.config import TrainConfig, load_config
from watchtower.config_flags import config_keys


def squash(text: str) -> str:
    """Help text without whitespace: argparse wraps lines (and splits at hyphens) by terminal width."""
    return re.sub(r"\s+", "", text)


def test_train_help_lists_every_config_key_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--help"])
    assert exited.value.code == 0
    shown = squash(capsys.readouterr().out)
    keys = config_keys(TrainConfig)
    assert len(keys) > 60 and {"model.dim", "monitor.loss_spike.z_threshold", "faults.inject"} <= {k.key for k in keys}
    undocumented = [k.key for k in keys if not k.doc]
    assert not undocumented, f"document these fields (a `name: text` docstring entry or a # comment): {undocumented}"
    missing = [k.key for k in keys if squash(f"--{k.key} {k.type_name} {k.doc} (default: {k.default_text})") not in shown]
    assert not missing, missing


def test_config_show_prints_toml_that_loads_back_to_the_same_config(tmp_path, capsys):
    overrides = ["--model.dim", "64", "--monitor.loss_spike.z_threshold", "5", "--faults.inject", "crash@5,stall@7:2s"]
    assert cli.main(["config", "show", "tiny", *overrides]) == 0
    printed = tmp_path / "start.toml"
    printed.write_text(capsys.readouterr().out)
    expected = load_config("tiny", [(flag[2:], value) for flag, value in zip(overrides[::2], overrides[1::2])])
    assert load_config(str(printed)) == expected
    assert expected != load_config("tiny") and expected.model.dim == 64
    assert expected.faults.inject == ["crash@5", "stall@7:2s"]


def test_inject_adds_to_a_faults_inject_given_as_text():
    """`--faults.inject a,b` (now listed in --help) with `--inject c` was an AttributeError traceback."""
    cfg = load_config("tiny", [("faults.inject", "crash@5,stall@7:2s"), ("faults.inject", ["nonfinite@9"])])
    assert cfg.faults.inject == ["crash@5", "stall@7:2s", "nonfinite@9"]
