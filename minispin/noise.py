"""Fix 2 of the study (noise) and fix 3 (adaptive: relabel or noise, per pair).

Everything here is OFF by default (σ = 0, α = 0, no plan) and is a pure function or a
removable hook that the trainer calls; with everything off the trainer's numbers are
bit-identical to plain SPIN.

Conventions. A batch row is one answer (chosen or rejected side of a pair). "Side" names
where an answer comes FROM: "real" (y, the SFT answer) or "generated" (y' ~ p_θt), not
whether it is chosen — after a judge swap the real answer is the rejected one and still
gets the "real" noise. `side_sigmas` maps this onto chosen/rejected rows.
Log-prob tensors are aligned: logits[:, t] scores labels[:, t] (the caller shifts:
logits[:, :-1], ids[:, 1:], mask[:, 1:]); mask is 1 on answer tokens (+ their eos).

1. ref-logit noise (the study's "Noised" run: σ = 0.5 on the real answers)
   Acts on the REFERENCE model's logits, before log-softmax, at answer positions:
       log p̃_ref(y|x) = Σ_{t in answer} log softmax(z_t + ε_t)[y_t],   ε_t ~ N(0, σ² I_V)
   with σ per row (shape (B,)); rows with σ = 0 are untouched, bit for bit. The policy's
   log-probs are never noised. It makes the implicit reward log p_θ(y)/p_ref(y) less
   certain (the study's fix for the over-confident reward on the model's own samples).
   Draws are made per row, only at the row's answer positions, in order, from a
   per-row generator (`row_generators`), so a row's noise does not depend on the batch
   it lands in, its padding or the device's other rows.

   Combining with precomputed reference log-probs (train.py computes log p_ref once per
   iteration and stores it):
   * mode "frozen" (default): the generator of a row is seeded by (seed, pair id, side)
     only — not the epoch, not the step. The noised log-prob is then a fixed number per
     answer, so it can be computed in the precompute pass and stored in place of (or next
     to, keyed by σ/side/seed) the clean one; nothing else changes and the reference
     model can be freed. Frozen noise is one fixed perturbation of the reference.
   * mode "fresh": a new draw every epoch (seed, pair id, side, epoch). That needs the
     reference LOGITS every epoch, i.e. the online reference mode (the reference model
     kept and run each step, as the original SPIN code does). Storing the logits instead
     is not an option (T × V floats per answer). A trainer in precomputed mode must
     refuse "fresh" with a message saying so.

2. NEFTune (Jain et al. 2023), on the POLICY's input embeddings:
       e ← e + U(−1, 1) · α / √(L · d)     (L = padded length of the batch, d = hidden size)
   so every element of the noise lies in [−α/√(Ld), α/√(Ld)]. A forward hook on
   model.model.embed_tokens, active only when that module is in training mode AND
   autograd is on: never in eval mode, never in a no_grad pass — so never in generation
   or a reference pass, even one made with the policy's own weights. α may be a float
   or a per-row tensor (B,) set on the handle before the forward (adaptive per-pair α).

3. Adaptive plan (the study's future work), on judged pairs and a threshold τ:
       |margin| >= τ  → the judge decides: swap iff margin >= τ, no noise;
       |margin| <  τ  (or a score missing) → keep the label, noise σ for that pair
   written into the pair's "noise" field; the trainer turns it into per-row σ with
   `side_sigmas` (noise scales are per sample within one batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

SIDES = ("real", "generated", "both")
MODES = ("frozen", "fresh")
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


# ---------------------------------------------------------------- configuration
@dataclass
class NoiseConfig:
    """What train.py's flags map to. All off by default."""
    ref_sigma: float = 0.0       # σ of the reference-logit noise (0 = off)
    side: str = "real"           # which answers' reference logits get it: real | generated | both
    mode: str = "frozen"         # frozen (precompute-compatible) | fresh (online reference only)
    neftune_alpha: float = 0.0   # NEFTune α (0 = off)
    adaptive: bool = False       # per-pair σ from the adaptive plan instead of ref_sigma everywhere
    seed: int = 0

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"noise side must be one of {SIDES}, got {self.side!r}")
        if self.mode not in MODES:
            raise ValueError(f"noise mode must be one of {MODES}, got {self.mode!r}")
        if self.ref_sigma < 0 or self.neftune_alpha < 0:
            raise ValueError("noise scales must be >= 0")

    @property
    def active(self) -> bool:
        return self.ref_sigma > 0 or self.neftune_alpha > 0 or self.adaptive


