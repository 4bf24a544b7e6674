"""Training data: documents from any fsspec URL, byte-level tokens, packed fixed-length windows.

Packing (the Smol Training Playbook's recipe): documents are concatenated, each starting with a BOS
token, and cut into windows of `seq_len + 1` tokens. A window may hold the tail of one document and
the head of the next, so every window also carries
  - `positions`: restart at 0 at each BOS, so RoPE sees each document from its own start;
  - `doc_ids`: a per-window document counter, used for intra-document attention masking.

Order: windows are visited in a permutation drawn from `shuffle_seed + epoch`; replica groups take
interleaved slices of each step's global batch. The cursor moves once per *committed* step, by that
step's global batch, in every group alike (hot spares included), so a promoted spare reads exactly
the windows the group it replaces would have read, and a step torchft redoes reads its windows again.
`PackedBatches.state_dict()` is two integers (epoch, cursor), so a resumed or healed group continues
on exactly the next batch.

Default corpus: the Python standard library's own `.py` files, which exist on every machine that
runs this package, so the demo needs no download.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch

from watchtower.step_ranges import parse_step_range
# DataConfig and the checks made without torch (a launcher's, a supervisor's) live in data_config.py;
# re-exported here, beside the loader they describe.
from watchtower.trainer.data_config import (  # noqa: F401
    BOS, BYTE_VOCAB, STAGE_MODES, TEXT_SUFFIXES, DataConfig, builtin_corpus_files, check_corpus_fits,
    corpus_tokens, corpus_windows, list_source_files, step_windows)
from watchtower.trainer.staging import stage
from watchtower.validation import ConfigError

log = logging.getLogger(__name__)


def due_skips(skip_steps: list[str], step: int, applied: set[int]) -> list[tuple[int, int]]:
    """The skip_steps ranges to apply before `step`, in their order, as (first, steps to skip): every
    range holding `step` whose FIRST is not in `applied` (the data state's `skipped`). A range entered
    at its FIRST skips all its steps; one entered later (a checkpoint inside it was loaded) skips the
    steps still ahead, LAST - step + 1. Ranges are not merged: after a first rewind skipped 120-320, a
    second spike at 300 counts steps of the run that already jumped, so "300-500" is its own skip,
    applied at step 300 after the first (a merged "120-500" would read that spike's data at step 120).
    Ranges sharing a FIRST are applied together (one key in `applied`).

    >>> due_skips(["120-124"], 120, set()), due_skips(["120-124"], 121, {120}), due_skips(["18-24"], 21, set())
    ([(120, 5)], [], [(18, 4)])
    >>> due_skips(["120-320", "300-500"], 300, {120}), due_skips(["150-154", "150-160"], 150, set())
    ([(300, 201)], [(150, 5), (150, 11)])
    """
    ranges = (parse_step_range(text) for text in skip_steps)
    return [(first, last - step + 1) for first, last in ranges if first <= step <= last and first not in applied]


def resolve_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("WATCHTOWER_CACHE_DIR")
                or Path.home() / ".cache" / "watchtower" / "data")


def readable_files(cfg: DataConfig, progress: Callable[[], None] | None = None) -> list[str]:
    """The files to read: the source's own, or their staged copies in the node-local cache.
    `progress` is called as staging copies (see `stage`)."""
    urls = list_source_files(cfg.source)
    remote = any("://" in u and not u.startswith("file://") for u in urls)
    if cfg.stage == "always" or (cfg.stage == "auto" and remote):
        return stage(urls, resolve_cache_dir(cfg), cfg.max_bytes, progress).files
    return urls


def load_tokens(cfg: DataConfig, progress: Callable[[], None] | None = None) -> torch.Tensor:
    """All documents as one int64 tensor: BOS doc0 BOS doc1 ... (bytes are their own token ids).
    `progress` is called as staging copies and as each file is read: a sign of life for a supervisor."""
    chunks: list[torch.Tensor] = []
    total = 0
    for url in readable_files(cfg, progress):
        if progress is not None:
            progress()
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
    """An endless, resumable source of packed batches, in one order shared by every replica group.

    A step's global batch is `batch_size × micro_steps × participants` windows from the cursor on;
    participant `rank` reads every `participants`-th window of each micro-batch, starting at `rank`.
    Every group, participant or hot spare, brackets each step with `begin_step(rank, participants)`
    (rank None for a spare: it reads nothing) and `end_step(committed)`: the cursor then moves by the
    same global batch everywhere, and only when the step commits. Used as a plain iterator, without
    `begin_step`, it is one group alone and each `micro_steps` calls to `next()` make one step.

    Cost: a step's plan is one slice of a cached permutation; `next()` copies batch_size windows.

    Example:
        >>> tokens = torch.arange(1000) % 250
        >>> it = PackedBatches(tokens, seq_len=8, batch_size=2, seed=0)
        >>> b = next(it); b.inputs.shape, it.state_dict()
        (torch.Size([2, 8]), {'epoch': 0, 'cursor': 2})
        >>> spare = PackedBatches(tokens, seq_len=8, batch_size=2, seed=0)
        >>> spare.begin_step(None, participants=2); spare.end_step(committed=True); spare.state_dict()
        {'epoch': 0, 'cursor': 4}
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 document_masking: bool = True, micro_steps: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.micro_steps = micro_steps  # micro-batches per step and group (train.grad_accum_steps)
        self.seed = seed
        self.document_masking = document_masking
        self.num_windows = corpus_windows(len(tokens), seq_len)
        self.epoch = 0
        self.cursor = 0  # windows of the current epoch's order consumed by committed steps
        self._orders: dict[int, torch.Tensor] = {}
        self._plan: _StepPlan | None = None
        self.skipped: set[int] = set()  # first steps of the skip_steps ranges applied (kept in the state)
        self.last_read: tuple[int, torch.Tensor] | None = None  # (epoch, window ids) of the last batch
        self._check_fits(1)

    def _check_fits(self, participants: int) -> None:
        need = self.step_windows(participants)
        if self.num_windows < need:
            raise ConfigError("data.max_bytes", len(self.tokens), f"the corpus holds {self.num_windows} windows "
                              f"of {self.seq_len} tokens, fewer than one global batch ({need}); add data or "
                              "lower train.seq_len / train.micro_batch_size / train.grad_accum_steps")

    def step_windows(self, participants: int) -> int:
        """The global batch of a step with `participants` groups, in windows."""
        return step_windows(self.batch_size, self.micro_steps, participants)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}  # the current and next
            self._orders[epoch] = torch.randperm(self.num_windows, generator=generator)
        return self._orders[epoch]

    def _step_start(self, participants: int) -> tuple[int, int]:
        """(epoch, first position) of the next step's global batch. A step that does not fit in
        the rest of the epoch starts the next one (the ragged tail is dropped)."""
        if participants < 1:
            raise ValueError(f"a step needs at least one participating group, got {participants}")
        self._check_fits(participants)
        if self.cursor + self.step_windows(participants) > self.num_windows:
            return self.epoch + 1, 0
        return self.epoch, self.cursor

    def windows(self, rank: int, participants: int) -> torch.Tensor:
        """The window ids participant `rank` of `participants` reads in the next step:
        (micro_steps, batch_size). Pure: depends only on (epoch, cursor)."""
        if not 0 <= rank < participants:
            raise ValueError(f"rank {rank} is not one of {participants} participants")
        epoch, start = self._step_start(participants)
        step = self._order(epoch)[start: start + self.step_windows(participants)]
        return step.view(self.micro_steps, self.batch_size * participants)[:, rank::participants]

    def begin_step(self, rank: int | None, participants: int) -> None:
        """Plan the coming step: this group is participant `rank` of `participants`, or a hot spare
        (rank None) that reads nothing. Every group of the step must pass the same `participants`.
        Calling it again before `end_step` plans the step anew."""
        ids = None if rank is None else self.windows(rank, participants)
        epoch, _ = self._step_start(participants)  # a spare's participants are checked as well
        self._plan = _StepPlan(participants, ids, epoch)

    def skip(self, first: int, steps: int, participants: int) -> list[tuple[int, int, int]]:
        """Move the cursor past `steps` global batches of `participants` groups, unread, and remember
        `first` (the skip_steps range it stands for) in the state, so a heal or a checkpoint carries
        it and it is not applied twice. Returns each range of positions skipped: (epoch, start, end)
        in that epoch's order. Every group calls it alike, before planning the step.

        >>> it = PackedBatches(torch.arange(1000) % 250, seq_len=8, batch_size=2, seed=0)
        >>> it.skip(first=3, steps=2, participants=3), it.state_dict()
        ([(0, 0, 12)], {'epoch': 0, 'cursor': 12, 'skipped': [3]})
        """
        if self._plan is not None:
            raise RuntimeError("skip() inside a planned step: skip before begin_step()")
        ranges: list[tuple[int, int, int]] = []
        for _ in range(steps):
            epoch, start = self._step_start(participants)
            end = start + self.step_windows(participants)
            if ranges and ranges[-1][0] == epoch and ranges[-1][2] == start:
                ranges[-1] = (epoch, ranges[-1][1], end)
            else:
                ranges.append((epoch, start, end))
            self.epoch, self.cursor = epoch, end
        self.skipped.add(first)
        return ranges

    def step_window_ids(self, first: int, steps: int, participants: int) -> set[tuple[int, int]]:
        """(epoch, window id) of every window steps first..first+steps-1 read in a run from the start
        that skips nothing, with `participants` groups throughout (what `bad_data@N:LEN` poisons)."""
        width = self.step_windows(participants)
        per_epoch = self.num_windows // width  # the ragged tail of an epoch is never read
        out = set()
        for step in range(first, first + steps):
            epoch, start = divmod(step - 1, per_epoch)
            out |= {(epoch, int(w)) for w in self._order(epoch)[start * width: (start + 1) * width]}
        return out

    def end_step(self, committed: bool) -> None:
        """Close the step: a committed step moves the cursor past its global batch (in every group,
        spares too); an uncommitted one leaves it, so the redo reads the same windows again."""
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("end_step() without begin_step()")
        if committed:
            self.epoch, start = self._step_start(plan.participants)
            self.cursor = start + self.step_windows(plan.participants)

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> Batch:
        if self._plan is None:  # a plain iterator: one group alone, its step closes itself
            self.begin_step(0, 1)
            self._plan.closes_itself = True
        plan = self._plan
        if plan.windows is None:
            raise RuntimeError("a hot spare reads no data: begin_step() was given rank None")
        if plan.read == self.micro_steps:
            raise RuntimeError(f"a step holds {self.micro_steps} micro-batches; call end_step() first")
        batch = self.read(plan.windows[plan.read])
        self.last_read = (plan.epoch, plan.windows[plan.read])
        plan.read += 1
        if plan.closes_itself and plan.read == self.micro_steps:
            self.end_step(committed=True)
        return batch

    def read(self, window_ids: torch.Tensor) -> Batch:
        """The batch made of these windows, in this order."""
        starts = window_ids * self.seq_len
        windows = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        inputs, targets = windows[:, :-1], windows[:, 1:]
        positions, doc_ids = window_layout(inputs)
        return Batch(inputs, targets, positions, doc_ids if self.document_masking else None)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "cursor": self.cursor}
        if self.skipped:
            state["skipped"] = sorted(self.skipped)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last committed step of a checkpoint or of a healthy peer; a step
        planned before the load is dropped (it must be planned again)."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.skipped = {int(s) for s in state.get("skipped", ())}
        self._plan = None


@dataclass
class _StepPlan:
    participants: int
    windows: torch.Tensor | None  # (micro_steps, batch_size) window ids; None: a hot spare
    epoch: int = 0  # the epoch whose order the windows come from
    read: int = 0  # micro-batches read so far
    closes_itself: bool = False  # plain iteration: the step ends after its last micro-batch
