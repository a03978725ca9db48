"""Sampling y' ~ p_θ(·|x) with a static KV cache: batched prefill, then one token a step.

    from minispin import generate
    new_ids = generate(model, prompt_ids, max_new_tokens=256, temperature=1.0, seed=42)

A batch runs in four small steps, as gpt-fast separates them: `_left_pad` lays the
prompts out, `_prefill` runs them into the cache, `_decode` makes one token per row and
step, and `_compact` drops finished rows on the way. How, and why:
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
* Rows that emitted a stop id (eos; Llama 3 has several) are finished: their later
  tokens are cut off on output. When a quarter of the batch has finished, the batch is
  compacted (cache, masks and positions keep only the live rows), so finished rows stop
  costing work; when all are finished the loop stops. `generate` sorts prompts by length before cutting them into batches, so a
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
  (mode="reduce-overhead"). Its cache is allocated and marked static once per shape and
  reused by every later batch and call of that shape, so nothing recompiles, re-records
  or keeps old caches alive. The tests check it against the eager path and count compiles.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .model import KVCache, Transformer, slot_mask

__all__ = ["generate", "generate_batch", "sample_next", "row_seed", "filtered_probs", "stop_ids"]


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


def stop_ids(eos_id: Union[None, int, Iterable[int]]) -> Tuple[int, ...]:
    """eos_id as a tuple of stop ids: None or a negative id = never stop."""
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    return tuple(sorted({int(i) for i in ids if int(i) >= 0}))


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


# model -> {(batch, max_len, dtype, device): _StaticCache}; weak, so a model that is
# dropped takes its caches with it
_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATIC_SHAPES_KEPT = 2  # a full batch and the last, smaller one of a generate() call


def static_cache(model: Transformer, batch: int, max_len: int, dtype, device) -> _StaticCache:
    """The compiled step's cache for this shape, allocated and marked static once.

    Every batch and generate() call of the same shape reuses it (zeroed), so the compiled
    step, and on a GPU its CUDA graph, sees the same buffers and is never recompiled or
    re-recorded, and old caches are not kept alive by old graphs. Only the most recently
    used shapes are kept.
    """
    caches = _STATIC_CACHES.setdefault(model, {})
    key = (batch, max_len, dtype, str(device))
    cache = caches.pop(key, None)
    if cache is None:
        while len(caches) >= _STATIC_SHAPES_KEPT:
            caches.pop(next(iter(caches)))  # the least recently used shape
        cache = _StaticCache(model.config, batch, max_len, dtype, device)
    else:
        for t in cache.k + cache.v:  # in place: the addresses stay
            t.zero_()
    caches[key] = cache  # most recently used last
    return cache


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
    traces it (cheap: the tests use it to check the static-shape step itself), and a
    callable backend (e.g. a compile counter) is passed to torch.compile as it is."""
    backend = "inductor" if backend is True else backend
    key = (device.type, backend)
    if key not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        _COMPILED[key] = torch.compile(_decode_step, backend=backend, mode=mode, dynamic=False)
    return _COMPILED[key]


# ---------------------------------------------------------------- one batch, in four steps
def _left_pad(prompts: List[List[int]], max_len: int, device):
    """Prompts (longest first) -> tokens (B, T) left-padded with 0, each row's true RoPE
    positions (B, T) (0 on padding), and key_valid (B, max_len): the cache slots a row may
    attend to (False on its padding)."""
    B, T = len(prompts), len(prompts[0])
    tokens = torch.zeros(B, T, dtype=torch.long)
    key_valid = torch.ones(B, max_len, dtype=torch.bool)
    pad = torch.tensor([T - len(p) for p in prompts])
    for i, p in enumerate(prompts):
        tokens[i, pad[i]:] = torch.tensor(p, dtype=torch.long)
        key_valid[i, :pad[i]] = False
    positions = (torch.arange(T)[None] - pad[:, None]).clamp_min(0)
    return tokens.to(device), positions.to(device), key_valid.to(device)


