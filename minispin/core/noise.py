"""The noise of the study's fix 2, drawn: on the reference's logits, or NEFTune on the policy.

This module only draws. Which pairs get noise, and how much, is decided by fixes.py (a
pair's "noise" σ); noised_sequence_logps adds the draw to the fp32 logits of the answer
positions before the log-softmax, a wrapper of loss.sequence_logps. With no noise asked for, nothing here is
called and not one random number is drawn: plain SPIN stays bit for bit.

1. Reference-logit noise (the study's "Noised" run: σ = 0.5 on the real answers):
       log p̃_ref(y|x) = Σ_{t in answer} log softmax(z_t + ε_t)[y_t],   ε_t ~ N(0, σ² I_V)
   It makes the implicit reward log p_θ(y)/p_ref(y) less certain. The policy is never
   noised. "Side" names where an answer comes FROM — "real" (y) or "generated" (y') — not
   whether it is chosen: after a judge swap the real answer is the rejected one and still
   gets the "real" noise.
   Every answer row draws from its own generator, seeded by (seed, pair key, side, draw),
   so a row's noise does not depend on the batch it lands in, its padding or the process
   that computes it:
   * mode "frozen": draw = None. One fixed draw per answer for the whole iteration, so
     the precomputed reference pass can store the noised log-probs;
   * mode "fresh": draw = the optimizer step. A new draw at every step, as the study drew
     it (torch.normal on every reference forward), and a resumed run draws exactly what an
     uninterrupted one would. It needs the reference logits at every step (ref_mode online).

2. NEFTune (Jain et al. 2023), on the POLICY's input embeddings:
       e <- e + U(-1, 1) · α / sqrt(L · d)      (L = padded length, d = hidden size)
   A forward hook on model.model.embed_tokens, active only in training mode with autograd
   on: never in generation, eval, or a reference pass (even one made with the policy's own
   weights). It draws from the trainer's per-rank generator, which checkpoints save.
"""
from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .loss import answer_counts, answer_logits, answer_row_ids, answer_rows, sequence_logps

SIDES = ("real", "generated", "both")


# ---------------------------------------------------------------- 1. reference-logit noise
def _seed_of(*parts) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def answer_generator(seed: int, key: str, side: str, draw: Optional[int] = None) -> torch.Generator:
    """The generator of one answer's noise: seeded by (seed, pair key, side[, draw])."""
    g = torch.Generator()
    g.manual_seed(_seed_of("minispin-ref-noise", seed, key, side, "frozen" if draw is None else draw))
    return g


def reference_noise(keys: Sequence[str], pair_sigma: torch.Tensor, side: str, seed: int,
                    draw: Optional[int] = None) -> Optional[Tuple[torch.Tensor, List[torch.Generator]]]:
    """For a [real; generated] batch of B pairs: (σ per row (2B,), one generator per row),
    or None when no pair has σ > 0 (then nothing is drawn at all).

    pair_sigma (B,) is each pair's σ; it goes to the rows whose origin is `side`."""
    if side not in SIDES:
        raise ValueError(f"noise side must be one of {SIDES}, got {side!r}")
    if not bool((pair_sigma > 0).any()):
        return None
    zero = torch.zeros_like(pair_sigma)
    sigma = torch.cat([pair_sigma if side in ("real", "both") else zero,
                       pair_sigma if side in ("generated", "both") else zero])
    keys = list(keys)
    origins = ["real"] * len(keys) + ["generated"] * len(keys)
    return sigma, [answer_generator(seed, k, o, draw) for k, o in zip(keys + keys, origins)]


def noised_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                          noise_std: torch.Tensor,
                          generator: Union[None, torch.Generator, Sequence[torch.Generator]],
                          row_ids: Optional[torch.Tensor] = None, n_rows: Optional[int] = None) -> torch.Tensor:
    """loss.sequence_logps with the study's reference noise: N(0, σ_b²) on row b's fp32
    logits at its answer positions, before the log-softmax, as one (n_b, V) draw from the
    row's own generator (or one shared generator). Rows with σ = 0 draw nothing and equal
    sequence_logps bit for bit. row_ids / n_rows: a packed batch's rows (packing.py), whose
    positions are gathered in their order, so each row gets the same draw as padded."""
    x = answer_rows(logits, loss_mask)
    if x is logits:
        x = x.clone()                                    # the noise is added in place
    std = torch.as_tensor(noise_std, dtype=torch.float32).detach().cpu().tolist()
    counts = answer_counts(loss_mask, row_ids, n_rows).tolist()
    # row b's answer positions: the slice [start, start + n), or when packed order[start:start + n]
    order = None if row_ids is None else torch.argsort(answer_row_ids(loss_mask, row_ids), stable=True)
    start = 0
    for b, n in enumerate(counts):
        if std[b] > 0 and n:
            g = generator[b] if isinstance(generator, (list, tuple)) else generator
            eps = torch.randn((n, x.shape[1]), generator=g, dtype=torch.float32,
                              device=g.device if g is not None else x.device)
            at = slice(start, start + n) if order is None else order[start:start + n].to(x.device)
            x[at] += eps.to(device=x.device, dtype=x.dtype) * std[b]
        start += n
    return sequence_logps(x, input_ids, loss_mask, row_ids, n_rows)


def noised_answer_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, noise_std: torch.Tensor,
                        generator: Sequence[torch.Generator], fp32_logits: bool = True,
                        row_ids: Optional[torch.Tensor] = None, n_rows: Optional[int] = None,
                        **model_kw) -> torch.Tensor:
    """loss.answer_logps with the reference noise (noised_sequence_logps)."""
    logits = answer_logits(model, input_ids, loss_mask, fp32_logits, **model_kw)
    return noised_sequence_logps(logits, input_ids, loss_mask, noise_std, generator, row_ids, n_rows)


# ---------------------------------------------------------------- 2. NEFTune
class NEFTuneHandle:
    """Returned by `add_neftune`; `remove()` takes the hook off."""

    def __init__(self, module: nn.Module, alpha: float, generator: Optional[torch.Generator]):
        self.alpha, self.generator = float(alpha), generator
        self.last_bound: Optional[float] = None  # α/sqrt(L·d) of the last noised forward
        self._hook = module.register_forward_hook(self._hook_fn)

    def _hook_fn(self, module, inputs, output):
        if not module.training or not torch.is_grad_enabled() or self.alpha <= 0:
            return None
        L, d = output.shape[-2], output.shape[-1]
        self.last_bound = self.alpha / math.sqrt(L * d)
        u = torch.rand(output.shape, generator=self.generator, dtype=torch.float32,
                       device=self.generator.device if self.generator is not None else output.device)
        return output + ((u.to(output.device) * 2 - 1) * self.last_bound).to(output.dtype)

    def remove(self):
        self._hook.remove()


def add_neftune(model: nn.Module, alpha: float, generator: Optional[torch.Generator] = None) -> NEFTuneHandle:
    """NEFTune on model.model.embed_tokens (see the module docstring); returns the handle."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None:
        raise ValueError("add_neftune: the model has no model.embed_tokens")
    if alpha < 0:
        raise ValueError("NEFTune alpha must be >= 0")
    return NEFTuneHandle(embed, alpha, generator)
