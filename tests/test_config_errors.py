"""Bad configuration is refused before anything starts: exit 2, one line, the full key named."""

from __future__ import annotations

import pytest

from conftest import run_watchtower

BAD_FLAGS = [
    (["--model.dim", "-3"], "model.dim"),
    (["--tp", "3"], "train.tp"),
    (["--model.n_heads", "5"], "model.n_heads"),
    (["--steps", "0"], "train.steps"),
    (["--train.device", "tpu"], "train.device"),
    (["--optim.lr", "abc"], "optim.lr"),
    (["--model.colour", "red"], "model.colour"),
    (["--inject", "explode@5"], "faults.inject[0]"),
    (["--inject", "stall@5"], "faults.inject[0]"),
    (["--train.seq_len", "512"], "train.seq_len"),
    (["--monitor.nonfinite_action", "explode"], "monitor.nonfinite_action"),
    (["--monitor.loss_spike.z_threshold", "-1"], "monitor.loss_spike.z_threshold"),
    (["--checkpoint.keep_last", "0"], "checkpoint.keep_last"),
    (["--data.source", "/no/such/corpus"], "data.source"),
    (["--model.vocab_size", "100"], "model.vocab_size"),
]


@pytest.mark.parametrize("flags,field", BAD_FLAGS, ids=[f for _, f in BAD_FLAGS])
def test_bad_flag_exits_2_naming_the_field(tmp_path, flags, field):
    out = tmp_path / "run"
    result = run_watchtower("train", "--config", "tiny", "--output-dir", str(out), *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"config error: {field} ="), lines[0]
    assert not out.exists(), "nothing may start before the config is valid"


@pytest.mark.parametrize("toml,field", [
    ('[model]\ndim = "big"\n', "model.dim"),
    ("[model\ndim = 3\n", "--config"),
    ("[trainer]\nsteps = 3\n", "trainer"),
    ("[train]\ntp = 2\n[model]\nn_heads = 4\nn_kv_heads = 1\n", "train.tp"),
], ids=["wrong-type", "bad-toml", "unknown-section", "tp-vs-kv-heads"])
def test_bad_toml_file_exits_2(tmp_path, toml, field):
    path = tmp_path / "job.toml"
    path.write_text(toml)
    result = run_watchtower("train", "--config", str(path), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(f"config error: {field} "), result.stderr


def test_missing_config_file_names_presets(tmp_path):
    result = run_watchtower("train", "--config", "no-such-preset")
    assert result.returncode == 2
    assert "--config" in result.stderr and "tiny" in result.stderr
