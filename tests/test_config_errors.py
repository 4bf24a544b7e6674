"""Bad configuration is refused before anything starts: exit 2, one line, the full key named.

The table runs `cli.main` in this process (a row costs milliseconds, not an interpreter start); one
case runs the real `watchtower` process to prove the exit code and the single line hold there too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import run_watchtower
from watchtower import cli
from watchtower.supervisor.jobfile import job_toml

needs_no_s3fs = pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None,
                                   reason="s3fs is installed here: the s3:// backend is not missing")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

BAD_FLAGS = [
    (["--model.dim", "-3"], "model.dim"),
    (["--tp", "3"], "train.tp"),
    (["--model.n_heads", "5"], "model.n_heads"),
    (["--steps", "0"], "train.steps"),
    (["--train.device", "tpu"], "train.device"),
    (["--train.compile", "true", "--train.compile_backend", "nope"], "train.compile_backend", "inductor, aot_eager, eager"),
    # torch lists tvm, but it fails at the first step (an ImportError, a crash loop when supervised)
    (["--train.compile", "true", "--train.compile_backend", "tvm"], "train.compile_backend", "one of"),
    (["--train.compile_backend", ""], "train.compile_backend", "one of"),
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
    # the --section.key flags are argparse's now: a value like -1e-3 stays a value, a flag without one is one line
    (["--optim.lr", "-1e-3"], "optim.lr", "> 0"),
    (["--model.dim"], "model.dim", "needs a value"),
    # accepted before, then never fired (no group -1, no rank 99 at tp=1) or injected NaN as a "spike"
    (["--inject", "crash@5:group=-1"], "faults.inject[0]", "group"),
    (["--inject", "crash@5:rank=99"], "faults.inject[0]", "train.tp = 1"),
    (["--tp", "2", "--inject", "stall@5:1s:rank=2"], "faults.inject[0]", "train.tp = 2"),
    (["--inject", "loss_spike@5:nan"], "faults.inject[0]", "nonfinite@5"),
    (["--inject", "loss_spike@5:inf"], "faults.inject[0]", "nonfinite@5"),
    (["--inject", "loss_spike@5", "--inject", "loss_spike@5:-2"], "faults.inject[1]", "> 0"),
    # a traceback before: the fsspec backend is missing, or the protocol is unknown
    pytest.param(["--data.source", "s3://bucket/corpus/"], "data.source", "pip install s3fs",
                 marks=needs_no_s3fs, id="s3-without-s3fs"),
    (["--data.source", "nosuchproto://bucket/x"], "data.source", "protocol"),
    # a traceback before (review of issue 11, finding 6): checkpoint.dir and run.output_dir were first
    # met by fsspec / mkdir after the config was accepted. {file} is an existing file.
    pytest.param(["--checkpoint.dir", "s3://bucket/ck"], "checkpoint.dir", "pip install s3fs",
                 marks=needs_no_s3fs, id="checkpoint-s3-without-s3fs"),
    (["--checkpoint.dir", "nosuchproto://bucket/ck"], "checkpoint.dir", "protocol"),
    (["--checkpoint.dir", "{file}"], "checkpoint.dir", "is a file"),
    (["--checkpoint.dir", "{file}/ck"], "checkpoint.dir", "is a file"),
    (["--run.output_dir", "{file}"], "run.output_dir", "is a file"),
    (["--run.output_dir", "{file}/run"], "run.output_dir", "is a file"),
    # an AttributeError from deep in torch before
    pytest.param(["--train.device", "cuda"], "train.device", "--train.device cpu",
                 marks=needs_no_cuda, id="cuda-without-cuda"),
]
BAD_FLAGS = [row if len(row.values if hasattr(row, "values") else row) == 3 else (*row, "")
             for row in BAD_FLAGS]


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must return 2 with exactly one line on stderr, which is returned."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags,field,says", BAD_FLAGS)
def test_bad_flag_exits_2_naming_the_field(tmp_path, capsys, flags, field, says):
    out = tmp_path / "run"
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    flags = [f.replace("{file}", str(a_file)) for f in flags]
    line = refused(capsys, "train", "--config", "tiny", "--output-dir", str(out), *flags)
    assert line.startswith(f"config error: {field} ="), line
    assert says in line, line
    assert not out.exists(), "nothing may start before the config is valid"


NOT_UTF8 = "[run]\nname = \"caf\u00e9\"\n".encode("latin-1")  # é as one latin-1 byte, 0xe9


@pytest.mark.parametrize("toml,field", [
    ('[model]\ndim = "big"\n', "model.dim"),
    ("[model\ndim = 3\n", "--config"),
    ("[trainer]\nsteps = 3\n", "trainer"),
    ("[train]\ntp = 2\n[model]\nn_heads = 4\nn_kv_heads = 1\n", "train.tp"),
    (NOT_UTF8, "--config"),
], ids=["wrong-type", "bad-toml", "unknown-section", "tp-vs-kv-heads", "not-utf8"])
def test_bad_toml_file_exits_2(tmp_path, capsys, toml, field):
    path = tmp_path / "job.toml"
    path.write_bytes(toml if isinstance(toml, bytes) else toml.encode())
    line = refused(capsys, "train", "--config", str(path), "--output-dir", str(tmp_path / "run"))
    assert line.startswith(f"config error: {field} "), line


def test_job_file_not_utf8_is_refused_naming_the_job_file(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_bytes(b"[job]\nname = \"caf\xe9\"\n")
    line = refused(capsys, "supervise", str(path))
    assert line.startswith("config error: job file = ") and "UTF-8" in line, line


@pytest.mark.parametrize("override,expected", [
    pytest.param("train.device=cuda", "config error: train.device = 'cuda': ", marks=needs_no_cuda),
    # Review finding 6: every group died of the traceback and the job ended as a crash loop (exit 3).
    ("checkpoint.dir=nosuchproto://bucket/ck", "config error: job.train_overrides: checkpoint.dir = 'nosuchproto://"),
], ids=["cuda-without-cuda", "unusable-checkpoint-dir"])
def test_supervised_job_the_trainer_would_refuse_is_refused_before_the_lighthouse(tmp_path, capsys, override, expected):
    out = tmp_path / "job-out"
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "cj", "trainer_config": "tiny", "output_dir": str(out),
                              "train_overrides": [override]}, {"nodes": ["a"]}))
    line = refused(capsys, "supervise", str(path))
    assert line.startswith(expected), line
    assert not out.exists(), "nothing may start before the config is valid"


def test_corpus_too_small_for_the_active_groups_is_refused_before_the_lighthouse(tmp_path, capsys):
    """Review of issue 11, finding 4: 1500 bytes hold one group's batch (11 windows of 128, batch 8) but
    not the global batch of 2 active groups; every group exited 2 at step 1 and was restarted forever."""
    out = tmp_path / "job-out"
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "cj", "trainer_config": "tiny", "output_dir": str(out),
                              "train_overrides": ["data.max_bytes=1500"]},
                             {"nodes": ["a", "b"], "active_groups": 2}))
    line = refused(capsys, "supervise", str(path))
    assert line.startswith("config error: data.source = "), line
    assert "2 active groups" in line and "train.micro_batch_size" in line, line
    assert not out.exists(), "nothing may start before the config is valid"


def test_missing_config_file_names_presets(capsys):
    line = refused(capsys, "train", "--config", "no-such-preset")
    assert "--config" in line and "tiny" in line


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """The one subprocess case: the installed entry point, not just `main`, keeps the contract."""
    out = tmp_path / "run"
    result = run_watchtower("train", "--config", "tiny", "--output-dir", str(out), "--model.dim", "-3")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("config error: model.dim = -3: "), result.stderr
    assert not out.exists()


@pytest.mark.parametrize("key,value,says", [
    ("health_check", "", "must be a shell command"),
    ("health_check", "   ", "must be a shell command"),
    ("health_check_timeout_s", -5, "must be > 0 seconds"),
    ("health_check_timeout_s", 0, "must be > 0 seconds"),
    ("health_min_free_bytes", -1, "must be >= 0"),
    ("health_min_gpu_free_fraction", 1.5, "between 0 and 1"),
])
def test_bad_health_gate_key_exits_2_naming_the_key(tmp_path, capsys, key, value, says):
    """Issue 13, item 5: the node health gate's [cluster] keys are refused before anything starts."""
    out = tmp_path / "job-out"
    path = tmp_path / "job.toml"
    path.write_text(job_toml({"name": "cj", "trainer_config": "tiny", "output_dir": str(out)}, {"nodes": ["a"], key: value}))
    line = refused(capsys, "supervise", str(path))
    assert line.startswith(f"config error: cluster.{key} = ") and says in line, line
    assert not out.exists(), "nothing may start before the config is valid"
