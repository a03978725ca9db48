"""Padding-free batches: the rows of a micro-batch packed side by side, and what padding costs.

`collate_pairs` right-pads the 2B rows of a micro-batch to the longest one, so every
forward multiplies padding: with real answer lengths (one long UltraChat answer next to
short generated ones) that can be most of the positions. Packing lays the rows end to end
instead, in a few sequences ("bins") no longer than the longest row, and makes the model
see each row exactly as it saw it padded:

* positions restart at 0 for every row (the model takes explicit `positions`);
* a block-diagonal causal mask: a token attends to the earlier tokens of its own row only
  (and only within the sliding window, and never to a key SPIN's attention_mask hides;
  a query left with no key at all attends to itself, as `Transformer._mask` does);
* a row id per position, so the per-row log-probs are segment sums (loss.sequence_logps
  index_adds by row id); a row's first position never counts, as in the padded layout,
  where nothing predicts it.

The bins are filled first-fit, longest row first, up to a capacity: the trainer gives the
run's longest row (at most max_length), so short rows of a micro-batch share one sequence
and only the bins' tails pad. The mask is a dense boolean tensor for SDPA (any device), or
on request a flex_attention BlockMask (block-sparse: the GPU kernel skips the blocks no
row needs, so a bin costs what its rows cost).

Pure tensor code: torch only. `layout_padding` is the measure the trainer records in
train_info.json.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch


def layout_padding(batches: Iterable[Sequence[int]], capacity: Optional[int] = None) -> dict:
    """The share of padded positions over micro-batches of row lengths: padding_fraction
    with each micro-batch padded to its longest row (collate_pairs' layout),
    padding_fraction_packed with its rows packed (pack_batch's bins of `capacity` tokens,
    default each micro-batch's longest row: only the bins' tails pad), and the token counts
    they come from."""
    tokens = padded_positions = packed_positions = 0
    for lengths in batches:
        if lengths:
            tokens += sum(lengths)
            padded_positions += max(lengths) * len(lengths)
            bins = plan_bins(lengths, capacity)
            packed_positions += len(bins) * max(sum(lengths[i] for i in b) for b in bins)
    share = lambda positions: round(1 - tokens / positions, 4) if positions else 0.0  # noqa: E731
    return {"padding_fraction": share(padded_positions), "padding_fraction_packed": share(packed_positions),
            "row_tokens": tokens, "padded_positions": padded_positions, "packed_positions": packed_positions}


def plan_bins(lengths: Sequence[int], capacity: Optional[int] = None) -> List[List[int]]:
    """Row indices per bin: first-fit, longest row first, each bin holding at most
    `capacity` tokens (default: the longest row). Ties keep the rows' order."""
    capacity = max(lengths) if capacity is None else capacity
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a bin of {capacity}")
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def packed_mask(row_ids: torch.Tensor, positions: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                window: Optional[int] = None) -> torch.Tensor:
    """Boolean SDPA mask (S, 1, L, L), True = may attend: same row, causal, within the
    window, key not hidden; a query that sees nothing then attends to itself."""
    same = row_ids[:, :, None] == row_ids[:, None, :]
    diff = positions[:, :, None] - positions[:, None, :]
    allowed = same & (diff >= 0)
    if window is not None:
        allowed = allowed & (diff < window)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    eye = torch.eye(row_ids.shape[1], dtype=torch.bool, device=row_ids.device)[None]
    allowed = allowed | (~allowed.any(-1, keepdim=True) & eye)
    return allowed[:, None]


def packed_block_mask(row_ids: torch.Tensor, positions: torch.Tensor,
                      key_valid: Optional[torch.Tensor] = None, window: Optional[int] = None):
    """The same mask as a flex_attention BlockMask (torch.nn.attention.flex_attention)."""
    from torch.nn.attention.flex_attention import create_block_mask
    dense = packed_mask(row_ids, positions, key_valid, window)[:, 0]  # (S, L, L), built once

    def mask_mod(b, h, q, k):
        return dense[b, q, k]

    S, L = row_ids.shape
    return create_block_mask(mask_mod, B=S, H=None, Q_LEN=L, KV_LEN=L, device=row_ids.device)


def pack_batch(batch: dict, window: Optional[int] = None, capacity: Optional[int] = None,
               block_mask: bool = False, device=None) -> dict:
    """A padded [real; generated] batch (collate_pairs: input_ids, loss_mask, lengths and
    maybe attention_mask) -> the same rows packed. The result keeps the pair-level fields
    and has input_ids, loss_mask, positions, attn_mask (S, L)-shaped and row_ids (-1 on the
    bins' tail padding), n_rows = the number of rows; SPIN's attention_mask goes into
    attn_mask. window: the model's sliding window, if any. device: where the packed
    tensors and the mask are built (a BlockMask does not move with .to())."""
    ids, loss_mask, lengths = batch["input_ids"], batch["loss_mask"], batch["lengths"].tolist()
    att = batch.get("attention_mask")
    bins = plan_bins(lengths, capacity)
    L = max(sum(lengths[i] for i in b) for b in bins)
    S = len(bins)
    out_ids = torch.zeros((S, L), dtype=ids.dtype)
    out_mask = torch.zeros((S, L), dtype=loss_mask.dtype)
    positions = torch.zeros((S, L), dtype=torch.long)
    row_ids = torch.full((S, L), -1, dtype=torch.long)
    key_valid = None if att is None else torch.zeros((S, L), dtype=torch.bool)
    for s, rows in enumerate(bins):
        at = 0
        for r in rows:
            n = lengths[r]
            out_ids[s, at:at + n] = ids[r, :n]
            out_mask[s, at + 1:at + n] = loss_mask[r, 1:n]   # nothing predicts a row's first token
            positions[s, at:at + n] = torch.arange(n)
            row_ids[s, at:at + n] = r
            if key_valid is not None:
                key_valid[s, at:at + n] = att[r, :n].bool()
            at += n
    if device is not None:
        out_ids, out_mask, positions, row_ids = (t.to(device) for t in (out_ids, out_mask, positions, row_ids))
        key_valid = None if key_valid is None else key_valid.to(device)
    make = packed_block_mask if block_mask else packed_mask
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "loss_mask", "attention_mask", "lengths")}
    out.update(input_ids=out_ids, loss_mask=out_mask, positions=positions, row_ids=row_ids,
               n_rows=len(lengths), attn_mask=make(row_ids, positions, key_valid, window))
    return out
