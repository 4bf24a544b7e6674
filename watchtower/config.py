"""The training job's configuration: dataclasses, loaded from TOML, overridden on the command line.

Precedence, one rule everywhere: command line > TOML file > dataclass defaults.

    watchtower train --config configs/tiny.toml --steps 40 --tp 2 --model.dim 256 --inject stall@5:2s

Every section is the small dataclass its component owns (`ModelConfig` lives beside the model);
each validates itself in `__post_init__`, and `TrainConfig` checks what spans sections (TP must divide
the heads). Any problem is one `ConfigError` line naming the full key, the value and what is allowed,
raised before a process starts.

No torch here: the TP launcher, a supervisor checking its job and every config error's exit 2 read
this module and start no model, so each section lives in a torch-free module of its component
(`trainer/model_config.py` beside `trainer/model.py`, `trainer/data_config.py`, `hooks/config.py`).
torch's import cost ~4 s there (tests/test_import_cost.py keeps it out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchtower.hooks.config import MonitorConfig
import fsspec

from watchtower.trainer.checkpoint import CheckpointConfig, check_resume_config
from watchtower.trainer.data_config import BYTE_VOCAB, DataConfig
from watchtower.trainer.faults import Fault, parse_fault
from watchtower.trainer.model_config import ModelConfig
from watchtower.trainer.staging import require_fsspec_backend
from watchtower import shipped
from watchtower.supervisor.contract import ReplicaConfig
from watchtower.toml_dataclasses import build, read_toml, set_dotted  # noqa: F401 - re-exported: the loaders' home
from watchtower.validation import ConfigError, require

@dataclass
class RunConfig:
    """name: the `run` label on every metric; one name per training run.
    output_dir: logs and (by default) checkpoints; `{name}` is replaced by the run name."""

    name: str = "watchtower"
    seed: int = 0  # seed of the weight init (the same full weights on every rank, then sharded)
    output_dir: str = "runs/{name}"

    def __post_init__(self) -> None:
        require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name", self.name,
                "must be non-empty, letters, digits, '-', '_' or '.' (it becomes a metric label)")
        require(self.seed >= 0, "seed", self.seed, "must be >= 0")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio · lr`."""

    lr: float = 3e-3  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio · lr on the last step
    warmup_steps: int = 10  # linear warmup from 0 to lr over this many steps
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay; 0.95 is steadier than 0.999 for LLMs
    eps: float = 1e-8  # AdamW's denominator floor
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 turns clipping off

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "must be > 0")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0: no clipping)")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # train.compile_backend: those the trainer is tested with


@dataclass
class TrainingConfig:
    """steps: optimizer steps to run. micro_batch_size × grad_accum_steps sequences of seq_len
    tokens per step and replica group. tp: tensor-parallel ranks inside the group (on one node).
    device: auto (cuda when present), cpu or cuda. mixed_precision: bf16 autocast on GPU; off on CPU.
    """

    steps: int = 100
    seq_len: int = 128  # tokens per sequence (packed windows); <= model.max_seq_len
    micro_batch_size: int = 8  # sequences per forward/backward pass
    grad_accum_steps: int = 1  # micro-batches summed into each optimizer step
    tp: int = 1
    device: str = "auto"
    mixed_precision: str = "bf16"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    # compile: in place, per block (torchtitan's way): checkpoints move between compiled and eager runs
    # (trainer/compiling.py: when it compiles, where it caches, where flex_attention is used).
    compile: bool = False  # torch.compile each transformer block (faster GPU steps after a compile of tens of seconds)
    compile_backend: str = "inductor"  # with train.compile: inductor, or aot_eager / eager (no C++ compiler, no flex_attention)
    log_interval: int = 10  # steps between writes of train_log.jsonl (every step gets its row)

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "tp", "log_interval"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        require(self.device in ("auto", "cpu", "cuda"), "device", self.device, "must be auto, cpu or cuda")
        require(self.mixed_precision in ("bf16", "none"), "mixed_precision", self.mixed_precision,
                "must be bf16 or none")
        require(self.compile_backend in COMPILE_BACKENDS, "compile_backend", self.compile_backend,
                f"must be one of {', '.join(COMPILE_BACKENDS)} (the torch.compile backends the trainer is tested with)")


