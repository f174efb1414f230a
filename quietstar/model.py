"""The base decoder: a Llama / Mistral / Qwen2 / SmolLM2-family transformer in raw PyTorch.

Nothing Quiet-STaR-specific lives here (see thinker.py). The model is written so that a caller can
replace the attention pattern without touching the blocks: every layer hands its rotated q, k, v to
an `attn(layer_idx, q, k, v) -> out` callable (default: causal SDPA over the given tokens). The KV
cache below is one such callable; the thought grid in thinker.py is another.

References: Llama (Touvron et al. 2023), Mistral 7B (Jiang et al. 2023; sliding window),
Qwen2 (q/k/v bias), RoFormer (RoPE), the llama3 rope scaling of Meta's reference code.

Memory: RMSNorm and SwiGLU keep only their inputs for backward (fused.py), and `grad_checkpointing="auto"`
(the default) recomputes as many of the first blocks in backward as a memory budget needs
(memory.checkpoint_plan; docs/architecture.md, "Memory").

Shape legend: B batch, N tokens in the call, H query heads, G kv heads, D head dim, d model dim,
V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quietstar.fused import compute_dtype, residual_norm_linears, rms_norm, rms_norm_linears, swiglu_down
from quietstar.memory import announced_plan

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ModelConfig:
    vocab_size: int = 256  # rows of the embedding / outputs of the LM head
    dim: int = 64  # model (residual stream) width d
    n_layers: int = 2
    n_heads: int = 4  # query heads H
    n_kv_heads: Optional[int] = None  # key/value heads G (GQA); None = n_heads (MHA)
    head_dim: Optional[int] = None  # D; None = dim // n_heads
    intermediate_size: Optional[int] = None  # SwiGLU width; None = the Llama rule from dim
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # llama3 scaling: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 4096  # longest position the model is meant for (a KV cache's default size)
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    qkv_bias: bool = False  # Qwen2: bias on the q/k/v projections
    sliding_window: Optional[int] = None  # Mistral: a query sees at most this many keys (itself included)
    arch: str = "llama"  # llama | mistral | qwen2 (informational, used by the HF exporter)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                                 "set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.intermediate_size is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = 64 * ((hidden + 63) // 64)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "llama3") != "llama3":
            raise ValueError(f"ModelConfig.rope_scaling: only llama3 scaling is supported, got {self.rope_scaling}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                 tie_embeddings=True, max_seq_len=512),
    "bench_small": dict(vocab_size=32000, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=688),
    "smollm2_135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                         rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    "llama_1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
                     rope_theta=500000.0, tie_embeddings=True, max_seq_len=8192,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192)),  # Llama-3.2-1B's shape
    "mistral_7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       rope_theta=10000.0, sliding_window=4096, max_seq_len=32768, arch="mistral"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, as the Llama/Mistral reference code does, then scale in the input dtype; the
        # fused function keeps only x and 1/rms for backward (fused.py)
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(D/2,) inverse frequencies, with llama3 scaling applied if the config asks for it."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    sc = cfg.rope_scaling
    if sc is not None:
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor):
    """position_ids (B, N) -> cos, sin (B, 1, N, D) in fp32 (HF's non-interleaved layout)."""
    freqs = position_ids.float()[..., None] * inv_freq  # (B, N, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, N, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def causal_attention(q, k, v, key_valid: Optional[torch.Tensor] = None, window: Optional[int] = None,
                     q_offset: int = 0) -> torch.Tensor:
    """Causal attention of N queries over M >= N keys, the queries being the last N of the keys' positions.

    q (B, H, N, D); k, v (B, G, M, D) with G dividing H (GQA is handled by SDPA, no repeated heads here);
    key_valid (B, M) bool masks padding keys; window = sliding window size; q_offset = M - N.
    """
    N, M = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None and (window is None or M <= window) and q_offset == 0 and N == M:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    qi = torch.arange(N, device=q.device)[:, None] + q_offset
    kj = torch.arange(M, device=q.device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    allowed = allowed[None, None]  # (1, 1, N, M)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
        # a query with no visible key (left padding) would give NaN: let it see itself instead
        allowed = allowed | ~allowed.any(-1, keepdim=True) & (kj == qi)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, norm: "RMSNorm", cos, sin, attn: AttnFn, layer_idx: int):
        """x (B, N, d) the residual stream: the projections read norm(x) (fused.rms_norm_linears). -> the
        attention's output (B, H, N, D) before wo, which the block applies with the residual add."""
        B, N, _ = x.shape
        q, k, v = rms_norm_linears(x, norm, (self.wq, self.wk, self.wv))
        q = q.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = k.view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, N, D)
        v = v.view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, N, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return attn(layer_idx, q, k, v)  # (B, H, N, D): the block applies wo (fused.residual_norm_linears)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 y) * w3 y), y = norm(x). The block computes w1 y and w3 y with the residual add
    before them (fused.residual_norm_linears); this applies the rest. Backward keeps w1 y and w3 y only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, gate, up):  # (B, N, I) each
        return swiglu_down(gate, up, self.w2.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, attn: AttnFn, layer_idx: int):
        o = self.attention(x, self.attention_norm, cos, sin, attn, layer_idx)  # (B, H, N, D), before wo
        ff = self.feed_forward
        h, gate, up = residual_norm_linears(x, o, self.attention.wo.weight, self.ffn_norm, (ff.w1, ff.w3))
        return h + ff(gate, up)  # h = x + wo(o)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # Recompute blocks in backward instead of keeping their activations: True (every block), False, or
        # "auto" (as many of the first blocks as the memory budget needs: memory.checkpoint_plan).
        self.grad_checkpointing: bool | str = "auto"
        self.memory_budget_gb: Optional[float] = None  # for "auto"; None = a fraction of the device's memory
        self.extra_state_bytes = 0  # state kept beside the weights for training (an EMA teacher), in the budget
        self._plans: dict = {}  # "auto"'s plan per call shape: decided (and printed) once
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, d): the output projection (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (..., d) -> logits (..., V)."""
        return F.linear(h, self.lm_head_weight)

    def checkpointed_layers(self, x: torch.Tensor, attn: AttnFn) -> int:
        """How many of the first blocks this call recomputes in backward (x (B, N, d) its input).

        Only with gradients, and never through a stateful attention callable (a KV cache): recomputing
        would append its keys twice. Checkpointing the first blocks is what lowers the peak most: backward
        frees the last blocks' activations before it recomputes the first ones'."""
        if not self.grad_checkpointing or not torch.is_grad_enabled() or getattr(attn, "stateful", False):
            return 0
        if self.grad_checkpointing is True:
            return self.cfg.n_layers
        key = (x.shape[0] * x.shape[1], x.dtype, compute_dtype(x), x.device)
        if key not in self._plans:
            fixed = 4 * sum(p.numel() * p.element_size() for p in self.parameters())  # + grads, 2 AdamW moments
            fixed += self.extra_state_bytes
            self._plans[key] = announced_plan(self.cfg, key[0], x.element_size(), key[2].itemsize, fixed,
                                              self.memory_budget_gb, x.device)
        return self._plans[key].layers

    def default_attn(self, key_valid: Optional[torch.Tensor] = None) -> AttnFn:
        window = self.cfg.sliding_window
        return lambda i, q, k, v: causal_attention(q, k, v, key_valid=key_valid, window=window)

    def forward(self, input_ids: Optional[torch.Tensor] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, attn: Optional[AttnFn] = None,
                attention_mask: Optional[torch.Tensor] = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, N) or inputs_embeds (B, N, d) -> logits (B, N, V), or final-norm hidden (B, N, d).

        position_ids (B, N) default to 0..N-1 (or continue a KV cache). attention_mask (B, N), 1 = real
        token, masks padding keys for the default causal attention. attn overrides the attention pattern.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, N, d)
        B, N, _ = x.shape
        if position_ids is None:
            start = attn.seen if isinstance(attn, KVCache) else 0
            position_ids = torch.arange(start, start + N, device=x.device).expand(B, N)
        if attn is None:
            attn = self.default_attn(None if attention_mask is None else attention_mask.bool())
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)
        recomputed = self.checkpointed_layers(x, attn)
        for i, layer in enumerate(self.layers):
            if i < recomputed:
                x = checkpoint(layer, x, cos, sin, attn, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, i)
        if isinstance(attn, KVCache):
            attn.advance(N)
        h = self.norm(x)
        return h if return_hidden else self.head(h)


class KVCache:
    """A preallocated per-layer K/V cache for incremental causal decoding; an attention callable.

    Pass it as `attn=` to Transformer.forward: each call appends its N tokens' K/V at position `seen`
    and attends causally over everything cached. `key_valid` (B, max_len) marks padding keys (left
    padding for batched prompts); set `cache.key_valid[:, a:b]` before the call that writes them.
    """

    stateful = True  # each call appends to the cache: a checkpointed block must not call it again

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.window = cfg.sliding_window
        self.max_len = max_len
        self.seen = 0  # tokens already cached
        self._key_valid = None  # key_valid[:, :end] of the current call, or None when nothing is padding

    def __call__(self, layer_idx: int, q, k, v):
        N, end = q.shape[2], self.seen + q.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} tokens > max_len={self.max_len}")
        self.k[layer_idx, :, :, self.seen:end] = k
        self.v[layer_idx, :, :, self.seen:end] = v
        if layer_idx == 0:  # the padding mask is the same for every layer of this call: decide once
            key_valid = self.key_valid[:, :end]
            self._key_valid = None if bool(key_valid.all()) else key_valid
        return causal_attention(q, self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end],
                                key_valid=self._key_valid, window=self.window, q_offset=self.seen)

    def advance(self, n: int):
        self.seen += n

    def truncate(self, length: int):
        """Forget everything cached after `length` tokens (e.g. a thought that is no longer needed)."""
        self.seen = length
