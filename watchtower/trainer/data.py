"""Training data: documents from any fsspec URL, byte-level tokens, packed fixed-length windows.

Packing (the Smol Training Playbook's recipe): documents are concatenated, each starting with a BOS
token, and cut into windows of `seq_len + 1` tokens. A window may hold the tail of one document and
the head of the next, so every window also carries
  - `positions`: restart at 0 at each BOS, so RoPE sees each document from its own start;
  - `doc_ids`: a per-window document counter, used for intra-document attention masking.

Order: windows are visited in a permutation drawn from `shuffle_seed + epoch`; replica groups take
interleaved slices of each global batch. `PackedBatches.state_dict()` is two integers (epoch,
cursor), so a resumed run continues on exactly the next batch.

Default corpus: the Python standard library's own `.py` files, which exist on every machine that
runs this package, so the demo needs no download.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from watchtower.trainer.staging import require_fsspec_backend, stage
from watchtower.validation import ConfigError, require

log = logging.getLogger(__name__)

BOS = 256  # one past the byte range
BYTE_VOCAB = 257
STAGE_MODES = ("auto", "always", "never")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".tex")


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut.

    source: a file, a directory (every text file under it), or a glob, local or any fsspec URL
        (`s3://bucket/corpus/`, `gcs://...`). Empty: the Python standard library's sources.
    max_bytes: read at most this much text (keeps CPU demos fast; raise it for real runs).
    document_masking: attend only within a document inside a packed window (the Playbook's choice
        for short-context pretraining); turn off to compare with plain causal attention.
    stage: copy the source into the node-local cache before reading it — "auto": when it is remote
        (not a local path); "always": also local paths (a shared NFS/Lustre mount); "never".
    cache_dir: the node-local cache; empty: $WATCHTOWER_CACHE_DIR (the supervisor gives each node
        its own), else ~/.cache/watchtower/data.
    """

    source: str = ""
    max_bytes: int = 4_000_000
    shuffle_seed: int = 1234
    document_masking: bool = True
    stage: str = "auto"
    cache_dir: str = ""

    def __post_init__(self) -> None:
        require(self.max_bytes > 0, "max_bytes", self.max_bytes, "must be a positive number of bytes")
        require(self.shuffle_seed >= 0, "shuffle_seed", self.shuffle_seed, "must be >= 0")
        require(self.stage in STAGE_MODES, "stage", self.stage, f"must be one of {', '.join(STAGE_MODES)}")
        if self.source and "://" not in self.source and not any(c in self.source for c in "*?["):
            require(Path(self.source).exists(), "source", self.source,
                    "no such file or directory (give a local path, a glob, or an fsspec URL)")
        require_fsspec_backend(self.source)  # s3:// without s3fs: refused here, not as a traceback later


def builtin_corpus_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in stdlib.glob("*.py"))


def list_source_files(source: str) -> list[str]:
    """Every text file a source names, sorted, so every rank and node sees the same order."""
    if not source:
        return builtin_corpus_files()
    fs, path = fsspec.core.url_to_fs(source)
    if any(ch in path for ch in "*?["):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(TEXT_SUFFIXES)]
    elif fs.exists(path):
        files = [path]
    else:
        raise ConfigError("data.source", source, "no such file or directory; give a text file, "
                          "a directory of text files, or a glob (local path or fsspec URL)")
    files = sorted(files)
    if not files:
        raise ConfigError("data.source", source, f"holds no text files ({', '.join(TEXT_SUFFIXES)})")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [f if protocol == "file" else f"{protocol}://{f}" for f in files]


def resolve_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("WATCHTOWER_CACHE_DIR")
                or Path.home() / ".cache" / "watchtower" / "data")


def readable_files(cfg: DataConfig) -> list[str]:
    """The files to read: the source's own, or their staged copies in the node-local cache."""
    urls = list_source_files(cfg.source)
    remote = any("://" in u and not u.startswith("file://") for u in urls)
    if cfg.stage == "always" or (cfg.stage == "auto" and remote):
        return stage(urls, resolve_cache_dir(cfg), cfg.max_bytes).files
    return urls


def load_tokens(cfg: DataConfig) -> torch.Tensor:
    """All documents as one int64 tensor: BOS doc0 BOS doc1 ... (bytes are their own token ids)."""
    chunks: list[torch.Tensor] = []
    total = 0
    for url in readable_files(cfg):
        with fsspec.open(url, "rb") as f:
            data = f.read(cfg.max_bytes - total)
        if not data:
            continue
        chunks.append(torch.tensor([BOS], dtype=torch.int64))
        chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64))
        total += len(data)
        if total >= cfg.max_bytes:
            break
    if not chunks:
        raise ConfigError("data.source", cfg.source, "every file is empty")
    return torch.cat(chunks)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next token ids
    positions: torch.Tensor  # (B, T) position inside its document
    doc_ids: torch.Tensor | None  # (B, T) document counter inside the window, or None

    @property
    def num_tokens(self) -> int:
        return self.inputs.numel()

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.doc_ids))


def window_layout(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions and doc ids for windows of tokens (B, T), from where the BOS tokens are."""
    idx = torch.arange(inputs.shape[-1]).expand_as(inputs)
    is_bos = inputs == BOS
    start = torch.cummax(torch.where(is_bos, idx, torch.zeros_like(idx)), dim=-1).values
    return idx - start, torch.cumsum(is_bos.to(torch.int64), dim=-1)


class PackedBatches:
    """An endless, resumable iterator of packed batches for one data-parallel rank.

    Example:
        >>> tokens = torch.arange(1000) % 250
        >>> it = PackedBatches(tokens, seq_len=8, batch_size=2, seed=0)
        >>> b = next(it); b.inputs.shape, it.state_dict()
        (torch.Size([2, 8]), {'epoch': 0, 'cursor': 2})
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, document_masking: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank  # mutable: a promoted spare reads the shard of the rank it replaces
        self.dp_size = dp_size
        self.document_masking = document_masking
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < batch_size * dp_size:
            raise ConfigError("data.max_bytes", len(tokens), f"the corpus holds {self.num_windows} windows of "
                              f"{seq_len} tokens, fewer than one global batch ({batch_size * dp_size}); "
                              "add data or lower train.seq_len / train.micro_batch_size")
        self.epoch = 0
        self.cursor = 0  # windows of the current epoch's order consumed by all dp ranks together
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_windows, generator=generator)

    def __iter__(self) -> "PackedBatches":
        return self

    def _take_global_batch(self) -> int:
        """Advance past one global batch; returns where it starts in this epoch's order."""
        global_batch = self.batch_size * self.dp_size
        if self.cursor + global_batch > self.num_windows:  # drop the ragged tail, start a new epoch
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        start = self.cursor
        self.cursor += global_batch
        return start

    def skip(self) -> None:
        """Consume a global batch without reading it (a hot spare keeps its data state in sync)."""
        self._take_global_batch()

    def __next__(self) -> Batch:
        start = self._take_global_batch()
        picked = self._order[start + self.dp_rank: start + self.batch_size * self.dp_size: self.dp_size]
        starts = picked * self.seq_len
        windows = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        inputs, targets = windows[:, :-1], windows[:, 1:]
        positions, doc_ids = window_layout(inputs)
        return Batch(inputs, targets, positions, doc_ids if self.document_masking else None)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
