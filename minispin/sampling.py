"""Sampling y' ~ p_θ(·|x) with a static KV cache: batched prefill, then one token a step.

    from minispin import generate
    new_ids = generate(model, prompt_ids, max_new_tokens=256, temperature=1.0, seed=42)

How a batch is run, and why:
* Prompts of different lengths are LEFT-padded to the longest one, so every row's next
  token lands in the same cache slot and one decode step serves the whole batch. Each row
  gets its true RoPE positions (slot minus its padding) and a boolean mask that hides its
  padding keys. With left padding, slot differences equal position differences, so
  Mistral's sliding window (query i sees key j iff 0 <= i - j < window) is a condition on
  slots: after the prompt, one slot per step leaves the window and is switched off in the
  row-independent key mask, in place, at no cost per step.
* The KV cache is preallocated (model.KVCache) for prompt + max_new_tokens: no step
  allocates or copies the cache. The prefill computes logits for the last position only
  (hidden states -> lm_head for one token), never B x T x vocab.
* Rows that emitted eos are finished: their later tokens are cut off on output. When a
  quarter of the batch has finished, the batch is compacted (cache, masks and positions
  keep only the live rows), so finished rows stop costing work; when all are finished the
  loop stops. `generate` sorts prompts by length before cutting them into batches, so a
  batch holds prompts of similar length and little padding.
* Sampling uses the inverse CDF with ONE uniform number per row and step. The uniforms of
  a row come from its own torch.Generator, seeded from (seed, row) — or from the caller's
  per-row seeds, which generate.py derives from (seed, prompt id). A prompt therefore gets
  the same sample whatever batch, rank count or order it is generated in (up to the
  last-bit float differences that a different batch shape can make in the logits).
  Filtering follows transformers' order: temperature, then top-k, then top-p (keep the
  smallest set of most likely tokens whose probability reaches top_p, always at least
  one). temperature 0 is greedy (argmax, first index on ties, as torch and HF do).
* Eager is the reference path. `compile=True` runs the decode step through torch.compile
  with static shapes (attention over the whole preallocated cache, the write position a
  tensor), so that on a GPU the step can also be captured as a CUDA graph
  (mode="reduce-overhead"). The tests check it against the eager path.
"""
from __future__ import annotations

import hashlib
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .model import KVCache, Transformer, attention_mask

__all__ = ["generate", "generate_batch", "sample_next", "row_seed", "filtered_probs"]


def row_seed(seed: int, key) -> int:
    """A 63-bit seed for one row from (seed, key); key is a prompt id or a row index."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniforms(seeds: Sequence[int], steps: int, device) -> torch.Tensor:
    """(rows, steps) uniforms in [0, 1): row i from a generator seeded with seeds[i]."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(int(s))
        torch.rand(steps, generator=g, dtype=torch.float64, out=out[i])
    return out.to(device)


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0):
    """(probs, token_ids) of the distribution that sampling draws from.

    probs (B, K) are in the order of token_ids (B, K) (None = the whole vocabulary in
    order); tokens removed by top-k/top-p have probability 0 or are absent.
    """
    logits = logits.float() / temperature
    V = logits.shape[-1]
    ids = None
    if 0 < top_k < V:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, most likely first
    elif top_p < 1.0:
        logits, ids = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs[:, 0] = torch.where(before[:, 0] >= top_p, 1.0, probs[:, 0])  # top_p <= 0: keep one
    return probs, ids


