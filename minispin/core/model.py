"""The Llama / Mistral / Qwen2 decoder, written out in plain PyTorch.

One class per block, named after the Hugging Face modules so that `state_dict()` keys are
exactly the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, ...): loading and
saving need no renaming table. The three families differ only in config: Qwen2 (and Llama
with attention_bias / mlp_bias) gives some projections a bias, Mistral has a window.

Design choices, and why:
* RoPE uses the "rotate_half" layout (first half of each head pairs with the second half).
  That is the layout HF checkpoints store q/k rows in, so the weights load unchanged.
  Inverse frequencies and cos/sin are computed in fp32 with transformers' arithmetic,
  step for step, and cast to the activation dtype, so fp32 logits agree to ~1e-6. The
  scaled variants (linear, llama3, dynamic NTK) change only the inverse frequencies.
* Positions are explicit: every call may pass `positions` (B x T). Left-padded batches in
  the sampler and lm-eval then get each row's true positions without special cases here.
* Attention is torch SDPA. Causality, Mistral's sliding window (query i sees key j iff
  0 <= i - j < window) and hidden keys (padding, or SPIN's attention_mask = 0 on eos) are
  one boolean mask; with none of them we pass `is_causal=True` and `enable_gqa`, which
  lets SDPA pick its fastest kernel without copying K/V heads. With a mask, GQA is done
  by folding: the n_rep query heads that share a K/V head become n_rep x T rows of one
  head, so SDPA sees as many query heads as K/V heads and needs no GQA flag. (An explicit
  mask together with enable_gqa rules out the flash and memory-efficient kernels on most
  torch releases, and the math fallback copies K/V in fp32 in every layer.)
* The KV cache is static (gpt-fast style): one preallocated buffer per layer, written at
  `cache_pos`. Decoding reads only the filled prefix, so no step ever reallocates.
* Tied embeddings are not a second parameter: the output projection reuses
  `embed_tokens.weight` directly. No tying to lose under FSDP or meta-device loading.
* Norms run in fp32 and cast back, as in transformers; logits come out in the model's
  dtype and losses take log-softmax in fp32 (see loss.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    """The model's shape: what the forward pass needs (run/config.py reads it from an HF
    config.json and writes it back)."""
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None = plain RoPE; else {"rope_type": "linear" | "dynamic" | "llama3", "factor": ...,
    # and for llama3 low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None  # Mistral: query i sees key j iff 0 <= i-j < window
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False    # Llama with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2  # the first stop id (the one a template writes)
    eos_token_ids: Tuple[int, ...] = ()  # every stop id (Llama 3 lists several); () = (eos_token_id,)
    pad_token_id: Optional[int] = None
    dtype: str = "float32"  # the dtype the checkpoint was saved in
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.eos_token_ids and self.eos_token_id is not None:
            self.eos_token_ids = (self.eos_token_id,)


# The GQA fold (see the module docstring) is for the GPU's fused kernels. On CPU, SDPA's
# own kernel already takes a mask together with enable_gqa, and the fold would change the
# last bits of one-token decode steps (a 2-row matmul rounds differently from a 1-row
# one), so the CPU keeps the flag unless this is set (the tests set it to check the fold).
FOLD_GQA_ON_CPU = False


def fold_gqa(device: torch.device) -> bool:
    return device.type != "cpu" or FOLD_GQA_ON_CPU


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


def rope_frequencies(args: ModelArgs, positions: torch.Tensor) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim/2,), fp32, with the config's scaling applied."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":  # positions / factor, written as frequencies / factor like transformers
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "dynamic":
        return _dynamic_ntk_frequencies(inv_freq, exponents, positions, args)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original / low_freq_factor are stretched by
    `factor`, those shorter than original / high_freq_factor are kept, and the band between
    blends the two linearly in original / wavelength (original = the pretraining context)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(in_band, blended, stretched)


def _dynamic_ntk_frequencies(inv_freq, exponents, positions, args: ModelArgs) -> torch.Tensor:
    """Dynamic NTK, as transformers computes it: a call whose longest position L = max + 1
    passes max_position_embeddings M uses the base theta * (factor * L / M - (factor - 1))
    ** (d / (d - 2)); shorter calls use plain RoPE. L is taken over the whole call (every
    row), and cached keys keep the frequencies they were written with.

    transformers also remembers the largest L it has seen and keeps using it for later
    calls longer than M but shorter than that L; this function is stateless. The two agree
    on any single forward and during decoding, where L only grows. A tensor expression
    (no .item()), so decoding never waits on the GPU and compiles to one graph."""
    factor, limit, dim = args.rope_scaling["factor"], args.max_position_embeddings, args.head_dim
    seq_len = positions.max() + 1
    base = args.rope_theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    return torch.where(seq_len > limit, 1.0 / (base ** exponents), inv_freq)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    freqs = positions.float()[..., None] * inv_freq  # B, T, head_dim/2
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


def slot_mask(q_slots: torch.Tensor, k_slots: torch.Tensor,
              key_valid: Optional[torch.Tensor] = None,
              window: Optional[int] = None) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, Tq, Tk), True = may attend: causal, windowed, and
    hiding the keys that key_valid (B, Tk) marks False (padding, masked tokens).

    q_slots (Tq,) and k_slots (Tk,) are indices along the padded sequence; a left-padded
    row's positions differ from its slots by a constant, so slot differences are position
    differences.
    """
    diff = q_slots[:, None] - k_slots[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed


_COMPILED_FLEX = None


def flex_attention(compiled: bool):
    """torch's flex_attention; compiled (once, on CUDA) because eager it materializes the
    whole score matrix instead of running the block-sparse kernel."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention as flex
    if not compiled:
        return flex
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex)
    return _COMPILED_FLEX


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args, self.layer_idx = args, layer_idx
        hd = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache], cache_pos: int):
        """mask: None (causal) or boolean (B|1, 1, T, keys); for the GQA fold, already
        tiled n_rep times along the queries by Transformer.forward."""
        B, T, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_pos, k, v)
        n_rep = a.n_heads // a.n_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
        elif not torch.is_tensor(mask):  # a flex_attention BlockMask (packed rows: packing.py)
            y = flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=n_rep > 1)
        elif n_rep > 1 and fold_gqa(x.device):
            # query head h uses K/V head h // n_rep: the group's queries become rows of one head
            q = q.reshape(B, a.n_kv_heads, n_rep * T, a.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.reshape(B, a.n_heads, T, a.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

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


@contextlib.contextmanager
def _tf32_on_cuda(t: torch.Tensor):
    """TF32 for fp32 matmuls on CUDA inside the block (torch's setting is restored after).
    Used where the fp32 operands hold bf16 values: TF32's 10-bit mantissa stores those
    exactly, so the products and their fp32 sums are fp32's, at tensor-core speed."""
    try:
        old = torch.get_float32_matmul_precision() if t.is_cuda else None
    except RuntimeError:  # the program uses torch's newer TF32 switches: leave them alone
        old = None
    if old is None:
        yield
        return
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _wide_mm(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """h @ weight.T of bf16/fp16 operands, written in fp32 by the half-precision GEMM itself
    (torch.mm's out_dtype: tensor cores at the bf16 rate, products exact, sums in fp32), with
    no fp32 copy of the weight. CUDA only (torch offers it nowhere else); None elsewhere."""
    if not (h.is_cuda and dtype == torch.float32 and h.dtype == weight.dtype
            and h.dtype in (torch.bfloat16, torch.float16)):
        return None
    try:
        out = torch.mm(h.reshape(-1, h.shape[-1]), weight.t(), dtype)
    except (TypeError, RuntimeError):  # a torch without mm(..., out_dtype)
        return None
    return out.reshape(*h.shape[:-1], weight.shape[0])


class WideLogits(torch.autograd.Function):
    """lm_head with a wider output than its inputs: F.linear(h, W) of bf16 h and W, computed
    and returned in fp32, so no logit is rounded to bf16 before the log-softmax. It saves
    the bf16 h and W for backward (no fp32 copies live between forward and backward); the
    gradients come back in the inputs' dtypes, as bf16 autograd would give them.

    Forward on CUDA is one bf16 GEMM with an fp32 output (`_wide_mm`): a product of two
    bf16 numbers is exact in fp32, so it equals the fp32 product of the widened operands up
    to the order of the fp32 sums, at the bf16 rate and without widening the head (V x D) to
    fp32 first. Elsewhere, and in backward (whose incoming gradient is fp32), the operands
    are widened and multiplied in fp32 (TF32 on CUDA: exact for the bf16 operand; the fp32
    gradient keeps 10 mantissa bits there, where a bf16 gradient would keep 7)."""

    @staticmethod
    def forward(ctx, h, weight, dtype):
        ctx.save_for_backward(h, weight)
        out = _wide_mm(h, weight, dtype)
        if out is not None:
            return out
        with _tf32_on_cuda(h):
            return F.linear(h.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = grad_w = None
        with _tf32_on_cuda(grad):
            if ctx.needs_input_grad[0]:
                grad_h = (grad @ weight.to(grad.dtype)).to(h.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (grad.reshape(-1, grad.shape[-1]).t() @
                          h.reshape(-1, h.shape[-1]).to(grad.dtype)).to(weight.dtype)
        return grad_h, grad_w, None


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
                cache_pos: int = 0, return_hidden: bool = False,
                attention_mask: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None,
                logits_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab).

        positions: (B, T) or (T,) token positions for RoPE (default: cache_pos + arange(T)).
        attn_mask: boolean (B|1, 1, T, keys), True = may attend (see `slot_mask`); default:
                   causal, with the sliding window if the model has one. Or a flex_attention
                   BlockMask (packing.packed_block_mask), which flex_attention applies as is.
        attention_mask: (B, cache_pos + T) of 0/1, transformers' key mask: a key marked 0
                   is hidden from every query (on top of attn_mask or the causal default).
                   It does not move positions (pass `positions` for that). A query that
                   would then see no key at all (e.g. a row whose first token is masked)
                   attends to itself alone, so its output stays finite on every SDPA
                   kernel; transformers gives such a query uniform attention (eager) or a
                   zero output (sdpa), which disagree with each other anyway.
        cache/cache_pos: write this chunk's K/V at slot cache_pos and attend to slots
                   [0, cache_pos + T).
        return_hidden: return the final normed hidden states instead of logits.
        logits_at: (B, T) bool: return only these positions' logits, as (N, vocab) in row
                   order — the loss needs the answers' positions only, so the prompt's
                   logits are never computed.
        logits_dtype: the dtype lm_head computes in (default: the hidden states'). float32
                   under bf16 weights gives logits that were never rounded to bf16.
        """
        args = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, T)
        mask = self._mask(attn_mask, attention_mask, B, T, cache_pos, input_ids.device)
        n_rep = args.n_heads // args.n_kv_heads
        if torch.is_tensor(mask) and n_rep > 1 and fold_gqa(input_ids.device):  # tiled once per forward
            mask = mask.expand(mask.shape[0], 1, T, mask.shape[-1]).repeat(1, 1, n_rep, 1)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, rope_frequencies(args, positions), h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache, cache_pos)
        h = self.model.norm(h)
        if return_hidden:
            return h
        if logits_at is not None:
            h = h[logits_at]
        if logits_dtype is not None and logits_dtype != h.dtype:
            return WideLogits.apply(h, self.output_weight, logits_dtype)
        return F.linear(h, self.output_weight)

    def _mask(self, attn_mask, attention_mask, B, T, cache_pos, device):
        """The boolean mask the blocks get, or None for plain causal attention."""
        total = cache_pos + T
        window = self.config.sliding_window
        window = window if window and window < total else None
        if attention_mask is None:
            # is_causal aligns top-left, which is wrong once a cached prefix exists, and
            # knows no window: build the mask in those two cases only
            if attn_mask is None and (cache_pos > 0 or window is not None):
                attn_mask = slot_mask(torch.arange(cache_pos, total, device=device),
                                      torch.arange(total, device=device), window=window)
            return attn_mask
        if tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"(batch, cache_pos + tokens) = ({B}, {total})")
        keys = attention_mask.to(device=device, dtype=torch.bool)
        q_slots, k_slots = torch.arange(cache_pos, total, device=device), torch.arange(total, device=device)
        if attn_mask is None:
            mask = slot_mask(q_slots, k_slots, keys, window)
        else:
            mask = attn_mask & keys[:, None, None, :]
        blind = ~mask.any(dim=-1, keepdim=True)
        return mask | (blind & (q_slots[:, None] == k_slots[None, :]))

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