def parse_noise_spec(spec: Optional[str], base: Optional[NoiseConfig] = None) -> NoiseConfig:
    """'ref-logit=0.5,side=real,mode=frozen,neftune=5,seed=1' -> NoiseConfig.

    Keys: ref-logit (σ), side, mode, neftune (α), seed. Empty/None: `base` (or all off).
    """
    cfg = dict(vars(base)) if base is not None else dict(vars(NoiseConfig()))
    names = {"ref-logit": "ref_sigma", "ref_logit": "ref_sigma", "sigma": "ref_sigma",
             "side": "side", "mode": "mode", "neftune": "neftune_alpha", "seed": "seed"}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--noise: expected key=value, got {part!r} (keys: {', '.join(sorted(set(names)))})")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in names:
            raise ValueError(f"--noise: unknown key {k!r} (keys: ref-logit, side, mode, neftune, seed)")
        field = names[k]
        cfg[field] = v if field in ("side", "mode") else (int(v) if field == "seed" else float(v))
    return NoiseConfig(**cfg)


# ---------------------------------------------------------------- 1. ref-logit noise
def _seed_of(*parts) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def pair_generator(seed: int, pair_id: str, side: str, epoch: Optional[int] = None,
                   device="cpu") -> torch.Generator:
    """The generator of one answer's noise: seeded by (seed, pair id, side[, epoch]).

    epoch=None is the "frozen" draw (the same every epoch: precompute-compatible);
    an epoch number gives "fresh" noise (online reference only)."""
    g = torch.Generator(device=device)
    g.manual_seed(_seed_of("minispin-ref-noise", seed, pair_id, side, "frozen" if epoch is None else epoch))
    return g


def row_generators(pair_ids: Sequence[str], sides: Sequence[str], seed: int = 0,
                   epoch: Optional[int] = None, device="cpu") -> List[torch.Generator]:
    """One generator per batch row (`sides[i]` is "real" or "generated": the answer's origin)."""
    return [pair_generator(seed, pid, side, epoch, device) for pid, side in zip(pair_ids, sides)]


def _row_generator(generator: Generators, b: int) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return generator[b]


def _sigma_rows(sigma, B: int) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu()
    if s.dim() == 0:
        s = s.expand(B)
    if s.shape != (B,):
        raise ValueError(f"sigma must be a scalar or shape ({B},), got {tuple(s.shape)}")
    if (s < 0).any() or not torch.isfinite(s).all():
        raise ValueError("sigma must be finite and >= 0")
    return s


def add_ref_logit_noise(logits: torch.Tensor, mask: torch.Tensor, sigma, generator: Generators = None,
                        inplace: bool = False) -> torch.Tensor:
    """logits (B,T,V) + σ_b·N(0, 1) at the masked (answer) positions of each row b.

    Rows with σ_b = 0 and positions outside the mask are returned unchanged, bit for bit;
    when every σ is 0 the input tensor itself is returned. Row b's noise is a
    (n_b, V) draw from generator[b] (a list: one per row, see `row_generators`) or from
    the one shared generator (rows drawn in order). The noise is drawn in fp32 and added
    in the logits' dtype unless inplace=False, in which case the result is fp32.
    """
    B, T, V = logits.shape
    s = _sigma_rows(sigma, B)
    if not (s > 0).any():
        return logits
    out = logits if inplace else logits.float().clone()
    m = mask.bool()
    for b in range(B):
        if s[b] <= 0:
            continue
        pos = m[b].nonzero(as_tuple=True)[0]
        if pos.numel() == 0:
            continue
        g = _row_generator(generator, b)
        eps = torch.randn((pos.numel(), V), generator=g, dtype=torch.float32,
                          device=g.device if g is not None else out.device).to(out.device)
        out[b, pos] += (eps * float(s[b])).to(out.dtype)
    return out