def _prefill(model: Transformer, tokens, positions, key_valid, lens: List[int], cache: KVCache,
             ragged_prefill: Optional[bool]) -> torch.Tensor:
    """Run the prompts into the cache; logits (B, vocab) of each row's last token.

    Rows go in groups of similar length (see prefill_groups), each one forward written
    into its rows and slots of the batch cache. Only the last slot's hidden state meets
    the output projection: never B x T x vocab logits.
    """
    B, T = tokens.shape
    device = tokens.device
    dynamic_rope = (model.config.rope_scaling or {}).get("rope_type") == "dynamic"
    if ragged_prefill is None and not dynamic_rope:
        # one forward call, in params x tokens (measured on CPU: small GEMMs run slower too)
        overhead = 1e9 if device.type == "cpu" else 5e11
        groups = prefill_groups(lens, model.num_params(), overhead)
    elif ragged_prefill is None:  # dynamic NTK: one call, so the batch shares one length (as in transformers)
        groups = [(0, B)]
    else:
        groups = [(i, i + 1) for i in range(B)] if ragged_prefill else [(0, B)]
    last_hidden = []
    for i, j in groups:
        L = lens[i]  # the longest of the group
        view = cache if (i, j) == (0, B) else _RowView(cache, i, j, T - L)
        if lens[j - 1] == L:  # no padding: the model's own causal (+ window) mask
            h = model(tokens[i:j, T - L:], None, None, view, 0, return_hidden=True)
        else:
            slots = torch.arange(L, device=device)
            mask = slot_mask(slots, slots, key_valid[i:j, T - L:T], model.config.sliding_window)
            # a padding query sees only itself (never a fully masked row: NaN would spread)
            mask = mask | torch.eye(L, dtype=torch.bool, device=device)
            h = model(tokens[i:j, T - L:], positions[i:j, T - L:], mask, view, 0, return_hidden=True)
        last_hidden.append(h[:, -1])
    h = torch.cat(last_hidden) if len(last_hidden) > 1 else last_hidden[0]
    return F.linear(h, model.output_weight)


class _Live(NamedTuple):
    """Decode state of the rows still running, row for row; compaction filters all of it."""
    rows: torch.Tensor       # (n,) live row -> batch row
    tok: torch.Tensor        # (n,) the token fed at the next step
    pos: torch.Tensor        # (n, 1) its RoPE position
    key_valid: torch.Tensor  # (n, max_len) cache slots each row may attend to
    done: Optional[torch.Tensor]  # (n,) emitted a stop id (None: no stop ids)
    u: Optional[torch.Tensor]     # (n, steps) the row's uniforms (None: greedy)


def _compact(live: _Live, cache: KVCache) -> _Live:
    """Keep only the unfinished rows, in the cache and in every per-row tensor."""
    keep = (~live.done).nonzero().view(-1)
    cache.keep_rows(keep)
    return _Live(*(None if t is None else t[keep] for t in live))