def sample_next(logits: torch.Tensor, u: Optional[torch.Tensor], temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token for each row of logits (B, V), given one uniform u (B,) per row."""
    if temperature <= 0 or u is None:
        return logits.argmax(dim=-1)
    probs, ids = filtered_probs(logits, temperature, top_k, top_p)
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total, so the search never lands past the last kept token
    target = torch.minimum(u.view(-1, 1) * total, total * (1.0 - 1e-12))
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (j if ids is None else ids.gather(-1, j)).view(-1)


def _device_dtype(model: Transformer):
    w = model.output_weight
    return w.device, w.dtype


class _StaticCache(KVCache):
    """KVCache for the compiled step: writes at a tensor position, returns whole buffers."""

    def __init__(self, args, batch, max_len, dtype, device):
        super().__init__(args, batch, max_len, dtype, device)
        if torch.device(device).type == "cuda":  # fixed addresses, so CUDA graphs may write them
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    def update(self, layer, start, k, v):
        if isinstance(start, int):
            return super().update(layer, start, k, v)
        self.k[layer].index_copy_(2, start, k)
        self.v[layer].index_copy_(2, start, v)
        return self.k[layer], self.v[layer]


class _RowView(KVCache):
    """Rows [first, last) of a batch cache from slot `start` on, as a cache of its own
    (views: what the model writes lands in the batch cache)."""

    def __init__(self, cache: KVCache, first: int, last: int, start: int):
        self.k = [k[first:last, :, start:] for k in cache.k]
        self.v = [v[first:last, :, start:] for v in cache.v]
        self.max_len = cache.max_len - start


def prefill_groups(lens: Sequence[int], n_params: int, overhead: float):
    """Split rows sorted by length (longest first) into ranges [i, j), one forward each.

    A group costs `overhead` (one forward call, in parameter x token units) plus
    n_params x (its longest prompt x its rows): padding is paid for as tokens. Dynamic
    programming over the points where the length changes gives the cheapest split: one
    group for similar lengths, several when padding would waste more than the calls cost.
    """
    B = len(lens)
    starts = [i for i in range(B) if i == 0 or lens[i] != lens[i - 1]] + [B]
    K = len(starts) - 1
    best = [0.0] * (K + 1)
    nxt = [K] * (K + 1)
    for k in range(K - 1, -1, -1):
        best[k] = float("inf")
        for m in range(k + 1, K + 1):
            c = overhead + n_params * lens[starts[k]] * (starts[m] - starts[k]) + best[m]
            if c < best[k]:
                best[k], nxt[k] = c, m
    groups, k = [], 0
    while k < K:
        groups.append((starts[k], starts[nxt[k]]))
        k = nxt[k]
    return groups


def _decode_step(model, tok, pos, slot, key_valid, cache):
    """One token per row over the whole static cache (shapes never change)."""
    slots = torch.arange(key_valid.shape[1], device=tok.device)
    mask = (key_valid & (slots <= slot))[:, None, None, :]
    logits = model(tok, pos, mask, cache, slot)
    return logits[:, -1]


_COMPILED = {}


def _compiled_step(device, backend):
    """The decode step through torch.compile (CUDA graphs on GPU); backend "eager" only
    traces it (cheap: the tests use it to check the static-shape step itself)."""
    backend = "inductor" if backend is True else backend
    key = (device.type, backend)
    if key not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        _COMPILED[key] = torch.compile(_decode_step, backend=backend, mode=mode, dynamic=False)
    return _COMPILED[key]


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: List[List[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   eos_id: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
                   compile: Union[bool, str] = False, compact_fraction: float = 0.25,
                   ragged_prefill: Optional[bool] = None) -> List[List[int]]:
    """One batch: the new tokens of each row (in the given order), eos excluded.

    seeds: one seed per row (needed when temperature > 0).
    ragged_prefill: True = prefill row by row, False = the whole padded batch in one
        forward, None = length groups chosen by a cost model (see prefill_groups).
    """
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <s>)")
    greedy = temperature <= 0
    if not greedy and (seeds is None or len(seeds) != B):
        raise ValueError("sampling needs one seed per row")
    # rows longest first, so that prefill groups of similar length are row ranges
    perm = sorted(range(B), key=lambda i: -len(prompts[i]))
    prompts = [prompts[i] for i in perm]
    seeds = None if greedy else [seeds[i] for i in perm]
    args = model.config
    device, dtype = _device_dtype(model)
    lens = [len(p) for p in prompts]
    T = lens[0]
    max_len = T + max_new_tokens
    if compile:  # the compiled step's shapes depend on the cache length: few distinct ones
        max_len = -(-max_len // 256) * 256

    tokens = torch.zeros(B, T, dtype=torch.long)
    key_valid = torch.ones(B, max_len, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        key_valid[i, :T - len(p)] = False
    pad = T - torch.tensor(lens)
    positions = (torch.arange(T)[None] - pad[:, None]).clamp_min(0)
    tokens, key_valid, positions = tokens.to(device), key_valid.to(device), positions.to(device)
    window = args.sliding_window

    # ---- prefill: each group of rows in one forward, written into its rows and slots of
    # the batch cache; logits of the last slot only
    cache = (_StaticCache if compile else KVCache)(args, B, max_len, dtype, device)
    if ragged_prefill is None:
        # one forward call, in params x tokens (measured on CPU: small GEMMs run slower too)
        overhead = 1e9 if device.type == "cpu" else 5e11
        groups = prefill_groups(lens, model.num_params(), overhead)
    else:
        groups = [(i, i + 1) for i in range(B)] if ragged_prefill else [(0, B)]
    hs = []
    for i, j in groups:
        L = lens[i]  # the longest of the group
        view = cache if (i, j) == (0, B) else _RowView(cache, i, j, T - L)
        if lens[j - 1] == L:  # no padding: the model's own causal (+ window) mask
            h = model(tokens[i:j, T - L:], None, None, view, 0, return_hidden=True)
        else:
            slots = torch.arange(L, device=device)
            mask = attention_mask(slots, slots, key_valid[i:j, T - L:T], window)
            # a padding query sees only itself (never a fully masked row: NaN would spread)
            mask = mask | torch.eye(L, dtype=torch.bool, device=device)
            h = model(tokens[i:j, T - L:], positions[i:j, T - L:], mask, view, 0, return_hidden=True)
        hs.append(h[:, -1])
    h = torch.cat(hs) if len(hs) > 1 else hs[0]
    logits = F.linear(h, model.output_weight)
    if window is not None and T >= window:
        key_valid[:, :T - window + 1] = False  # slots that leave the window at the first step

    u = None if greedy else _uniforms(seeds, max_new_tokens, device)
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # live row -> batch row
    tok = sample_next(logits, None if greedy else u[:, 0], temperature, top_k, top_p)
    out[:, 0] = tok
    pos = positions[:, -1:] + 1
    stop = eos_id is not None and eos_id >= 0
    done = tok == eos_id if stop else None
    live = B
    step_fn = _compiled_step(device, compile) if compile else None
    slot_t = torch.zeros(1, dtype=torch.long, device=device)

    # on a GPU, reading `done` waits for the device: look every few steps only (a row
    # that finished in between makes a few tokens more, cut off at its eos below)
    check_every = 1 if device.type == "cpu" else 8
    for step in range(1, max_new_tokens):
        if stop and step % check_every == 0:
            n_done = int(done.sum())
            if n_done == live:
                break
            if not compile and n_done and n_done >= compact_fraction * live:
                keep = (~done).nonzero().view(-1)
                cache.keep_rows(keep)
                key_valid, pos, tok, rows, done = (key_valid[keep], pos[keep], tok[keep],
                                                   rows[keep], done[keep])
                if u is not None:
                    u = u[keep]
                live = keep.numel()
        slot = T + step - 1  # where the token fed now is written
        if window is not None and slot - window >= 0:
            key_valid[:, slot - window] = False
        if compile:
            slot_t.fill_(slot)
            logits = step_fn(model, tok[:, None], pos, slot_t, key_valid, cache)
        else:
            mask = key_valid[:, None, None, :slot + 1]
            logits = model(tok[:, None], pos, mask, cache, slot)[:, -1]
        tok = sample_next(logits, None if u is None else u[:, step], temperature, top_k, top_p)
        out[rows, step] = tok
        pos += 1
        if stop:
            done |= tok == eos_id

    result: List[List[int]] = [[] for _ in range(B)]
    for i, row in zip(perm, out.cpu().tolist()):
        if stop and eos_id in row:
            row = row[:row.index(eos_id)]
        elif -1 in row:  # all rows stopped early: unused columns
            row = row[:row.index(-1)]
        result[i] = row
    return result


def generate(model: Transformer, prompt_ids: List[List[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: Optional[int] = None, seed: Optional[int] = None, *,
             seeds: Optional[Sequence[int]] = None, batch_size: int = 32,
             compile: Union[bool, str] = False,
             on_batch: Optional[Callable[[List[int], List[List[int]]], None]] = None
             ) -> List[List[int]]:
    """New tokens for each prompt (eos excluded); temperature 0 = greedy.

    prompt_ids: token ids per prompt, any lengths (include <s> yourself, as encode_chat does).
    eos_id: a row stops when it emits this id; None = model.config.eos_token_id; -1 = never.
    seed: makes sampling reproducible; row i draws from a generator seeded with
          row_seed(seed, i). seed=None draws a seed from torch's global RNG.
    seeds: per-prompt seeds instead (generate.py passes row_seed(seed, prompt id)), so a
          prompt's sample does not depend on which other prompts share its batch.
    batch_size: prompts per batch; prompts are sorted by length (longest first) and cut
          into batches, results come back in the input order.
    compile: torch.compile the decode step (static shapes; CUDA graphs on GPU); a string
          picks the torch.compile backend. Off by default: eager is the reference.
    on_batch(indices, outputs): called after each batch with the input indices it held.
    """
    n = len(prompt_ids)
    if eos_id is None:
        eos_id = model.config.eos_token_id
    if temperature > 0 and seeds is None:
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)))
        seeds = [row_seed(seed, i) for i in range(n)]
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    order = sorted(range(n), key=lambda i: -len(prompt_ids[i]))
    results: List[Optional[List[int]]] = [None] * n
    for start in range(0, n, max(1, batch_size)):
        idx = order[start:start + batch_size]
        outs = generate_batch(model, [list(prompt_ids[i]) for i in idx], max_new_tokens,
                              temperature, top_p, top_k, eos_id,
                              None if seeds is None else [seeds[i] for i in idx], compile)
        for i, o in zip(idx, outs):
            results[i] = o
        if on_batch is not None:
            on_batch(idx, outs)
    return results