def reference_noise_fn(seed: int, mode: str = "frozen", side: str = "real"):
    """A `Trainer.reference_noise_fn` for ref-logit noise drawn with its own seed and mode.

    Returns fn(trainer, batch) -> (per-row σ (2B,), per-row generators) for a
    [real; generated] batch, or None when no pair of the batch has σ > 0 (then no random
    number is drawn). Each pair's σ is its "noise" field (batch["noise"]), put on `side`
    by origin; row generators are `row_generators(keys, sides, seed, epoch)` with
    epoch=None for "frozen" (precompute-compatible) and trainer.epoch for "fresh" (a new
    draw each epoch: online reference only — train.py refuses it with precompute). With
    seed = the training seed and mode "frozen" this draws exactly what the trainer's
    default `reference_noise` draws.
    """
    from .loss import reference_noise_std
    if mode not in MODES:
        raise ValueError(f"noise mode must be one of {MODES}, got {mode!r}")
    if side not in SIDES:
        raise ValueError(f"noise side must be one of {SIDES}, got {side!r}")

    def fn(trainer, batch):
        if not bool((batch["noise"] > 0).any()):
            return None
        keys = list(batch["keys"])
        sides = ["real"] * len(keys) + ["generated"] * len(keys)
        epoch = int(trainer.epoch) if mode == "fresh" else None
        gens = row_generators(keys + keys, sides, seed=seed, epoch=epoch)
        return reference_noise_std(batch["noise"], side), gens
    return fn


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t mask·log softmax(logits_t)[labels_t], in fp32 (aligned tensors, see top)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask.to(tok.dtype)).sum(-1)


def noised_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                          sigma, generator: Generators = None) -> torch.Tensor:
    """(B,) noised reference log-probs: `sequence_logps(add_ref_logit_noise(...))`.

    Rows with σ = 0 equal `sequence_logps(logits, labels, mask)` bit for bit. A trainer
    with its own log-prob function gets the same guarantee by calling it on
    `add_ref_logit_noise(logits, mask, sigma, generator)`.
    """
    return sequence_logps(add_ref_logit_noise(logits, mask, sigma, generator), labels, mask)


