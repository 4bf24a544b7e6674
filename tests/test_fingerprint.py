"""Parameter fingerprints and the TP/DP checks: same numbers in bounded memory, and never a hang.

The two-rank test runs a user's own loop (not the bundled trainer) on real Gloo processes: this
file is also the worker script, started as `python tests/test_fingerprint.py RANK PORT OUT`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from watchtower.hooks.fingerprint import CHUNK_ELEMENTS as CHUNK


def whole_tensor_fingerprint(t: torch.Tensor) -> list[float]:
    """The definition, written the memory-hungry way: sum, sum of squares, position-weighted sum."""
    flat = t.reshape(-1).double()
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
    return [flat.sum().item(), flat.pow(2).sum().item(), (flat * weights).sum().item()]


def test_chunked_fingerprint_keeps_the_whole_tensor_values():
    from watchtower.hooks.fingerprint import fingerprint

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3 * CHUNK + 7, generator=g),                   # several chunks and a tail
               torch.randn(1500, 1000, generator=g).t(),                  # transposed: not contiguous
               torch.randn(CHUNK + 3, 2, generator=g).t(),                # rows longer than a chunk
               torch.randn(64, 33, generator=g).to(torch.bfloat16),
               torch.tensor([2.5]), torch.empty(0), torch.tensor(-1.25)]
    got = fingerprint(tensors)
    assert got.shape == (len(tensors), 3) and got.dtype == torch.float64
    for row, t in zip(got.tolist(), tensors):
        for a, b in zip(row, whole_tensor_fingerprint(t)):
            assert math.isclose(a, b, rel_tol=1e-11, abs_tol=1e-9), (t.shape, row)
    x = torch.randn(2 * CHUNK + 5, generator=g)
    a, b = fingerprint([x, x.flip(0)]).tolist()  # same numbers in another order
    assert math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-6) and math.isclose(a[1], b[1], rel_tol=1e-12)
    assert not math.isclose(a[2], b[2], rel_tol=1e-9), "the order must change the weighted sum"


PEAK_PROBE = """
import torch
from watchtower.hooks.fingerprint import check_parallel

def status_bytes(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

gather = lambda t: [t, t.clone()]
check_parallel(torch.nn.Linear(64, 64), tp_group=gather)  # first use of each kernel maps its code in
model = torch.nn.Module()
model.embedding = torch.nn.Parameter(torch.randn(50_000_000))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: what came before is not the check's
before = status_bytes("VmRSS")
result = check_parallel(model, tp_group=gather)
assert result.checked == {"tp_replicated"} and not result.tp_replicated_mismatch, result
print(status_bytes("VmHWM") - before)
"""


def test_fingerprint_check_of_a_50m_element_parameter_stays_under_64_mib():
    """It used to make float64 copies of the whole parameter (400 MB each for 50M elements).

    Measured in a fresh interpreter as the peak RSS during the check (the kernel's high-water mark,
    reset just before it through /proc/self/clear_refs) minus the RSS just before it, with the
    parameter already resident. A lifetime peak (ru_maxrss) also counted the parameter's own creation
    temporaries and read 110 MiB under load where the check itself took 16 MiB. glibc is
    told to map every large block on its own, so a freed block leaves RSS at once instead of
    lingering in a malloc arena and being counted as the check's.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip())
    assert extra < 64 * 2 ** 20, f"a check took {extra / 2 ** 20:.0f} MiB over the parameter itself"


def test_a_rank_that_cannot_fingerprint_still_enters_the_gather_and_all_skip_the_check(monkeypatch):
    """The protocol without processes: a gather function stands in for the group."""
    import watchtower.hooks.fingerprint as fp

    model = torch.nn.Linear(4, 2)
    sent: list[torch.Tensor] = []

    def peer_failed(t):  # this rank is fine, its peer sends the failure flag
        sent.append(t)
        peer = torch.full_like(t, math.nan)
        peer[-1] = torch.tensor([1.0, 0.0, 0.0])
        return [t, peer]

    result = fp.check_parallel(model, tp_group=peer_failed, dp_group=lambda t: [t, t.clone()])
    assert result.skipped == {"tp_replicated"} and result.checked == {"dp_replicas"}
    assert result.errors == [] and not result.tp_replicated_mismatch and not result.dp_drift
    assert sent[0].shape == (3, 3) and sent[0][-1].tolist() == [0.0, 0.0, 0.0]

    def broken(tensors):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fp, "fingerprint", broken)
    sent.clear()
    average = lambda t: [t, (t + torch.zeros_like(t)) / 2]  # noqa: E731 - a torchft-style [mine, average]
    result = fp.check_parallel(model, tp_group=lambda t: sent.append(t) or [t, t], dp_group=average)
    assert len(sent) == 1, "the failed rank entered the TP gather anyway"
    assert sent[0].shape == (3, 3) and sent[0][-1, 0] == 1 and sent[0][:-1].isnan().all()
    assert result.skipped == {"tp_replicated", "dp_replicas"} and result.checked == set()
    assert [str(e) for e in result.errors] == ["out of memory", "out of memory"]


def test_fingerprint_failing_on_one_tp_rank_skips_the_check_on_both_instead_of_hanging(processes, tmp_path):
    """Rank 1's fingerprint raises at the second check. Before, rank 1 left the all-gather out and
    rank 0 waited in it forever. Now both ranks enter it, agree to skip that one check, and the
    later checks and the loop's own collectives go on in step."""
    from conftest import free_port

    port = free_port()
    procs = [processes.start([sys.executable, str(Path(__file__)), str(rank), str(port), str(tmp_path / f"r{rank}.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {rank} is still running: a collective was left half-entered") from None
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-3000:]}"
    r0, r1 = (json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in (0, 1))
    assert r1["errors"]["check_parallel"] == 1, "the failing rank counts its hook error"
    assert r0["errors"]["check_parallel"] == 0, "the healthy rank did nothing wrong"
    for r in (r0, r1):  # checks at steps 1, 2, 4, 6; the one at step 2 is skipped by both ranks
        assert r["fingerprint_calls"] == 4
        assert r["parallel_checks"] == {"tp_replicated": 3} and r["parallel_ok"] == {"tp_replicated": 1}
        assert r["events"] == []
    assert r0["final"] == r1["final"], "the loop's own all-reduces stayed paired: equal weights"


def _user_loop(rank: int, port: int, out: Path) -> None:
    """Six steps of a two-rank data-parallel loop, watched with the world as its TP group."""
    from datetime import timedelta

    import torch.distributed as dist

    import watchtower.hooks.fingerprint as fp
    from watchtower.hooks import Monitor, MonitorConfig, RankIdentity

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    real, calls = fp.fingerprint, []

    def flaky(tensors):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("injected: this rank's fingerprint failed")
        return real(tensors)

    fp.fingerprint = flaky
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(MonitorConfig(port=0, log_interval=2, parallel_check_interval=2),
                      RankIdentity(run="fp", rank=rank))
    monitor.watch(model, tp_group=dist.group.WORLD)
    for step in range(1, 7):
        with monitor.step(tokens=32) as s:
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
            loss = model(x).pow(2).mean()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= 2
            opt.step()
            opt.zero_grad()
            s.record(loss=loss.detach())
    monitor.close()
    out.write_text(json.dumps({
        "errors": dict(monitor.errors.counts), "fingerprint_calls": len(calls),
        "parallel_checks": dict(monitor.state.parallel_checks), "parallel_ok": dict(monitor.state.parallel_ok),
        "events": [e.detector for e in monitor.events], "final": real(list(model.parameters())).tolist()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _user_loop(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
