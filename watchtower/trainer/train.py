"""The bundled trainer: one replica group of `train.tp` ranks, observed by the hook library.

Launched once per rank (by `watchtower train`, which spawns the TP ranks itself, or by torchrun).
The monitor is used exactly as a user's own loop would use it: `wrap`, `step`, `record`, `watch`.

Outputs under `run.output_dir`: `train_log.jsonl` (rank 0: one line per step this group took part
in, with loss, grad norm, lr, a signature of the batch and the group's data rank among the step's
participants, so the data order can be replayed; written every log interval) and the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from watchtower.atomic_write import write_atomic
from watchtower.config import TrainConfig
from watchtower.hooks import Monitor, RankIdentity
from watchtower.hooks.device_series import DeviceSeries
from watchtower.supervisor.contract import EXIT_STOPPED, StopRequest, endpoint_file
from watchtower.trainer import hang_dump
from watchtower.trainer.checkpoint import Checkpointer
from watchtower.trainer.compiling import compile_now, private_cache, remove_cache, uses_flex_attention
from watchtower.trainer.data import BYTE_VOCAB, Batch, PackedBatches, due_skips, load_tokens
from watchtower.trainer.faults import DelayedBatches, FaultPlan, PoisonedBatches
from watchtower.trainer.model import Transformer, compile_blocks, flops_per_token
from watchtower.trainer.optimizer import AdamW
from watchtower.trainer.replication import SingleGroup, TorchFTGroup
from watchtower.trainer.parallel import (apply_tensor_parallel, clip_grads_, grad_norm, is_dtensor, local_tensor,
                                         seed_bug_reinit)

log = logging.getLogger("watchtower.train")


@dataclass
class RankEnv:
    """Where this process sits: its TP rank, the TP world size, its replica group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    replica_group: int = 0

    @classmethod
    def from_env(cls, replica_group: int = 0) -> "RankEnv":
        """TP coordinates from the launcher's (or torchrun's) environment; the replica group comes
        from the config's [replica] section (the supervisor's launch contract)."""
        e = os.environ
        return cls(int(e.get("RANK", 0)), int(e.get("WORLD_SIZE", 1)), int(e.get("LOCAL_RANK", 0)), replica_group)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to min_lr_ratio · lr at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step <= o.warmup_steps:
        return o.lr * step / max(o.warmup_steps, 1)
    progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine)


def batch_signature(batch: Batch) -> int:
    """A cheap fingerprint of the token ids (on the CPU copy), to prove a resume saw the same data."""
    weights = torch.arange(1, batch.inputs.shape[-1] + 1)
    return int((batch.inputs * weights).sum()) % 1_000_000_007