@dataclass
class FaultsConfig:
    """inject: fault specs for fire drills (see `watchtower.trainer.faults`)."""

    inject: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.inject):
            try:
                parse_fault(spec, field="inject")
            except ConfigError as err:
                raise ConfigError(f"inject[{i}]", err.value, err.allowed) from None

    def parsed(self) -> list[Fault]:
        return [parse_fault(s) for s in self.inject]


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)  # written by the supervisor (launch contract)

    def __post_init__(self) -> None:
        m, t = self.model, self.train
        if t.tp > 1:
            require(m.n_heads % t.tp == 0, "train.tp", t.tp, f"must divide model.n_heads = {m.n_heads}")
            require(m.kv_heads % t.tp == 0, "train.tp", t.tp, f"must divide the kv heads = {m.kv_heads}")
            require(m.hidden_dim % t.tp == 0, "train.tp", t.tp,
                    f"must divide the MLP width = {m.hidden_dim} (set model.ffn_hidden)")
        require(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
                f"must be <= model.max_seq_len = {m.max_seq_len}")
        require(m.vocab_size >= BYTE_VOCAB, "model.vocab_size", m.vocab_size,
                f"must be >= {BYTE_VOCAB} (256 bytes + BOS)")
        require(self.checkpoint.interval_steps <= t.steps, "checkpoint.interval_steps",
                self.checkpoint.interval_steps, f"must be <= train.steps = {t.steps}")
        for i, fault in enumerate(self.faults.parsed()):  # a rank the group does not have: never fires
            require(fault.rank is None or fault.rank < t.tp, f"faults.inject[{i}]", self.faults.inject[i],
                    f"rank={fault.rank} is beyond train.tp = {t.tp} (ranks 0..{t.tp - 1})")
        require_directory_path(str(self.run.output_path), "run.output_dir")
        if self.checkpoint.dir:  # else <run.output_dir>/checkpoints, checked above
            require_fsspec_backend(self.checkpoint.dir, "checkpoint.dir")  # s3:// without s3fs, nosuch://
            protocol, path = fsspec.core.split_protocol(self.checkpoint.dir)
            if protocol in (None, "file", "local") and "::" not in self.checkpoint.dir:
                require_directory_path(path, "checkpoint.dir")

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.dir or str(self.run.output_path / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short hash of everything that shapes the numbers (not steps, ports, faults, where and how
        often checkpoints go, whether blocks are compiled, or a group's place in a supervised job: a
        resume compares it with the checkpoint's, see checkpoint.py; nor data.skip_steps: a run
        resumes to skip data)."""
        d = self.to_dict()
        for volatile in ("faults", "monitor", "run", "checkpoint", "replica"):
            d.pop(volatile)
        d["train"].pop("steps")
        d["train"].pop("compile")  # how the same model's steps run, not what they compute; popped, the
        d["train"].pop("compile_backend")  # hash is also what checkpoints written before these keys hold
        d["data"].pop("skip_steps")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def require_directory_path(path: str, field: str) -> None:
    """Refuse a local path where no directory can be: an existing file, or a file where one of its
    parents would be (a FileExistsError / NotADirectoryError traceback once the run had started).
    Costs a stat per path component up to the first that exists; nothing is created.

    >>> require_directory_path("/", "run.output_dir")  # exists, a directory
    >>> require_directory_path("/no/such/dir/yet", "run.output_dir")  # "/" is the first that exists
    """
    wanted = Path(path)
    for at in (wanted, *wanted.parents):
        if at.exists():
            require(at.is_dir(), field, path, "is a file; give a directory path" if at == wanted else
                    f"{at} is a file, so no directory can be made under it; give a directory path")
            return


# ---------------------------------------------------------------------------------------------
# Loading: TOML dict + dotted overrides -> validated dataclasses.

def resolve_config_path(name: str) -> Path:
    """A path, or a preset name (`tiny` -> configs/tiny.toml in the working directory, else the one
    the package ships: see `watchtower.shipped`)."""
    candidates = [Path(name)]
    if not name.endswith(".toml"):
        candidates += [Path("configs") / f"{name}.toml", shipped.preset_file(name)]
    for path in candidates:
        if path.is_file():
            return path
    presets = ", ".join(shipped.preset_names())
    raise ConfigError("--config", name, f"no such file; give a TOML path or a preset ({presets})")


def check_this_machine(cfg: TrainConfig) -> None:
    """What only the machine that runs the ranks can answer: is there CUDA, and a GPU per TP rank.

    Called by `watchtower train` on that machine before it spawns anything, not in `__post_init__`:
    a job file is also validated by the supervisor, which may sit on a login node without GPUs.
    Costs a CUDA driver query (`torch.cuda.is_available()`), well under a second, and torch's import
    (~4 s), so only when `train.device = cuda` asks: "auto" and "cpu" need no look at the machine.
    """
    if cfg.train.device != "cuda":
        return
    import torch

    require(torch.cuda.is_available(), "train.device", "cuda",
            "this machine has no usable CUDA device (no GPU, no driver, or a CPU-only torch build); "
            "use --train.device cpu, or auto to take a GPU only when there is one")
    count = torch.cuda.device_count()
    require(count >= cfg.train.tp, "train.device", "cuda",
            f"train.tp = {cfg.train.tp} needs one GPU per rank, this machine shows {count}; "
            "lower --tp or set CUDA_VISIBLE_DEVICES")


def check_resume(cfg: TrainConfig) -> None:
    """What only `checkpoint.dir` can answer: would this run's resume be refused (another train.tp or
    config_hash in the newest save)? Asked by `watchtower train` before it spawns a rank and by
    `watchtower supervise` before the Lighthouse and the groups, so a refusal is one line and exit 2,
    not a group failure. Costs one listing and a manifest read per checkpoint (no shard is read)."""
    if cfg.checkpoint.resume:
        check_resume_config(cfg.checkpoint_url, cfg.train.tp, cfg.config_hash(), cfg.checkpoint.allow_config_change)


def load_config(path: str | None, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    """Defaults, then the TOML file, then each (dotted key, value) override, then validation."""
    data: dict[str, Any] = read_toml(resolve_config_path(path)) if path else {}
    for key, value in overrides:
        if key == "faults.inject" and isinstance(value, list):  # --inject adds to the file's / --faults.inject's
            faults = data.setdefault("faults", {})
            given = faults.get("inject", []) if isinstance(faults, dict) else []  # not a table: set_dotted refuses
            before = build(FaultsConfig, {"inject": given}, "faults").inject  # "a,b": the list it means
            set_dotted(data, key, [*before, *value])
        else:
            set_dotted(data, key, value)
    return build(TrainConfig, data)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return build(TrainConfig, data)
