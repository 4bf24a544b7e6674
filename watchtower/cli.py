"""`watchtower ...`: the command line. Prints for people; the library underneath only logs.

    watchtower train --config configs/tiny.toml --steps 40 --tp 2 [--model.dim 256] [--inject KIND@STEP]
    watchtower demo

Config errors are one line on stderr and exit code 2, before any process starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from watchtower.validation import EXIT_CONFIG, ConfigError


def split_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """`--model.dim 256` / `--model.dim=256` pairs from the arguments argparse did not know."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(arg, arg, "unknown argument; overrides look like --section.key VALUE "
                              "(e.g. --model.dim 256); see --help for the short flags")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(key, None, "needs a value, e.g. --model.dim 256")
            value = rest[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML job file or preset name (tiny, smol-135m)")
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--tp", type=int, help="train.tp: tensor-parallel ranks (spawned on this machine)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--run", help="run.name (the run label on every metric)")
    p.add_argument("--output-dir", help="run.output_dir")
    p.add_argument("--port", type=int, help="monitor.port: base /metrics port (rank r serves on port + r)")
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="fault to inject, e.g. loss_spike@120, stall@50:3s, tp_seed_bug (repeatable)")


def add_config_keys(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Every trainer config key as a `--section.key` flag of `parser` (type, default, doc in --help);
    returns argv with their values joined (`--optim.lr=-1e-3`) for parsing. Imports the trainer's
    config sections (no torch, but fsspec and the job contract), so only `train` and `config` call it."""
    from watchtower.config import TrainConfig
    from watchtower.config_flags import add_config_flags, join_flag_values

    return join_flag_values(argv, add_config_flags(parser, TrainConfig))


def config_from_args(args: argparse.Namespace, rest: list[str]):
    from watchtower.config import load_config
    from watchtower.config_flags import overrides_from


    shorts = {"steps": "train.steps", "tp": "train.tp", "seed": "run.seed", "run": "run.name",
              "output_dir": "run.output_dir", "port": "monitor.port"}
    overrides: list[tuple[str, Any]] = [(key, getattr(args, a)) for a, key in shorts.items()
                                        if getattr(args, a) is not None]
    overrides += overrides_from(args) + split_overrides(rest)  # known keys, then unknown ones (refused)
    if args.inject:
        overrides.append(("faults.inject", list(args.inject)))
    return load_config(args.config, overrides)


def setup_logging() -> None:
    rank = os.environ.get("RANK")
    tag = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=logging.INFO, format=f"{tag}%(message)s", stream=sys.stderr)
    for noisy in ("torch", "torchft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from watchtower.launch import is_worker, launch_local

    from watchtower.config import check_resume, check_this_machine

    cfg = config_from_args(args, rest)  # validated here, before anything starts
    check_this_machine(cfg)
    check_resume(cfg)  # another train.tp / config_hash in checkpoint.dir: refused before any rank or port
    if cfg.train.tp > 1 and not is_worker():
        return launch_local(argv, cfg.train.tp)
    from watchtower.trainer.train import run

    code = run(cfg)
    if is_worker():
        # Everything is written and closed. Skip interpreter teardown: C++ threads of Gloo and the
        # TCPStore race their static destructors there and sometimes abort() a finished rank (SIGABRT).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


DEMO_MARKER = ".watchtower-demo"  # written into every directory `watchtower demo` creates


def check_demo_dir(path: Path) -> None:
    """Refuse (ConfigError naming --output-dir) a path the demo may not use; touches nothing.

    Run before the job is loaded, so a refusal names the flag the user typed, not a trainer key
    derived from it (checkpoint.dir under a file).
    """
    if path.exists() or path.is_symlink():
        if not (path.is_dir() and not path.is_symlink() and (path / DEMO_MARKER).is_file()):
            raise ConfigError("--output-dir", str(path), f"exists and was not made by `watchtower demo` (no "
                              f"{DEMO_MARKER} in it), so the demo will not delete it; give a new path")
        return
    blocking = next((p for p in path.absolute().parents if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError("--output-dir", str(path), f"cannot be created: {blocking} is not a directory")


def claim_demo_dir(path: Path) -> JobDirLock:
    """An empty output directory for the demo, carrying the marker that says the demo made it, and
    locked (the supervisor's own lock, handed to it) before anything in it is touched.

    The demo starts fresh, so it empties an earlier demo's directory; it deletes nothing else. A path
    that exists without the marker (a user's results, an empty directory, a file) is refused; so is a
    demo's directory whose demo is still running (its supervisor holds the lock): deleting it would
    leave that demo writing into a tree a second demo runs in, with the same group ids.
    """
    from watchtower.supervisor.lock import LOCK_FILE, JobDirLock

    check_demo_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission
        raise ConfigError("--output-dir", str(path), f"cannot be created: {err.strerror}") from None
    lock = JobDirLock(path, key="--output-dir")  # a live demo there: refused, nothing deleted
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name != LOCK_FILE:
            child.unlink()
    (path / DEMO_MARKER).write_text("made by `watchtower demo`; the next demo deletes this directory\n")
    return lock


# `demo --rewind`: a fault in the data instead of the crash, remedied by a rewind (README, [remediation])
DEMO_REWIND = [("job.inject", ["bad_data@150:5"]), ("remediation.loss_spike", "rewind"),
               ("remediation.rewind_margin", 20), ("remediation.skip_batches_after", 4)]


def cmd_demo(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """The supervised demo: 2 replica groups + 1 hot spare of the tiny trainer on CPU, group 0
    SIGKILLed at step 100, the spare taking over, a new spare healing in, and a summary."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.shell import Supervisor

    from watchtower import shipped

    job_path = str(shipped.demo_job_file())
    overrides = [("job.output_dir", args.output_dir)] if args.output_dir else []
    overrides += DEMO_REWIND if args.rewind else []
    if args.output_dir:
        check_demo_dir(Path(args.output_dir))
    job, trainer = load_job(job_path, overrides)
    lock = claim_demo_dir(job.job.output_path)  # a demo starts fresh: no resume from an earlier demo
    print(f"watchtower demo: {job.cluster.active_groups} replica groups + {job.cluster.spare_groups} hot spare "
          f"of the tiny trainer on CPU (torchft, Gloo), {trainer.train.steps} steps; fault: {', '.join(job.job.inject)}")
    print(f"  supervisor metrics: http://127.0.0.1:{job.supervisor.metrics_port}/metrics   ranks: see "
          f"{job.job.output_path / 'targets.json'}   events: {job.job.output_path / 'events.jsonl'}")
    print(f"  watch it live from another terminal: watchtower tui --targets-file {job.job.output_path / 'targets.json'}")
    supervisor = Supervisor(job, trainer, lock=lock)  # the lock held since the directory was emptied
    supervisor.install_signal_handlers()
    code = supervisor.run()
    print("\nwhat happened")
    for e in supervisor.events.events:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))}  {e['event']:<24} {e['message']}")
    print_summary(supervisor.summary(), code)
    return code


