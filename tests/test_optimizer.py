"""The trainer's AdamW: torch.optim.AdamW's update bit for bit, torch's checkpoint layout, no dynamo import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from watchtower.trainer.optimizer import AdamW

HYPER = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g), torch.randn(8, generator=g), torch.randn(4, 4, generator=g)]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]


def _run(make, steps: int, params: list[torch.Tensor], skip_grad_of: int | None = None):
    """`steps` updates on the same seeded gradients, the lr changed every step as the trainer does."""
    opt = make(_groups(params))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = HYPER["lr"] * (1 - step / (2 * steps))
        for i, p in enumerate(params):
            p.grad = None if i == skip_grad_of and step % 3 == 0 else torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("skip_grad_of", [None, 1])
def test_update_equals_torch_adamw_bit_for_bit(foreach, skip_grad_of):
    ours = [p.clone().requires_grad_() for p in _params()]
    theirs = [p.clone().requires_grad_() for p in _params()]
    mine = _run(lambda groups: AdamW(groups, **HYPER), 12, ours, skip_grad_of)
    torch_opt = _run(lambda groups: torch.optim.AdamW(groups, foreach=foreach, **HYPER), 12, theirs, skip_grad_of)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert a.grad is None
    for a, b in zip(ours, theirs):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine.state[a][key], torch_opt.state[b][key]), key


def test_checkpoints_load_both_ways_with_torch_adamw():
    """A checkpoint written with torch.optim.AdamW (before this module) resumes here, and back."""
    params = [p.clone().requires_grad_() for p in _params()]
    saved_by_torch = _run(lambda groups: torch.optim.AdamW(groups, **HYPER), 5, params).state_dict()
    resumed = AdamW(_groups(params), lr=1.0, betas=(0.5, 0.5), eps=1.0)
    resumed.load_state_dict(saved_by_torch)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in resumed.param_groups] == [
        (g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in saved_by_torch["param_groups"]]
    back = torch.optim.AdamW(_groups(params), **HYPER)
    back.load_state_dict(resumed.state_dict())
    assert back.state_dict()["param_groups"] == saved_by_torch["param_groups"]
    for index, values in saved_by_torch["state"].items():
        for key, value in values.items():
            assert torch.equal(back.state_dict()["state"][index][key], value)


def test_a_state_of_another_model_is_refused():
    params = _params()
    opt = AdamW(_groups(params))
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1, 2], **HYPER, "weight_decay": 0}]})
    with pytest.raises(ValueError, match="differ in size"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0], **HYPER, "weight_decay": 0},
                                                           {"params": [1], **HYPER, "weight_decay": 0}]})


def test_trainer_start_does_not_import_dynamo_or_dtensor(tmp_path):
    """torch.optim imported torch._dynamo (~2 s of CPU) and DTensor's module (~1.2 s: it pulls in sympy) into every
    trainer start, refills and restarts included; a two-step TP=1 run needs neither."""
    script = ("import sys\nfrom watchtower import cli\n"
              f"rc = cli.main(['train', '--config', 'tiny', '--port', '0', '--output-dir', {str(tmp_path / 'out')!r},"
              " '--steps', '2'])\n"
              "print('rc', rc, 'dynamo', 'torch._dynamo' in sys.modules, 'dtensor', 'torch.distributed.tensor' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.stdout.strip().splitlines()[-1] == "rc 0 dynamo False dtensor False", result.stdout + result.stderr
