"""The study's fixes as rules on pairs: who is chosen (the swap rule) and who gets noise.

A judge (judge.py) scores the real answer y and the generated answer y' of a pair on its
own, 0-100. Everything that follows from those two numbers lives here, once:

    margin  = score(y') - score(y)            None when either score is missing
    swap    = margin >= τ                     fix 1: y' becomes the chosen side
                                              (the study: τ = 5, and τ = 0, where ties swap)
    adaptive (fix 3, the study's future work):
        |margin| >= τ   -> the judge decides: swap = margin >= τ, no noise
        |margin| <  τ   -> keep the label, reference noise σ for this pair
        unscored        -> keep the label, noise σ (a missing score is not evidence)

A pair that has no margin is never swapped, in every mode. `apply_fixes` sets the two
fields training reads — "swap" (bool) and "noise" (σ of the reference-logit noise, 0 =
none) — on every pair for the mode asked for; with every fix off it returns the pairs
unchanged, so plain SPIN is bit for bit what it was. How the noise is drawn is noise.py's
business; how "swap" enters the loss is loss.py's (the sign of Δ).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..run.errors import UserError


def pair_margin(p: dict) -> Optional[float]:
    """score(generated) - score(real) from the pair's "scores", or None if either is missing."""
    sc = p.get("scores") or {}
    r, g = sc.get("real"), sc.get("generated")
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return g - r if ok(r) and ok(g) else None


def swaps(margin: Optional[float], threshold: float) -> bool:
    """THE swap rule: the generated answer becomes the chosen side iff margin >= τ."""
    return margin is not None and margin >= threshold


def margin_histogram(margins: Iterable[float], width: int = 10) -> Dict[str, int]:
    """Counts of margins in [-100, 100] in bins of `width`: "-10..-1", "0..9", ..., the top
    bin closed ("90..100"). Every bin is listed, empty ones with 0."""
    lo_edges = list(range(-100, 100, width))
    hist = {f"{lo}..{min(lo + width - 1, 100) if lo + width < 100 else 100}": 0 for lo in lo_edges}
    labels = list(hist)
    for m in margins:
        m = max(-100, min(100, int(m)))
        hist[labels[min((m + 100) // width, len(labels) - 1)]] += 1
    return hist


def relabel(pairs: Sequence[dict], threshold: float) -> Tuple[List[dict], dict]:
    """Pure: scored pairs -> copies with "margin" and "swap" set, and a summary (what
    judge.py writes into judged.jsonl). Re-applying another threshold needs no judge."""
    out, margins = [], []
    for p in pairs:
        m = pair_margin(p)
        out.append(dict(p, margin=m, swap=swaps(m, threshold)))
        if m is not None:
            margins.append(m)
    swapped = sum(q["swap"] for q in out)
    summary = {"pairs": len(out), "judged": len(margins), "swapped": swapped,
               "unscored": len(out) - len(margins), "threshold": threshold,
               "mean_margin": round(sum(margins) / len(margins), 3) if margins else None,
               "margin_histogram": margin_histogram(margins)}
    return out, summary


def adaptive_plan(pairs: Sequence[dict], threshold: float, sigma: float) -> Tuple[List[dict], dict]:
    """Pure: judged pairs -> copies with "swap" and "noise" set by the adaptive rule."""
    out = []
    n = {"decided": 0, "swapped": 0, "kept": 0, "noised": 0, "unscored": 0}
    for p in pairs:
        m = pair_margin(p)
        if m is not None and abs(m) >= threshold:
            q = dict(p, swap=swaps(m, threshold), noise=0.0)
            n["decided"] += 1
            n["swapped" if q["swap"] else "kept"] += 1
        else:
            q = dict(p, swap=False, noise=float(sigma))
            n["noised"] += 1
            n["unscored"] += m is None
        out.append(q)
    return out, {"pairs": len(out), "threshold": threshold, "sigma": sigma, **n}


class FixesError(UserError):
    pass


def apply_fixes(pairs: Sequence[dict], relabel_pairs: bool = False, threshold: float = 5,
                ref_sigma: float = 0.0, adaptive: bool = False, adaptive_sigma: float = 0.5
                ) -> Tuple[List[dict], dict]:
    """Pure: the pairs a training run sees, with "swap" and "noise" set for the mode.

    plain (all off)    the pairs as read (a pair's own "swap"/"noise" fields are honoured);
    relabel_pairs      swap = margin >= threshold (needs "scores"), noise 0;
    ref_sigma > 0      noise = ref_sigma on every pair (the study's "Noised" run); combines
                       with relabel;
    adaptive           adaptive_plan(threshold, adaptive_sigma) (needs "scores").
    """
    if not (relabel_pairs or adaptive or ref_sigma > 0):
        return list(pairs), {"pairs": len(pairs), "mode": "plain"}
    if (relabel_pairs or adaptive) and pairs and not any(pair_margin(p) is not None for p in pairs):
        raise FixesError("relabel/adaptive need judged pairs (\"scores\"): judge them first "
                         "(python judge.py --iter t, or --judge local|openai)")
    if adaptive:
        out, s = adaptive_plan(pairs, threshold, adaptive_sigma)
        return out, {**s, "mode": "adaptive"}
    summary: Dict[str, object] = {"pairs": len(pairs), "mode": "noise"}
    out = [dict(p, swap=False, noise=0.0) for p in pairs]
    if relabel_pairs:
        out = [dict(q, swap=swaps(pair_margin(p), threshold)) for q, p in zip(out, pairs)]
        summary.update(mode="relabel", threshold=threshold,
                       unscored=sum(pair_margin(p) is None for p in pairs))
    if ref_sigma > 0:
        out = [dict(q, noise=float(ref_sigma)) for q in out]
        summary.update(mode="relabel+noise" if relabel_pairs else "noise", sigma=ref_sigma)
    summary["swapped"] = sum(q["swap"] for q in out)
    summary["noised"] = sum(q["noise"] > 0 for q in out)
    return out, summary


def apply_recipe_fixes(pairs: Sequence[dict], recipe) -> Tuple[List[dict], dict]:
    """apply_fixes with the modes a recipe (recipe.py) asks for."""
    fx, noise = recipe.fixes, recipe.noise_settings()
    return apply_fixes(pairs, relabel_pairs=fx.relabel, threshold=fx.judge_threshold,
                       ref_sigma=noise.ref_sigma, adaptive=fx.adaptive, adaptive_sigma=fx.adaptive_sigma)