def check_job(job, trainer) -> None:
    """What every group would refuse, refused before the Lighthouse (or before sbatch queues it)."""
    from watchtower.config import check_resume, check_this_machine
    from watchtower.trainer.data_config import check_corpus_fits

    if job.cluster.launcher == "local":
        check_this_machine(trainer)  # the groups run here: no CUDA here is refused before the Lighthouse
    check_resume(trainer)  # a resume every group would refuse (exit 2) is refused here, before any group
    check_corpus_fits(trainer.data, trainer.train.seq_len, trainer.train.micro_batch_size,  # the same: a corpus
                      trainer.train.grad_accum_steps, job.cluster.active_groups)  # short of the global batch


def cmd_supervise(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """Run a supervised job: Lighthouse, replica groups, hot spares, auto-resume."""
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.shell import Supervisor

    job, trainer = load_job(args.job, split_overrides(rest))  # everything validated before any process
    check_job(job, trainer)
    launcher = None
    if job.cluster.launcher == "slurm":  # the allocation's nodes and addresses; too few is exit 2, before any step
        from watchtower.supervisor.slurm import attach_to_allocation

        job, launcher = attach_to_allocation(job, trainer.train.tp, trainer.data.cache_dir)
    supervisor = Supervisor(job, trainer, launcher)  # claims the output dir: a live supervisor there is refused (exit 2)
    supervisor.install_signal_handlers()  # SIGTERM / SIGINT / SIGHUP: stop every group and the Lighthouse, exit 128+N
    print(f"watchtower supervise: {job.job.name}: {job.cluster.active_groups} active + "
          f"{job.cluster.spare_groups} spare groups of TP={trainer.train.tp} on {len(job.cluster.nodes)} nodes")
    print(f"  events: {job.job.output_path / 'events.jsonl'}   targets: {job.job.output_path / 'targets.json'}")
    code = supervisor.run()
    print_summary(supervisor.summary(), code)
    return code


def cmd_sbatch(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """Write the batch script of a supervised Slurm job and submit it (or print it: --dry-run)."""
    from watchtower.atomic_write import write_atomic
    from watchtower.supervisor.config import load_job
    from watchtower.supervisor.lock import JobDirLock
    from watchtower.supervisor.sbatch import SCRIPT, batch_script, node_count, submit
    from watchtower.supervisor.slurm import SlurmError

    job, trainer = load_job(args.job, split_overrides(rest))
    if job.cluster.launcher != "slurm":
        raise ConfigError("cluster.launcher", job.cluster.launcher, 'must be "slurm" for watchtower sbatch '
                          "(set it in the job file, or add --cluster.launcher slurm)")
    check_job(job, trainer)
    text = batch_script(job, trainer.train.tp, Path(args.job), rest, sys.executable, Path.cwd())
    if args.dry_run:
        print(text, end="")
        return 0
    out = job.job.output_path.absolute()
    JobDirLock(out).release()  # a live supervisor of this job here: refused now, not in the queue
    write_atomic(out / SCRIPT, text, 0o755)
    try:
        job_id = submit(out / SCRIPT, job.slurm.command_timeout_s)
    except SlurmError as err:
        raise ConfigError("[slurm]", str(out / SCRIPT), f"sbatch refused the script: {err}") from None
    c = job.cluster
    print(f"submitted Slurm job {job_id}: {node_count(job)} nodes for {c.active_groups} active + {c.spare_groups} "
          f"spare groups of TP={trainer.train.tp}")
    print(f"  script:  {out / SCRIPT}   log: {out / f'slurm-{job_id}.out'}   events: {out / 'events.jsonl'}")
    print(f"  targets: {out / 'targets.json'} (Prometheus file_sd: watchtower prometheus-config --targets-file "
          f"{out / 'targets.json'})")
    print(f"  watch:   watchtower tui --targets-file {out / 'targets.json'}")
    if job.supervisor.stop_grace_s:
        print(f"  stop:    scancel --batch --signal=USR1 {job_id}   (every group saves a checkpoint, then exits)")
        print(f"  kill:    scancel {job_id}   (at once: the steps since the last checkpoint are lost)")
    else:  # SIGUSR1 would stop at once too: no stop saves a checkpoint
        print(f"  stop:    scancel {job_id}   (no graceful stop configured: resumes from the last periodic checkpoint)")
    return 0


def cmd_dashboards(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """`build`: regenerate dashboards/json from code (needs the dev extra); `push`: upload them."""
    from watchtower.dashboards import JSON_DIR, load_dashboards

    if args.action == "build":
        try:
            from watchtower.dashboards import build
        except ImportError as err:
            raise ConfigError("dashboards build", str(err), "needs grafana-foundation-sdk (Python >= 3.11): "
                              "pip install -e '.[dev]'") from None
        out = Path(args.out) if args.out else JSON_DIR
        if args.check:
            stale = [name for name, text in build.render().items()
                     if not (out / name).exists() or (out / name).read_text() != text]
            print(f"stale: {', '.join(stale)} (run: watchtower dashboards build)" if stale else "dashboards up to date")
            return 1 if stale else 0
        for path in build.write(out):
            print(f"wrote {path}")
        return 0
    from watchtower.dashboards.push import PushError, push

    if not args.url:
        raise ConfigError("--url", args.url, "give Grafana's base URL, e.g. --url https://grafana.example.com")
    try:
        result = push(args.url, args.token or os.environ.get("GRAFANA_TOKEN", ""), load_dashboards(),
                      folder_title=args.folder)
    except PushError as err:
        print(f"dashboards push: {err}", file=sys.stderr)
        return 1
    print(f"folder '{args.folder}': {result.folder}")
    for uid, what in result.dashboards.items():
        print(f"  {uid}: {what}")
    return 0


def tui_source(args: argparse.Namespace):
    """The TUI's data source from its flags, validated before the screen opens."""
    from watchtower.tui.sources import PrometheusSource, ScrapeSource

    if not args.interval > 0:
        raise ConfigError("--interval", args.interval, "must be > 0 seconds")
    targets = [t.strip() for t in (args.targets or "").split(",") if t.strip()]
    for t in targets:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("--targets", t, "each target is host:port, e.g. --targets node1:9400,node1:9401")
    targets_file = Path(args.targets_file) if args.targets_file else None
    if targets_file is None and not targets and not args.prometheus and Path("runs/demo/targets.json").exists():
        targets_file = Path("runs/demo/targets.json")  # what `watchtower demo` writes
    if targets_file is not None and not targets_file.exists():
        raise ConfigError("--targets-file", str(targets_file), "no such file: give the targets.json the supervisor writes")
    events = Path(args.events) if args.events else (targets_file.parent / "events.jsonl" if targets_file else None)
    if args.prometheus:
        if not args.prometheus.startswith(("http://", "https://")):
            raise ConfigError("--prometheus", args.prometheus, "must be a URL like http://prometheus:9090")
        return PrometheusSource(args.prometheus, args.alertmanager, events)
    if not targets and targets_file is None:
        raise ConfigError("--targets", "", "give --prometheus URL, --targets host:port,... or --targets-file "
                          "(the supervisor's targets.json)")
    return ScrapeSource(targets, targets_file, events)


def cmd_tui(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """The terminal UI (Textual) for the login node."""
    source = tui_source(args)
    from watchtower.tui.app import WatchtowerApp

    WatchtowerApp(source, interval=args.interval, run=args.run).run()
    return 0


def print_summary(summary: dict, code: int) -> None:
    from watchtower.supervisor.policy_types import EXIT_REWIND_FAILED

    why = " (crash loop)" if summary["crash_loop"] else " (rewind failed)" if code == EXIT_REWIND_FAILED else ""
    print("\nsummary")
    drains = f"   planned drains: {summary['planned_drains']}" if summary["planned_drains"] else ""
    print(f"  steps: {summary['steps']}   failures: {summary['failures']}{drains}   restarts: {summary['restarts']}")
    recovery = summary["recovery_seconds"]
    print(f"  last recovery: {'-' if recovery is None else f'{recovery:.1f}s'}   goodput: {summary['goodput_ratio']:.0%}"
          f"   exit: {code}{why}")
    wall = summary["wall_seconds"]
    print(f"  where the {wall:.1f}s of wall time went (productive step time, then badput by cause):")
    for cause, seconds in summary["breakdown_seconds"].items():
        print(f"    {cause:<11} {seconds:8.1f}s {seconds / wall if wall > 0 else 0.0:6.1%}")


def cmd_prometheus_config(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """Write a Prometheus config that scrapes the ranks through file_sd and loads our rules."""
    from watchtower.prometheus_config import render_prometheus_config

    for name in ("scrape_interval", "evaluation_interval"):
        value = getattr(args, name)
        if not value[:-1].replace(".", "").isdigit() or value[-1] not in "smh":
            raise ConfigError(f"--{name.replace('_', '-')}", value, "must be a Prometheus duration like 15s or 1m")
    supervisor_file = args.supervisor_targets_file
    if supervisor_file is None:
        supervisor_file = str(Path(args.targets_file).parent / "supervisor_targets.json")
    text = render_prometheus_config(str(Path(args.targets_file).resolve()), args.alertmanager,
                                    [str(Path(r).resolve()) for r in args.rules] or None,
                                    args.scrape_interval, args.evaluation_interval,
                                    str(Path(supervisor_file).resolve()) if supervisor_file else None)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}: scrapes ranks in {args.targets_file}"
          f"{' and the supervisor in ' + supervisor_file if supervisor_file else ''}, "
          f"alerts to {args.alertmanager or 'nobody'}")
    return 0


def cmd_alerts(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """`export DIR`: the shipped rules.yml and alertmanager.yml, for a Prometheus / Alertmanager host."""
    from watchtower.alert_export import export_alerts

    rules, alertmanager = export_alerts(Path(args.dir))
    print(f"wrote {rules} and {alertmanager}; fill in alertmanager.yml's receivers, then:\n"
          f"  watchtower prometheus-config --rules {rules} ...   amtool check-config {alertmanager}")
    return 0


def cmd_config(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    """`show NAME`: a preset (or TOML file) resolved, `--section.key` flags applied, as TOML to start from."""
    import shlex

    from watchtower.config import load_config
    from watchtower.config_flags import overrides_from
    from watchtower.toml_dataclasses import dump_toml

    cfg = load_config(args.name, overrides_from(args) + split_overrides(rest))
    print(f"# watchtower {shlex.join(argv)}\n# defaults < {args.name} < command line, resolved; "
          f"edit it, then: watchtower train --config FILE\n")
    print(dump_toml(cfg.to_dict()), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="watchtower", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the bundled model (spawns --tp ranks)", allow_abbrev=False,
                           usage="watchtower train [--config NAME|FILE] [--steps N] [--tp N] [--inject FAULT] "
                           "[...] [--section.key VALUE ...]",
                           description="Precedence: command line > TOML file (--config) > defaults. Every "
                           "config key below is a flag: --section.key VALUE.")
    add_train_flags(train)
    demo = sub.add_parser("demo", help="a monitored CPU run with an injected fault")
    demo.add_argument("--output-dir", default=None, help="default: runs/demo")
    demo.add_argument("--rewind", action="store_true", help="instead of the crash: bad data at step 150, a loss "
                      "spike every group agrees on, and a rewind to the checkpoint at step 100 that skips it")
    sup = sub.add_parser("supervise", help="run a job file: torchft replica groups with hot spares")
    sup.add_argument("job", help="job TOML (see configs/demo-job.toml)")
    sb = sub.add_parser("sbatch", help="submit a job file to Slurm: the supervisor in the batch step, groups as steps")
    sb.add_argument("job", help="job TOML with cluster.launcher = \"slurm\" and an optional [slurm] table")
    sb.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")
    prom = sub.add_parser("prometheus-config", help="write a Prometheus config for this job")
    prom.add_argument("--out", default="prometheus.yml")
    prom.add_argument("--targets-file", default="runs/targets.json", help="file_sd file the supervisor writes")
    prom.add_argument("--supervisor-targets-file", default=None,
                      help="file_sd file of the supervisor itself (default: supervisor_targets.json beside "
                           "--targets-file; '' for none)")
    prom.add_argument("--alertmanager", default="127.0.0.1:9093", help="host:port of Alertmanager ('' for none)")
    prom.add_argument("--rules", action="append", default=[], help="rule file (default: the rules.yml the package ships)")
    prom.add_argument("--scrape-interval", default="15s")
    prom.add_argument("--evaluation-interval", default="15s")
    alerts = sub.add_parser("alerts", help="export the alert rules and Alertmanager config for a Prometheus host")
    alerts.add_argument("action", choices=["export"])
    alerts.add_argument("dir", help="directory to write rules.yml and alertmanager.yml into (created if missing)")
    dash = sub.add_parser("dashboards", help="build the Grafana dashboards from code, or push them to a Grafana")
    dash.add_argument("action", choices=["build", "push"])
    dash.add_argument("--out", default=None, help="build: directory for the JSON (default: the package's)")
    dash.add_argument("--check", action="store_true", help="build: only say whether the JSON is up to date")
    dash.add_argument("--url", default=None, help="push: Grafana base URL")
    dash.add_argument("--token", default=None, help="push: service-account token (default: $GRAFANA_TOKEN)")
    dash.add_argument("--folder", default="Watchtower", help="push: folder title")
    tui = sub.add_parser("tui", help="terminal UI: ranks, alerts and supervisor events of running jobs")
    tui.add_argument("--prometheus", default=None, help="Prometheus base URL (else scrape the ranks directly)")
    tui.add_argument("--alertmanager", default=None, help="Alertmanager base URL for alerts (with --prometheus)")
    tui.add_argument("--targets", default=None, help="host:port,... of rank /metrics endpoints")
    tui.add_argument("--targets-file", default=None, help="file_sd targets.json the supervisor writes")
    tui.add_argument("--events", default=None, help="supervisor events.jsonl (default: beside --targets-file)")
    tui.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    tui.add_argument("--run", default=None, help="open this run's view at start")
    show = sub.add_parser("config", help="print a preset resolved as TOML, to start a config from", allow_abbrev=False,
                          usage="watchtower config show NAME|FILE [--section.key VALUE ...]")
    show.add_argument("action", choices=["show"])
    show.add_argument("name", help="preset name (tiny, smol-135m) or TOML path; --section.key VALUE overrides")
    commands = {"train": cmd_train, "demo": cmd_demo, "prometheus-config": cmd_prometheus_config,
                "alerts": cmd_alerts, "config": cmd_config,
                "supervise": cmd_supervise, "sbatch": cmd_sbatch, "dashboards": cmd_dashboards, "tui": cmd_tui}
    try:
        keyed = {"train": train, "config": show}.get(argv[0] if argv else "")
        args, rest = parser.parse_known_args(add_config_keys(keyed, argv) if keyed else argv)
        setup_logging()
        if rest and args.command not in ("train", "supervise", "sbatch", "config"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return commands[args.command](args, rest, argv)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
