"""The data's configuration, and what can be checked of it without torch or reading the corpus.

`watchtower.config` validates `DataConfig` and a supervisor checks that the corpus fills a global
batch (`check_corpus_fits`) in processes that start no model: the TP launcher, `watchtower supervise`
and `sbatch` before the Lighthouse, a config error's exit 2. Importing torch there cost ~4 s each, so
these live here, with fsspec only; `watchtower.trainer.data` re-exports them beside the loader.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from watchtower.step_ranges import parse_step_range
from watchtower.trainer.staging import require_fsspec_backend
from watchtower.validation import ConfigError, require

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
    cache_dir: the node-local cache; empty: $WATCHTOWER_CACHE_DIR, else ~/.cache/watchtower/data. A
        supervised group is given its node's own in its launch config (`[replica] cache_dir`).
    skip_steps: data to leave unread, named by the steps that read it: "FIRST-LAST" (or "N") skips the
        global batches steps FIRST..LAST read, once, when the run reaches FIRST again (after a restart
        from an earlier checkpoint), e.g. the batches behind a loss spike; a run resumed from a
        checkpoint inside the range skips the part still ahead (its steps up to LAST). The step numbers
        go on; the data jumps. Exact when those steps had as many participating groups as the run has
        now. Ranges are applied in their order and may overlap: a later range counts the steps of the
        run as it went after the earlier skips (each rewind adds one; see `due_skips`).
    """

    source: str = ""
    max_bytes: int = 4_000_000
    shuffle_seed: int = 1234  # order of the windows: a permutation from shuffle_seed + epoch
    document_masking: bool = True
    stage: str = "auto"
    cache_dir: str = ""
    skip_steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, text in enumerate(self.skip_steps):
            parse_step_range(text, f"skip_steps[{i}]")
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


def corpus_windows(num_tokens: int, seq_len: int) -> int:
    """Whole windows of `seq_len` inputs in a corpus (each window's targets reach one token further)."""
    return (num_tokens - 1) // seq_len


def step_windows(batch_size: int, micro_steps: int, participants: int) -> int:
    """The global batch of a step: `batch_size × micro_steps` windows for each participating group."""
    return batch_size * micro_steps * participants


def corpus_tokens(cfg: DataConfig) -> int:
    """How many tokens `load_tokens` returns, from the source files' sizes: one BOS per non-empty file
    plus its bytes, up to `max_bytes` in all. Lets a supervisor check the corpus without reading or
    staging it; costs one listing and one size query per file read."""
    files, total = 0, 0
    for url in list_source_files(cfg.source):
        if total >= cfg.max_bytes:
            break
        fs, path = fsspec.core.url_to_fs(url)
        size = min(fs.size(path), cfg.max_bytes - total)
        files, total = files + (size > 0), total + size
    return files + total


def check_corpus_fits(cfg: DataConfig, seq_len: int, batch_size: int, micro_steps: int, groups: int) -> None:
    """Refuse a corpus with fewer windows than one step of `groups` active groups needs. Every group
    would refuse it at its first step (exit 2), after the Lighthouse and every group have started."""
    windows = corpus_windows(corpus_tokens(cfg), seq_len)
    need = step_windows(batch_size, micro_steps, groups)
    require(windows >= need, "data.source", cfg.source or "(the built-in corpus)",
            f"holds {windows} windows of {seq_len} tokens (data.max_bytes = {cfg.max_bytes}), fewer than one "
            f"global batch of {groups} active groups ({need}); add data, raise data.max_bytes, or lower "
            "cluster.active_groups / train.seq_len / train.micro_batch_size / train.grad_accum_steps")