def _decode(model: Transformer, logits, live: _Live, cache: KVCache, T: int, steps: int,
            sampling: Tuple[float, int, float], stop: Optional[torch.Tensor],
            step_fn: Optional[Callable], compact_fraction: float) -> torch.Tensor:
    """Tokens (B, steps): the first sampled from the prefill's logits, then one token per
    live row and step; -1 where the loop ended early because every row had stopped.

    step_fn: the compiled static-shape step, or None for the eager one (which reads only
    the filled part of the cache and compacts the batch as rows finish).
    """
    temperature, top_k, top_p = sampling
    window = model.config.sliding_window
    device = logits.device
    out = torch.full((live.rows.numel(), steps), -1, dtype=torch.long, device=device)
    tok = sample_next(logits, None if live.u is None else live.u[:, 0], temperature, top_k, top_p)
    out[:, 0] = tok
    live = live._replace(tok=tok, done=None if stop is None else torch.isin(tok, stop))
    if window is not None and T >= window:
        live.key_valid[:, :T - window + 1] = False  # slots that leave the window at the first step
    slot_t = torch.zeros(1, dtype=torch.long, device=device)
    # on a GPU, reading `done` waits for the device: look every few steps only (a row
    # that finished in between makes a few tokens more, cut off at its stop id later)
    check_every = 1 if device.type == "cpu" else 8
    for step in range(1, steps):
        if stop is not None and step % check_every == 0:
            n_done, n_live = int(live.done.sum()), live.rows.numel()
            if n_done == n_live:
                break
            if step_fn is None and n_done and n_done >= compact_fraction * n_live:
                live = _compact(live, cache)
        slot = T + step - 1  # where the token fed now is written
        if window is not None and slot - window >= 0:
            live.key_valid[:, slot - window] = False
        if step_fn is not None:
            slot_t.fill_(slot)
            logits = step_fn(model, live.tok[:, None], live.pos, slot_t, live.key_valid, cache)
        else:
            mask = live.key_valid[:, None, None, :slot + 1]
            logits = model(live.tok[:, None], live.pos, mask, cache, slot)[:, -1]
        tok = sample_next(logits, None if live.u is None else live.u[:, step], temperature, top_k, top_p)
        out[live.rows, step] = tok
        live.pos.add_(1)
        live = live._replace(tok=tok, done=None if stop is None else live.done | torch.isin(tok, stop))
    return out


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: List[List[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   eos_id: Union[None, int, Iterable[int]] = None,
                   seeds: Optional[Sequence[int]] = None,
                   compile: Union[bool, str, Callable] = False, compact_fraction: float = 0.25,
                   ragged_prefill: Optional[bool] = None) -> List[List[int]]:
    """One batch: the new tokens of each row (in the given order), stop id excluded.

    eos_id: a stop id or several (a row stops at the first it emits); None or -1 = never.
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
    device, dtype = _device_dtype(model)
    T = len(prompts[0])
    max_len = T + max_new_tokens
    if compile:  # the compiled step's shapes depend on the cache length: few distinct ones
        max_len = -(-max_len // 256) * 256
    tokens, positions, key_valid = _left_pad(prompts, max_len, device)
    cache = (static_cache(model, B, max_len, dtype, device) if compile
             else KVCache(model.config, B, max_len, dtype, device))
    logits = _prefill(model, tokens, positions, key_valid, [len(p) for p in prompts], cache,
                      ragged_prefill)
    stops = stop_ids(eos_id)
    # tok: a placeholder until _decode samples the first token from the prefill's logits
    live = _Live(rows=torch.arange(B, device=device), tok=tokens[:, -1], pos=positions[:, -1:] + 1,
                 key_valid=key_valid, done=None,
                 u=None if greedy else _uniforms([seeds[i] for i in perm], max_new_tokens, device))
    out = _decode(model, logits, live, cache, T, max_new_tokens, (temperature, top_k, top_p),
                  torch.tensor(stops, device=device) if stops else None,
                  _compiled_step(device, compile) if compile else None, compact_fraction)
    result: List[List[int]] = [[] for _ in range(B)]
    for i, row in zip(perm, out.cpu().tolist()):
        # cut at the first stop id, or where the loop ended (-1)
        end = next((j for j, t in enumerate(row) if t < 0 or t in stops), len(row))
        result[i] = row[:end]
    return result


def generate(model: Transformer, prompt_ids: List[List[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: Union[None, int, Iterable[int]] = None, seed: Optional[int] = None, *,
             seeds: Optional[Sequence[int]] = None, batch_size: int = 32,
             compile: Union[bool, str, Callable] = False,
             on_batch: Optional[Callable[[List[int], List[List[int]]], None]] = None
             ) -> List[List[int]]:
    """New tokens for each prompt (stop id excluded); temperature 0 = greedy.

    prompt_ids: token ids per prompt, any lengths (include <s> yourself, as encode_chat does).
    eos_id: a row stops at the first of these ids it emits: an id, or several (Llama 3's
          generation_config lists more than one); None = model.config.eos_token_ids
          (every id config.json lists); -1 = never.
    seed: makes sampling reproducible; row i draws from a generator seeded with
          row_seed(seed, i). seed=None draws a seed from torch's global RNG.
    seeds: per-prompt seeds instead (generate.py passes row_seed(seed, prompt id)), so a
          prompt's sample does not depend on which other prompts share its batch.
    batch_size: prompts per batch; prompts are sorted by length (longest first) and cut
          into batches, results come back in the input order.
    compile: torch.compile the decode step (static shapes; CUDA graphs on GPU); a string
          or callable picks the torch.compile backend. Off by default: eager is the
          reference. The step's KV cache is kept per shape and reused across batches and
          calls (see static_cache), so repeated calls neither recompile nor reallocate.
    on_batch(indices, outputs): called after each batch with the input indices it held.
    """
    n = len(prompt_ids)
    if eos_id is None:
        eos_id = model.config.eos_token_ids
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
