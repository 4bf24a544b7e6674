"""AdamW for the bundled trainer, without torch.optim: the same update, and a start 2 s cheaper.

Why not `torch.optim.AdamW`: building any `torch.optim` optimizer imports `torch._dynamo` (its
`add_param_group` is wrapped in `torch._disable_dynamo`, which imports it on first call). That import
costs ~2.1 s of CPU on every process start, about 40 % of a trainer's whole start (torch itself ~2.3 s),
and every start is on the recovery path: a spare that refills the pool after a node death, a group
restarted after a crash. At TP = 1 nothing else the trainer runs imports it (tested); at TP > 1
DTensor's `distribute_tensor` does, when the model is sharded.

What it is: decoupled weight decay Adam (Loshchilov & Hutter), the update `torch.optim.AdamW` makes with
its defaults (no amsgrad, no maximize, not fused), step for step, bit for bit for float32 parameters
(the trainer's): the test runs both on the same gradients and compares every parameter and moment
exactly. A bfloat16 parameter on CPU gets torch's multi-tensor result, not its single-tensor default.
One multi-tensor (`torch._foreach_*`) pass per parameter group and tensor kind (plain or DTensor,
device, dtype), as torch's default on GPU.

`state_dict()` has torch's layout (`state` by parameter index with `step`, `exp_avg`, `exp_avg_sq`;
`param_groups` with torch's keys), so a checkpoint written before this module loads, and a checkpoint
written with it loads into `torch.optim.AdamW`.

Cost per step: the moments (two tensors the size of the parameters) and, transiently, one more for the
denominator, as torch's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# the keys torch.optim.AdamW writes into each saved param group, with the values of the update made here
_TORCH_GROUP_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                      "differentiable": False, "fused": None, "decoupled_weight_decay": True}
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


class AdamW:
    """`params`: tensors, or dicts with "params" and any of lr/betas/eps/weight_decay (torch's groups)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            unknown = set(group) - {"params", *_HYPERPARAMETERS}
            if unknown:
                raise ValueError(f"AdamW param group: unknown keys {sorted(unknown)}")
            self.param_groups.append({**defaults, **group, "params": list(group["params"])})
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    # ---- the update ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient; one without is left as it is (torch's rule)."""
        for group in self.param_groups:
            for batch in _batches([p for p in group["params"] if p.grad is not None]):
                self._update(batch, group)

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self._state_of(p) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [s.item() for s in steps]  # host tensors: no device sync
        step_sizes = [-(lr / (1 - beta1 ** n)) for n in counts]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(p)
        if not state:  # torch keeps the step count as a float32 scalar on the host
            state = self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # ---- checkpoint state (torch's layout) -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        index: dict[torch.Tensor, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                ids.append(index.setdefault(p, len(index)))
            groups.append({**{k: group[k] for k in _HYPERPARAMETERS}, **_TORCH_GROUP_FLAGS, "params": ids})
        state = {index[p]: dict(s) for p, s in self.state.items() if p in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """torch's rules: the same groups and sizes or ValueError; the saved hyperparameters win; moments
        take each parameter's dtype and device, the step count stays on the host."""
        groups = saved["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this model {len(self.param_groups)}")
        by_index: dict[int, torch.Tensor] = {}
        for mine, theirs in zip(self.param_groups, groups):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError("optimizer state's parameter groups differ in size from this model's")
            by_index.update(zip(theirs["params"], mine["params"]))
        self.state = {}
        for key, values in saved["state"].items():
            p = by_index[int(key)]
            self.state[p] = {name: value if name == "step" or not isinstance(value, torch.Tensor)
                             else value.to(dtype=p.dtype, device=p.device) for name, value in values.items()}
        for mine, theirs in zip(self.param_groups, groups):
            for k in _HYPERPARAMETERS:
                if k in theirs:
                    mine[k] = tuple(theirs[k]) if k == "betas" else theirs[k]


def _batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """One list per (plain or DTensor, device, dtype): a multi-tensor op takes one kind of tensor."""
    kinds: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for p in params:
        kinds.setdefault((type(p), p.device, p.dtype), []).append(p)
    return list(kinds.values())