def side_sigmas(pairs: Sequence[dict], cfg: NoiseConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row σ of a batch of pairs: (σ_chosen (B,), σ_rejected (B,)).

    Each pair's σ is its "noise" field under cfg.adaptive (missing = 0), else cfg.ref_sigma.
    It goes to the answer(s) whose ORIGIN is cfg.side; a swapped pair ("swap": true) has its
    generated answer as the chosen row.
    """
    chosen, rejected = [], []
    for p in pairs:
        s = float(p.get("noise") or 0.0) if cfg.adaptive else cfg.ref_sigma
        real = s if cfg.side in ("real", "both") else 0.0
        gen = s if cfg.side in ("generated", "both") else 0.0
        if p.get("swap"):
            chosen.append(gen)
            rejected.append(real)
        else:
            chosen.append(real)
            rejected.append(gen)
    return torch.tensor(chosen, dtype=torch.float32), torch.tensor(rejected, dtype=torch.float32)


def side_names(pairs: Sequence[dict]) -> Tuple[List[str], List[str]]:
    """The origin ("real"/"generated") of the chosen and of the rejected row of each pair
    — the `sides` argument of `row_generators`."""
    ch = ["generated" if p.get("swap") else "real" for p in pairs]
    rj = ["real" if p.get("swap") else "generated" for p in pairs]
    return ch, rj


# ---------------------------------------------------------------- 2. NEFTune
class NEFTuneHandle:
    """Returned by `add_neftune`. `alpha` may be changed between forwards (float or a (B,)
    tensor); `remove()` takes the hook off; `paused()` is a context with no noise."""

    def __init__(self, module: nn.Module, alpha, generator: Optional[torch.Generator]):
        self.module, self.alpha, self.generator = module, alpha, generator
        self._paused = False
        self._hook = module.register_forward_hook(self._hook_fn)
        self.last_bound: Optional[float] = None  # α/√(L·d) of the last noised forward (max over rows)

    def _hook_fn(self, module, inputs, output):
        if self._paused or not module.training or not torch.is_grad_enabled():
            return None
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            a = alpha.to(device=output.device, dtype=torch.float32)
            if a.dim() == 0:
                a = a.expand(output.shape[0])
            if a.shape != (output.shape[0],):
                raise ValueError(f"NEFTune alpha has shape {tuple(a.shape)}, batch is {output.shape[0]}")
            if not (a > 0).any():
                return None
        else:
            if not alpha or alpha <= 0:
                return None
            a = None
        L, d = output.shape[-2], output.shape[-1]
        scale = 1.0 / math.sqrt(L * d)
        u = torch.rand(output.shape, generator=self.generator, dtype=torch.float32,
                       device=self.generator.device if self.generator is not None else output.device)
        u = u.to(output.device) * 2 - 1
        if a is None:
            noise = u * (float(alpha) * scale)
            self.last_bound = float(alpha) * scale
        else:
            noise = u * (a * scale).view(-1, *([1] * (output.dim() - 1)))
            self.last_bound = float(a.max()) * scale
        return output + noise.to(output.dtype)

    def remove(self):
        self._hook.remove()

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def add_neftune(model: nn.Module, alpha, generator: Optional[torch.Generator] = None) -> NEFTuneHandle:
    """NEFTune on model.model.embed_tokens (see the module docstring); returns the handle."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None:
        raise ValueError("add_neftune: the model has no model.embed_tokens")
    if not isinstance(alpha, torch.Tensor) and alpha < 0:
        raise ValueError("NEFTune alpha must be >= 0")
    return NEFTuneHandle(embed, alpha, generator)


# ---------------------------------------------------------------- 3. adaptive plan
def pair_margin(p: dict) -> Optional[float]:
    """The pair's judge margin (its "margin", else from its "scores"), None if unscored."""
    m = p.get("margin")
    if isinstance(m, (int, float)) and not isinstance(m, bool):
        return m
    sc = p.get("scores") or {}
    r, g = sc.get("real"), sc.get("generated")
    if isinstance(r, (int, float)) and isinstance(g, (int, float)):
        return g - r
    return None


def adaptive_plan(pairs: Sequence[dict], threshold: float = 5, sigma: float = 0.5) -> Tuple[List[dict], dict]:
    """Pure: judged pairs -> copies with "swap" and "noise" set, plus a summary.

    |margin| >= threshold: swap = margin >= threshold, noise = 0.0 (the judge decides);
    otherwise (small margin, or no margin): swap = False, noise = sigma.
    """
    if sigma < 0:
        raise ValueError("adaptive sigma must be >= 0")
    out = []
    n = {"decided": 0, "swapped": 0, "kept": 0, "noised": 0, "unscored": 0}
    for p in pairs:
        q = dict(p)
        m = pair_margin(p)
        if m is not None and abs(m) >= threshold:
            q["swap"] = bool(m >= threshold)
            q["noise"] = 0.0
            n["decided"] += 1
            n["swapped" if q["swap"] else "kept"] += 1
        else:
            q["swap"] = False
            q["noise"] = float(sigma)
            n["noised"] += 1
            n["unscored"] += m is None
        out.append(q)
    summary = {"pairs": len(out), "threshold": threshold, "sigma": sigma, **n}
    return out, summary


# ---------------------------------------------------------------- the four modes, one call
def apply_fixes(pairs: Sequence[dict], relabel: bool = False, threshold: float = 5,
                ref_sigma: float = 0.0, adaptive: bool = False, adaptive_sigma: float = 0.5
                ) -> Tuple[List[dict], dict]:
    """Pure: the pairs a training run sees, with "swap" and "noise" set for the mode.

    plain (all off)      swap False, noise 0 on every pair — plain SPIN even when reading a
                         judged file;
    relabel=True         swap iff margin >= threshold (judge.relabel; needs "scores");
    ref_sigma > 0        noise = ref_sigma on every pair (the study's "Noised" run: the
                         trainer puts it on the side it is told, the study used "real");
                         combines with relabel;
    adaptive=True        adaptive_plan(threshold, adaptive_sigma) (needs "scores"); relabel
                         is implied, ref_sigma must stay 0.
    Scores missing on EVERY pair while a judge mode is asked for is an error (judge first).
    """
    from .judge import relabel as judge_relabel
    if adaptive and ref_sigma > 0:
        raise ValueError("adaptive mode sets the noise per pair; do not also give a global ref-logit σ")
    if ref_sigma < 0:
        raise ValueError("ref-logit σ must be >= 0")
    if (relabel or adaptive) and pairs and not any(pair_margin(p) is not None for p in pairs):
        raise ValueError("relabel/adaptive need judged pairs (\"scores\"): run "
                         "`python judge.py --iter t` and train on iter<t>/judged.jsonl")
    base = []
    for p in pairs:
        q = dict(p)
        q["swap"], q["noise"] = False, 0.0
        base.append(q)
    summary: Dict[str, object] = {"pairs": len(base), "mode": "plain"}
    if adaptive:
        # the plan needs the margins; the original swap is not an input
        out, s = adaptive_plan([dict(q, margin=pair_margin(p)) for q, p in zip(base, pairs)],
                               threshold, adaptive_sigma)
        return out, {**s, "mode": "adaptive"}
    if relabel:
        scored = [dict(q, margin=None) for q in base]  # margins recomputed from scores
        base, s = judge_relabel(scored, threshold)
        summary.update(mode="relabel", swapped=s["swapped"], unscored=s["unscored"], threshold=threshold)
    if ref_sigma > 0:
        for q in base:
            q["noise"] = float(ref_sigma)
        summary.update(mode=(summary["mode"] + "+noise") if relabel else "noise", noised=len(base),
                       sigma=ref_sigma)
    return base, summary