def pick_device(cfg: TrainConfig, env: RankEnv) -> torch.device:
    wanted = cfg.train.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, env: RankEnv | None = None):
        self.cfg, self.env = cfg, env or RankEnv.from_env(cfg.replica.replica_group)
        self.device = pick_device(cfg, self.env)
        self.faults = FaultPlan(cfg.faults.parsed(), self.env.replica_group, self.env.rank)
        self.output = cfg.run.output_path
        self.output.mkdir(parents=True, exist_ok=True)
        # The monitor serves /metrics before the slow parts (staging, init, resume, healing), each of
        # which reports progress: a supervisor counts a group's startup grace from its last report.
        identity = RankIdentity(run=cfg.run.name, replica_group=self.env.replica_group, rank=self.env.rank,
                                local_rank=self.env.local_rank, node=cfg.replica.node or socket.gethostname())
        self.monitor = Monitor(cfg.monitor, identity, device=self.device,
                               flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len) / cfg.train.tp,
                               model_name=f"llama-d{cfg.model.dim}-l{cfg.model.n_layers}",
                               config_hash=cfg.config_hash())
        for name in ("watchtower_checkpoint_save_seconds_total", "watchtower_collective_wait_seconds_total",
                     "watchtower_skipped_batches_total"):
            self.monitor.count(name, 0.0)  # exported at zero from the start
        if self.monitor.port:  # where /metrics really is (a taken port moves to the next free one), and who
            # atomic: the supervisor reads it every poll, and a half-written file is no port
            write_atomic(endpoint_file(self.output, self.env.rank), json.dumps({"port": self.monitor.port,
                                                                                "pid": os.getpid(),
                                                                                "host": socket.gethostname()}))
        # a hung rank's stacks and flight recorder for the supervisor, on a signal (before any process
        # group: the flight recorder is armed by the environment the first one reads)
        self._disarm_dumps = hang_dump.install(self.output, self.env.rank)
        self.progress()
        self._inductor_cache: Path | None = None  # train.compile's own cache (compiling.private_cache)
        try:
            self._build()
        except BaseException:
            # a refused resume, an unreadable source: disarm the dumps (a wakeup fd left on the closed
            # socket's number feeds the next signal into whatever file reuses it), stop /metrics and the sampler
            self._disarm_dumps()
            self.monitor.close()
            remove_cache(self._inductor_cache)
            raise

    def _build(self) -> None:
        """The slow parts, each followed by a progress report: model, data (staging), torchft, resume."""
        cfg = self.cfg
        self.tp_group = self._init_distributed()
        torch.manual_seed(cfg.run.seed)  # the same full weights on every rank, then sharded
        self.model = Transformer(cfg.model, cfg.train.activation_checkpointing).to(self.device)
        if cfg.train.tp > 1:
            apply_tensor_parallel(self.model, self._mesh)
            if self.faults.has("tp_seed_bug"):
                seed_bug_reinit(self.model, cfg.run.seed, cfg.model.init_std)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and cfg.train.mixed_precision == "bf16" else nullcontext())
        if cfg.train.compile:
            self._compile()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # a DTensor's numel() is the full tensor's: the whole model's count on every TP rank
        self.monitor.set_compute_budget(sum(p.numel() for p in self.model.parameters()), cfg.train.steps,
                                        data_parallel=cfg.replica.active_groups)
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        self.progress()
        data_cfg = replace(cfg.data, cache_dir=cfg.replica.cache_dir) if cfg.replica.cache_dir else cfg.data
        self.data = PackedBatches(load_tokens(data_cfg, self.progress), cfg.train.seq_len, cfg.train.micro_batch_size,
                                  cfg.data.shuffle_seed, document_masking=cfg.data.document_masking,
                                  micro_steps=cfg.train.grad_accum_steps)
        self.checkpointer = Checkpointer(cfg.checkpoint_url, self.env.rank, self.env.world_size,
                                         cfg.checkpoint.keep_last, self._agree, self._gather)
        self.step = 0
        self.progress()
        resumed = self.maybe_resume()  # a refused resume is a config error: the rank exits 2 before any step
        self.progress()
        # torchft's Manager heartbeats from the moment it exists, and a quorum waits (up to its join
        # timeout) for every heartbeating group: made last, right before the first quorum, so that
        # loading a checkpoint never holds up the other groups' quorum
        self.replication = self._make_replication()
        if resumed is not None:
            self.replication.load_state_dict(resumed)
        self.progress()
        self.monitor.watch(self.model, tp_group=self.tp_group, dp_group=self.replication.dp_gather())
        self.loader = self.monitor.wrap(DelayedBatches(self._poisoned(self.data), self.faults, lambda: self.step + 1))

    def _compile(self) -> None:
        """train.compile: compile the blocks now, before torchft's Manager and the first quorum, into
        a cache of this process's own (compiling.py says why each)."""
        cfg = self.cfg
        # first: inductor sets TORCHINDUCTOR_CACHE_DIR to its shared default once it looks for a cache
        self._inductor_cache = private_cache(self.output)
        compile_blocks(self.model, cfg.train.compile_backend,
                       flex_attention=uses_flex_attention(self.device.type, cfg.train.compile_backend,
                                                          cfg.model.head_dim))
        seconds = compile_now(self.model, cfg.train.micro_batch_size, cfg.train.seq_len, self.device, self.autocast,
                              cfg.data.document_masking, self.progress)
        log.info("compiled the blocks (%s) in %.1f s", cfg.train.compile_backend, seconds)
        self.progress()

    # ---- distributed plumbing -----------------------------------------------------------------

    def _init_distributed(self) -> dist.ProcessGroup | None:
        self._mesh = None
        if self.env.world_size == 1:
            return None
        backend = "cuda:nccl,cpu:gloo" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.env.rank, world_size=self.env.world_size)
        from torch.distributed.device_mesh import init_device_mesh

        self._mesh = init_device_mesh(self.device.type, (self.env.world_size,), mesh_dim_names=("tp",))
        return self._mesh.get_group()

    def _make_replication(self):
        """torchft across replica groups when the config's [replica] names a Lighthouse, else nothing."""
        r = self.cfg.replica
        if not r.supervised:
            return SingleGroup()
        store_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if self.env.world_size == 1:  # no torch.distributed store to share: the Manager needs its own,
            # on a port the kernel picks (read back), so no free-port race with other groups
            self._store = torch.distributed.TCPStore(store_addr, 0, is_master=True, wait_for_workers=False)
            store_port = self._store.port
        else:  # the TP ranks' store, from the launcher (torchrun-compatible MASTER_ADDR/MASTER_PORT)
            store_port = int(os.environ["MASTER_PORT"])
        return TorchFTGroup(
            replica_id=r.replica_id, group_rank=self.env.rank, group_world_size=self.env.world_size,
            active_groups=r.active_groups, lighthouse=r.lighthouse,
            store_addr=store_addr, store_port=store_port, device=self.device,
            state_dict=self.state_dict, load_state_dict=self.load_live_state, timeout_s=r.ft_timeout_s)

    # ---- the data: poisoned (fault drill) and skipped (data.skip_steps) windows ----------------------

    def _poisoned(self, data: PackedBatches):
        """The data, with bad_data's windows poisoned where the plan has any (the windows of its steps
        in a run from the start with every active group participating)."""
        groups = self.cfg.replica.active_groups if self.cfg.replica.supervised else 1
        bad = set().union(*(data.step_window_ids(first, steps, groups) for first, steps in self.faults.bad_data()))
        return PoisonedBatches(data, bad, BYTE_VOCAB) if bad else data

    def _skip_data(self, step: int) -> None:
        """Before a step inside a data.skip_steps range not applied yet, leave the global batches of its
        steps still ahead unread (data.due_skips: the whole range at its first step, the rest of it
        after a resume from a checkpoint inside it), once (the data's state remembers it across heals
        and checkpoints); every group does it alike. Counted in watchtower_skipped_batches_total, and
        rank 0 records the steps and positions skipped in skipped_data.jsonl. Costs nothing at other
        steps but a loop over the ranges."""
        for first, steps in due_skips(self.cfg.data.skip_steps, step, self.data.skipped):
            participants = self.replication.participants()
            ranges = self.data.skip(first, steps, participants)
            self.monitor.count("watchtower_skipped_batches_total", steps)
            log.warning("skipped the data of steps %d-%d (%d global batches of %d groups): positions %s",
                        step, step + steps - 1, steps, participants, ranges)
            if self.env.rank == 0:
                with open(self.output / "skipped_data.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.time(), "steps": [step, step + steps - 1],
                                        "participants": participants, "positions": [list(r) for r in ranges]}) + "\n")

    def progress(self) -> None:
        """Report a sign of life in a slow phase (before the first step: staging, init, resume,
        healing; later: a checkpoint save, a heal): the supervisor gives such a group its startup
        grace from the last report instead of the heartbeat timeout. Costs a clock read."""
        self.monitor.set_gauge("watchtower_progress_timestamp_seconds", time.time())

    @contextmanager
    def _waiting_on_peers(self):
        """Mark the span where this rank blocks on other groups: a supervisor seeing a stale heartbeat
        then knows this group is a victim of a hang elsewhere, not the hung one. Its seconds are
        counted too (the goodput split's collective wait). Costs two clock reads."""
        self.monitor.set_gauge("watchtower_replica_in_collective", 1)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.monitor.set_gauge("watchtower_replica_in_collective", 0)
            self.monitor.count("watchtower_collective_wait_seconds_total", time.perf_counter() - start)

    def _agree(self, flag: bool) -> bool:
        if self.env.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)  # on the CPU (gloo) side of the default group
        return bool(t.item())

    def _gather(self, obj: Any) -> list[Any]:
        if self.env.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    # ---- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        optim = self.optimizer.state_dict()
        optim["state"] = {k: {n: local_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                          for k, s in optim["state"].items()}
        return {"step": self.step,
                "model": {k: local_tensor(v).cpu() for k, v in self.model.state_dict().items()},
                "optimizer": optim,
                "data": self.data.state_dict()}

    def load_live_state(self, state: dict[str, Any]) -> None:
        """torchft's heal callback: a healthy peer's state, arriving over its checkpoint transport."""
        self.progress()  # the transfer is done; loading it may take a while on a large model
        self.load_state_dict(state)
        self.progress()
        log.info("healed live from a peer at step %d", self.step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                local_tensor(p).copy_(state["model"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        for p in self.params:  # plain tensors back into DTensor state where the param is sharded
            if is_dtensor(p):
                from torch.distributed.tensor import DTensor
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.ndim:
                        self.optimizer.state[p][key] = DTensor.from_local(
                            value.to(self.device), p.device_mesh, p.placements, run_check=False)
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> None:
        if self.replication.data_shard() not in ((0, self.replication.participants()),):
            return  # groups are identical: only the participating group of rank 0 writes
        self.progress()  # a slow phase, not a hang: a supervisor gives it startup_grace_s, not the heartbeat timeout
        start = time.perf_counter()
        state = self.state_dict()
        state["replication"] = self.replication.state_dict()
        self.checkpointer.save(self.step, state,
                               {"config_hash": self.cfg.config_hash(), "run": self.cfg.run.name})
        seconds = time.perf_counter() - start
        self.progress()  # the wait for the next quorum counts from here
        self.monitor.count("watchtower_checkpoint_save_seconds_total", seconds)
        log.info("checkpoint step %d saved to %s in %.2fs", self.step, self.cfg.checkpoint_url, seconds)

    def maybe_resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint this run may resume; another TP or config_hash is a ConfigError
        (exit 2), never a fresh start over another run's checkpoints. Returns the replication's part
        of it (its step), for the replication made after this; None when nothing was resumed."""
        self.resumed_step: int | None = None
        if not self.cfg.checkpoint.resume:
            return None
        found = self.checkpointer.load_latest(self.cfg.config_hash(), self.cfg.checkpoint.allow_config_change)
        if found is None:
            return None
        step, state, _ = found
        self.load_state_dict(state)
        self.resumed_step = step
        log.info("resumed from checkpoint step %d", step)
        return state.get("replication", {"step": step})

    # ---- the loop --------------------------------------------------------------------------

    def forward_backward(self, batch: Batch, loss_factor: float | None) -> torch.Tensor:
        batch = batch.to(self.device)
        with self.autocast:
            logits = self.model(batch.inputs, batch.positions, batch.doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())
        if loss_factor is not None:
            loss = loss * loss_factor
        (loss / self.cfg.train.grad_accum_steps).backward()
        return loss.detach()

    def train(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        log_rows: list[dict[str, Any]] = []
        losses, norms = DeviceSeries(), DeviceSeries()
        tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum_steps
        wall = time.perf_counter()
        steps_done = 0
        stop_request, stopping = StopRequest(cfg.replica.stop_file), False  # the supervisor's graceful stop
        while True:
            if not steps_done:
                self.progress()  # the first quorum may heal this group from a peer: a slow part
            with self._waiting_on_peers():
                self.replication.start_step()  # quorum; a group that just joined heals here (self.step jumps)
            step = self.step + 1
            if step > t.steps:
                break
            self.faults.before_step(step)
            shard = self.replication.data_shard()  # None: a hot spare, in sync but not contributing
            # every group, spare or not, plans the step's global batch: the data cursors stay equal
            self._skip_data(step)
            self.data.begin_step(None if shard is None else shard[0], self.replication.participants())
            lr = lr_at(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self.monitor.step(tokens=tokens_per_step if shard else 0, step=step) as s:
                signatures, micro_losses = [], []
                for _ in range(t.grad_accum_steps if shard else 0):
                    batch = next(self.loader)
                    signatures.append(batch_signature(batch))
                    micro_losses.append(self.forward_backward(batch, self.faults.loss_factor(step)))
                with self._waiting_on_peers():
                    self.replication.reduce_gradients(self.params)
                norm = grad_norm(self.params, self.tp_group)
                if cfg.optim.grad_clip:
                    clip_grads_(self.params, norm, cfg.optim.grad_clip)
                loss = torch.stack(micro_losses).mean() if micro_losses else None
                s.record(loss=loss, grad_norm=norm if shard else None, lr=lr)
                apply = self._agreed_should_step(s)  # before the commit: a failed agreement fails it
                with self._waiting_on_peers():
                    committed = self.replication.should_commit()
                if committed and apply:
                    self.optimizer.step()
                elif committed:
                    s.mark_skipped()  # the groups' vote may skip a step this rank's own verdict allowed
                    log.warning("step %d skipped: non-finite loss or gradient", step)
                else:
                    s.mark_uncommitted()  # redone below: counted once, when an attempt commits
                self.optimizer.zero_grad(set_to_none=True)
            self.data.end_step(committed)  # a step torchft redoes reads the same windows again
            self.monitor.set_gauge("watchtower_replica_participants", self.replication.participants())
            self.monitor.set_gauge("watchtower_replica_participating", float(shard is not None))
            if not committed:
                log.warning("step %d not committed (a peer failed); redoing it", step)
                continue
            self.step = step
            steps_done += 1
            if loss is not None:
                losses.append(step, loss)
                norms.append(step, norm)
                log_rows.append({"step": step, "lr": lr, "data_sig": sum(signatures) % 1_000_000_007,
                                 "time": time.time(), "participants": self.replication.participants(),
                                 "dp_rank": shard[0]})
            stopping = stop_request.due(step)  # one stat() per step (contract.py)
            if log_rows and (step % t.log_interval == 0 or step == t.steps or stopping):
                self._write_log(log_rows, losses, norms, steps_done, wall)
                log_rows = []
            if stopping:  # every group stops after this same step; the save below is the normal one
                log.info("stopping after step %d as the supervisor asked: saving, then exiting %d", step, EXIT_STOPPED)
                break
            if cfg.checkpoint.interval_steps and step % cfg.checkpoint.interval_steps == 0 and step < t.steps:
                self.save_checkpoint()
        if steps_done or self.step != self.resumed_step:  # else the checkpoint it loaded is this very state
            self.save_checkpoint()
        self.monitor.close()
        self._write_events()
        self._write_fingerprint()
        self.close()
        return EXIT_STOPPED if stopping else 0

    def close(self) -> None:
        """Stop /metrics (its port freed), the monitor's threads and torchft's manager. `run()` calls it
        however `train()` ended, so a failed save does not leave an in-process caller holding the port.
        Idempotent: the monitor's close only flushes again, the manager is shut down once."""
        self._disarm_dumps()
        self.monitor.close()
        remove_cache(self._inductor_cache)
        self._inductor_cache = None
        if not getattr(self, "_closed", False):
            self._closed = True
            self.replication.shutdown()

    def _agreed_should_step(self, s) -> bool:
        """The monitor's skip verdict (nonfinite_action=skip_step), the same in every group.

        A hot spare has no loss of its own, so its monitor alone would always say "step", and
        apply the non-finite gradient the participants skip. Every group votes and all follow the
        vote: one scalar all-reduce across groups per step, only with skip_step. TP ranks need no
        vote of their own: the loss and the grad norm they judge are the same on each of them.
        """
        ok = s.should_step()
        if not self.cfg.monitor.enabled or self.cfg.monitor.nonfinite_action != "skip_step":
            return ok  # nothing is ever skipped: no vote
        with self._waiting_on_peers():
            return self.replication.all_agree(ok)

    def _write_fingerprint(self) -> None:
        """The final weights' fingerprint (rank-local) and how many parallel checks ran: lets a
        test or an operator compare replica groups after the fact."""
        from watchtower.hooks.fingerprint import fingerprint

        prints = fingerprint([p for p in self.model.parameters()]).tolist()
        path = self.output / f"fingerprint-r{self.env.rank}.json"
        path.write_text(json.dumps({"step": self.step, "replica_group": self.env.replica_group,
                                    "participating": self.replication.data_shard() is not None,
                                    "parallel_checks": dict(self.monitor.state.parallel_checks),
                                    "parallel_ok": dict(self.monitor.state.parallel_ok), "fingerprint": prints}))

    def _write_events(self) -> None:
        path = self.output / f"events-g{self.env.replica_group}-r{self.env.rank}.jsonl"
        with open(path, "w") as f:
            for e in self.monitor.events:
                f.write(json.dumps({"detector": e.detector, "step": e.step, "severity": e.severity,
                                    "value": e.value, "detail": e.detail, "rank": self.env.rank,
                                    "replica_group": self.env.replica_group}) + "\n")

    def _write_log(self, rows, losses: DeviceSeries, norms: DeviceSeries, steps_done: int, wall: float) -> None:
        """Rank 0: one JSON line per step (this is the interval's only host read of the loss)."""
        losses.flush()
        norms.flush()
        loss_by_step = dict(losses.harvest(wait=True))
        norm_by_step = dict(norms.harvest(wait=True))
        if self.env.rank != 0:
            return
        with open(self.output / "train_log.jsonl", "a") as f:
            for row in rows:
                row.update(loss=loss_by_step.get(row["step"]), grad_norm=norm_by_step.get(row["step"]),
                           replica_group=self.env.replica_group)
                f.write(json.dumps(row) + "\n")
        last = rows[-1]
        elapsed = time.perf_counter() - wall
        log.info("step %5d | loss %.4f | grad norm %.3f | lr %.2e | %.0f tok/s", last["step"], last["loss"],
                 last["grad_norm"], last["lr"],
                 steps_done * self.cfg.train.micro_batch_size * self.cfg.train.seq_len
                 * self.cfg.train.grad_accum_steps / max(elapsed, 1e-9))


def run(cfg: TrainConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.barrier()  # let every rank finish its collectives before the group goes away
            dist.destroy_process_group()
