"""The Llama / Mistral decoder, written out in plain PyTorch.

One class per block, named after the Hugging Face modules so that `state_dict()` keys are
exactly the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, ...): loading and
saving need no renaming table.

Design choices, and why:
* RoPE uses the "rotate_half" layout (first half of each head pairs with the second half).
  That is the layout HF checkpoints store q/k rows in, so the weights load unchanged.
  cos/sin are computed in fp32 from the positions and cast to the activation dtype, as
  transformers does, so fp32 logits agree to ~1e-6.
* Positions are explicit: every call may pass `positions` (B x T). Left-padded batches in
  the sampler and lm-eval then get each row's true positions without special cases here.
* Attention is torch SDPA with grouped-query attention (`enable_gqa`), so K/V heads are
  never copied. Causality and Mistral's sliding window (query i sees key j iff
  0 <= i - j < window) are one boolean mask; with neither padding nor a window we pass
  `is_causal=True` and let SDPA pick its fastest kernel.
* The KV cache is static (gpt-fast style): one preallocated buffer per layer, written at
  `cache_pos`. Decoding reads only the filled prefix, so no step ever reallocates.
* Tied embeddings are not a second parameter: the output projection reuses
  `embed_tokens.weight` directly. No tying to lose under FSDP or meta-device loading.
* Norms run in fp32 and cast back, as in transformers; logits come out in the model's
  dtype and losses take log-softmax in fp32 (see loss.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scale: float,
                 dtype: torch.dtype):
    """cos/sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.int64).float() / head_dim))
    freqs = (positions.float() / scale)[..., None] * inv_freq  # B, T, head_dim/2
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values: per layer a (B, n_kv_heads, max_len, head_dim) buffer."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype, device):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor):
        """Drop finished rows so they stop costing work (batch compaction)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def attention_mask(q_slots: torch.Tensor, k_slots: torch.Tensor,
                   key_valid: Optional[torch.Tensor] = None,
                   window: Optional[int] = None) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, Tq, Tk), True = may attend.

    q_slots (Tq,) and k_slots (Tk,) are indices along the padded sequence; a left-padded
    row's positions differ from its slots by a constant, so slot differences are position
    differences. key_valid (B, Tk) marks the keys that are real tokens (not padding).
    """
    diff = q_slots[:, None] - k_slots[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args, self.layer_idx = args, layer_idx
        hd = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache], cache_pos: int):
        B, T, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_pos, k, v)
        gqa = a.n_kv_heads != a.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config = args
        self.model = Decoder(args)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                cache_pos: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab).

        positions: (B, T) or (T,) token positions for RoPE (default: cache_pos + arange(T)).
        attn_mask: boolean (B|1, 1, T, keys) from `attention_mask`; default: causal, with
                   the sliding window if the model has one, over an unpadded batch.
        cache/cache_pos: write this chunk's K/V at slot cache_pos and attend to slots
                   [0, cache_pos + T).
        return_hidden: return the final normed hidden states instead of logits.
        """
        args = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, T)
        if attn_mask is None:
            # is_causal aligns top-left, which is wrong once a cached prefix exists, and
            # knows no window: build the mask in those two cases only
            total = cache_pos + T
            window = args.sliding_window if args.sliding_window and args.sliding_window < total else None
            if cache_pos > 0 or window is not None:
                attn_mask = attention_mask(torch.arange(cache_pos, total, device=device),
                                           torch.arange(total, device=device), window=window)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, args.head_dim, args.rope_theta,
                                args.rope_scaling_factor, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn_mask, cache, cache_pos)
        h = self.model.norm(h)
        if return_hidden:
            return h
        return F.linear(h, self.output_weight)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: Optional[torch.Generator] = None):
        """Random init (normal(0, std) matrices, ones for norms) for tests and benches."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs/token, 6N convention plus attention (PaLM appendix B)."""
        a = self.config
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len


def build_model(args: ModelArgs, device="meta", dtype=torch.float32) -> Transformer:
    """Construct without allocating when device == 'meta' (weights come from the loader)."""
    with torch.device(device):
        model = Transformer(args)
    return model.to(dtype) if device != "meta" else model
