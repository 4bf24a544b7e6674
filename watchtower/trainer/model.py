"""A small Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings.

Written to be read top to bottom. Tensor parallelism (see `parallel.py`) shards the attention and MLP
projections column/row-wise; the modules below therefore never assume the global head count: they
infer the local number of heads from the projected tensor's width, so the same code runs at TP=1 and
TP=N.

Example:
    >>> cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=260)
    >>> model = Transformer(cfg)
    >>> tokens = torch.randint(0, 256, (2, 16))
    >>> model(tokens).shape
    torch.Size([2, 16, 260])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from watchtower.trainer.model_config import ModelConfig  # its home: torch-free, for watchtower.config


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM/nanoGPT estimate used for MFU.

    6 · (non-embedding matmul parameters) + 12 · layers · dim · seq_len for attention scores.
    The tied embedding counts once, as the output projection.
    """
    d, h, kv = cfg.dim, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * h  # wq, wo, wk, wv, w1, w2, w3
    matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * d
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * d * seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 squares lose too much precision.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_table(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim / 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels. x: (B, T, H, hd); cos/sin: (B, T, 1, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, hd/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.kv_heads  # GQA: query heads per kv head (same under TP)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        # -1 heads: under TP each rank holds n_heads / tp of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, h, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, kvh, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask: see document_block_mask
            from torch.nn.attention.flex_attention import flex_attention

            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd); kv heads shared, not repeated
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=self.n_rep > 1)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.flex_attention = False  # document masking as a BlockMask for flex_attention (compile_blocks sets it)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 · layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab).

        `positions` restart at 0 in every packed document (RoPE sees each document on its own);
        `doc_ids` turns on intra-document masking: a token attends only to earlier tokens of its
        own document. Both None: plain causal attention over the whole window.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, T, 1, hd/2)
        sin = self.rope_sin[positions].unsqueeze(2)
        mask = None
        if doc_ids is not None and self.flex_attention:
            mask = document_block_mask(doc_ids)
        elif doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)  # (B, T, T)
            mask = (same_doc & causal).unsqueeze(1)  # (B, 1, T, T)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
        h = self.norm(h)
        return F.linear(h, self.tok_embeddings.weight)  # tied output projection


def compile_blocks(model: Transformer, backend: str = "inductor", flex_attention: bool = False) -> None:
    """torch.compile each transformer block in place (`nn.Module.compile`, as torchtitan does).

    Per block, not the whole model: every block has the same code and shapes, so one compiled graph
    serves all of them (compile time does not grow with depth), and activation checkpointing still
    wraps whole blocks. In place: parameter names and state_dict keys stay as they are, so a checkpoint
    written by a compiled run loads into an eager one and back. `flex_attention` sends document
    masking through flex_attention's fused kernel (`document_block_mask`) instead of the dense mask
    (where it is fused: `compiling.uses_flex_attention`). What it costs: importing torch._dynamo
    (~2 s of CPU) and the compile itself, on the first forward (the trainer runs one before its first
    quorum: `compiling.compile_now`).
    """
    for block in model.layers:
        block.compile(backend=backend)
    model.flex_attention = flex_attention


def document_block_mask(doc_ids: torch.Tensor):
    """Intra-document causal masking as flex_attention's BlockMask, for compiled blocks.

    The dense (B, 1, T, T) mask sends scaled_dot_product_attention to a kernel that reads every score
    (no flash kernel takes an arbitrary mask); a BlockMask skips the blocks no token of a query block
    may see and runs a fused kernel once compiled (eager flex_attention materialises the scores, so
    eager blocks keep the dense mask). Same attention: a token sees the earlier tokens of its own
    document. Costs one mask pass per forward, shared by every layer; on CUDA that pass is compiled.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device,
                             _compile=doc_ids.is_cuda)
