"""The health gate's built-in checks, run ON a node before a group starts there.

    python -m watchtower.supervisor.node_check --cache DIR [--data SOURCE] [--min-free-bytes N]
        [--gpus N] [--min-gpu-free-fraction F] [-- SITE_COMMAND ...]

One line per check (`ok ...` or `FAIL ...`); exit 0 when every check passes, 1 otherwise. When they
pass and a site command follows `--`, this process becomes that command (exec), so its output follows
ours and its exit code is the verdict. The supervisor runs it through `Launcher.run_on_node`, which
bounds the whole run with `cluster.health_check_timeout_s` (see health.py).

Checks, and why each: the data source is readable from this node (a missing mount fails every group
at its first read); the node's cache dir can be written and has `--min-free-bytes` free (staging fills
it); with `--gpus N` (a CUDA job: train.tp GPUs per group) N GPUs are visible through NVML with at
least `--min-gpu-free-fraction` of their memory free (a leftover process holding memory OOMs the group).
Import-light (stdlib; fsspec only for a remote source, pynvml only with `--gpus`): it costs one
interpreter start, ~0.1 s, plus one listing of a remote source.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
import tempfile


def data_problem(source: str) -> str | None:
    """Why the data source cannot be read from here, or None. Empty: the built-in corpus (the stdlib).

    >>> data_problem(sysconfig.get_paths()["stdlib"]) is None
    True
    >>> data_problem("/no/such/corpus")
    'no such file or directory'
    """
    if not source:
        source = sysconfig.get_paths()["stdlib"]
    if "://" in source and not source.startswith("file://"):
        return _remote_problem(source)
    source = source.removeprefix("file://")
    if any(c in source for c in "*?["):
        matches = glob.glob(source)
        if not matches:
            return "the glob matches no file"
        source = matches[0]
    if not os.path.exists(source):
        return "no such file or directory"
    try:
        if os.path.isdir(source):
            os.listdir(source)
        else:
            with open(source, "rb") as f:
                f.read(1)
    except OSError as err:
        return f"cannot read it: {err.strerror or err}"
    return None


def _remote_problem(url: str) -> str | None:
    import fsspec  # only for a remote source: its import and one listing

    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.glob(path) if any(c in path for c in "*?[") else fs.exists(path)
    except Exception as err:  # noqa: BLE001 - any backend error means the same: not readable from here
        return f"cannot reach it: {type(err).__name__}: {err}"
    return None if found else "no such object"


def cache_problem(cache_dir: str, min_free_bytes: int) -> str | None:
    """Why the node's cache dir cannot take the staged data, or None. Created if missing (staging would).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> cache_problem(d, 0) is None, cache_problem(d, 1 << 60).endswith("cluster.health_min_free_bytes)")
    (True, True)
    """
    path = os.path.expanduser(os.path.expandvars(cache_dir))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a real write: a read-only or full mount fails here
            pass
        free = shutil.disk_usage(path).free
    except OSError as err:
        return f"cannot write there: {err.strerror or err}"
    if free < min_free_bytes:
        return f"{free} bytes free, below {min_free_bytes} (cluster.health_min_free_bytes)"
    return None


def gpu_problem(memory: list[tuple[int, int]], need: int, min_free_fraction: float) -> str | None:
    """Why the visible GPUs (their (free, total) memory bytes, in CUDA order) cannot hold a group, or None.

    >>> gpu_problem([(80, 80), (79, 80)], need=2, min_free_fraction=0.9) is None
    True
    >>> gpu_problem([(80, 80)], need=2, min_free_fraction=0.9)
    '1 visible, the job needs 2 per node (train.tp)'
    >>> gpu_problem([(80, 80), (8, 80)], need=2, min_free_fraction=0.9)
    'gpu 1: 10% of its memory free, below 90% (a leftover process?)'
    """
    if len(memory) < need:
        return f"{len(memory)} visible, the job needs {need} per node (train.tp)"
    for i, (free, total) in enumerate(memory[:need]):
        if total <= 0 or free / total < min_free_fraction:
            share = free / total if total > 0 else 0.0
            return f"gpu {i}: {share:.0%} of its memory free, below {min_free_fraction:.0%} (a leftover process?)"
    return None


def gpu_memory() -> list[tuple[int, int]]:
    """(free, total) bytes of each GPU this process may use, through NVML, in CUDA_VISIBLE_DEVICES
    order (indices or UUIDs) when it is set. Raises when NVML cannot load (no driver)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            by_uuid = {_text(pynvml.nvmlDeviceGetUUID(h)): h for h in handles}
            picked = []
            for item in (v.strip() for v in visible.split(",") if v.strip()):
                h = handles[int(item)] if item.isdigit() and int(item) < len(handles) else next(
                    (h for uuid, h in by_uuid.items() if uuid.startswith(item)), None)
                if h is None:
                    break  # CUDA stops at the first invalid entry too
                picked.append(h)
            handles = picked
        return [(info.free, info.total) for info in map(pynvml.nvmlDeviceGetMemoryInfo, handles)]
    finally:
        pynvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def run_checks(args: argparse.Namespace) -> list[str]:
    """Every check's line, `ok ...` or `FAIL ...`."""
    found = [("data", args.data or "(built-in corpus)", data_problem(args.data)),
             ("cache", args.cache, cache_problem(args.cache, args.min_free_bytes))]
    if args.gpus > 0:
        try:
            problem = gpu_problem(gpu_memory(), args.gpus, args.min_gpu_free_fraction)
        except Exception as err:  # noqa: BLE001 - no driver, no NVML: the GPUs are not usable from here
            problem = f"NVML cannot read them: {type(err).__name__}: {err}"
        found.append(("gpus", f"{args.gpus} needed", problem))
    return [f"FAIL {name} {what}: {problem}" if problem else f"ok {name} {what}" for name, what, problem in found]


def main(argv: list[str]) -> int:
    ours, site = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m watchtower.supervisor.node_check")
    parser.add_argument("--cache", required=True, help="the node's data cache dir")
    parser.add_argument("--data", default="", help="data.source (empty: the built-in corpus)")
    parser.add_argument("--min-free-bytes", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs a group uses here (0: a CPU job)")
    parser.add_argument("--min-gpu-free-fraction", type=float, default=0.9)
    lines = run_checks(parser.parse_args(ours))
    print("\n".join(lines), flush=True)
    if any(line.startswith("FAIL") for line in lines):
        return 1
    if site:
        try:
            os.execvp(site[0], site)
        except OSError as err:
            print(f"FAIL site command {site[0]}: {err.strerror or err}", flush=True)
            return 127
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
