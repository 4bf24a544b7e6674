"""The decoder's shape, without torch: `watchtower.config` validates it in a process that starts no
model (the TP launcher, a supervisor, a config error's exit 2) and so must not pay torch's import.
`watchtower.trainer.model` re-exports it beside the model it shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from watchtower.validation import require


@dataclass
class ModelConfig:
    """Shape of the decoder. `ffn_hidden = 0` picks Llama's rule (8/3 · dim, rounded up to 64)."""

    dim: int = 128  # width of the residual stream (embeddings, attention, norms)
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads; must divide dim, and train.tp must divide it
    n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
    ffn_hidden: int = 0  # SwiGLU width; 0: Llama's rule (8/3 · dim, rounded up to 64)
    vocab_size: int = 320  # byte tokens (256) + BOS, padded to a multiple of 64
    max_seq_len: int = 2048  # size of the RoPE table
    rope_theta: float = 10000.0  # RoPE base; raise it for longer contexts
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    init_std: float = 0.02  # std of the normal weight init

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        require(self.n_kv_heads >= 0, "n_kv_heads", self.n_kv_heads, "must be >= 0 (0 means n_heads)")
        require(self.ffn_hidden >= 0, "ffn_hidden", self.ffn_hidden, "must be >= 0 (0 means 8/3 * dim)")
        require(self.dim % self.n_heads == 0, "n_heads", self.n_heads,
                f"must divide model.dim = {self.dim}")
        require((self.dim // self.n_heads) % 2 == 0, "dim", self.dim,
                "dim / n_heads (the head size) must be even for RoPE")
        require(self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0, "n_kv_heads",
                self.n_kv_heads, f"must divide model.n_heads = {self.n_heads}")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        require(0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "must be in (0, 1)")
        require(self.init_std > 0, "init_std", self.init_std, "must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(int(8 * self.dim / 3) / 64)
