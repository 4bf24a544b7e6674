"""Per-step scalars that stay on the device until a batch of them can be copied without a sync.

`append` keeps a detached 0-d tensor (no host read). `flush` stacks the pending values and starts
one non-blocking device→host copy, recording a CUDA event behind it; `harvest` returns the values of
every copy whose event has completed, in step order, without ever waiting. On CPU the copy is
immediate and `harvest` returns everything. Net cost on GPU: one small copy per log interval.
"""

from __future__ import annotations

from collections import deque

import torch


class DeviceSeries:
    def __init__(self) -> None:
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []
        self._in_flight: deque[tuple[list[int], torch.Tensor, object]] = deque()

    def append(self, step: int, value: torch.Tensor | float) -> None:
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        self._steps.append(step)
        self._values.append(value.detach().reshape(()).float())

    def __len__(self) -> int:
        return len(self._steps)

    def flush(self) -> None:
        if not self._values:
            return
        devices = {v.device for v in self._values}
        if len(devices) > 1:  # mixed devices (user passed a CPU float one step): bring all to CPU
            self._values = [v.cpu() for v in self._values]
        stacked = torch.stack(self._values)
        event = None
        if stacked.is_cuda:
            host = stacked.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = stacked
        self._in_flight.append((self._steps, host, event))
        self._steps, self._values = [], []

    def harvest(self, wait: bool = False) -> list[tuple[int, float]]:
        """(step, value) pairs whose copy is done; with wait=True, all of them (at shutdown)."""
        out: list[tuple[int, float]] = []
        while self._in_flight:
            steps, host, event = self._in_flight[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._in_flight.popleft()
            out.extend(zip(steps, host.tolist()))
        return out
