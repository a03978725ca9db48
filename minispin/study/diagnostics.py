"""Diagnostics of one SPIN iteration: the study's two issues as numbers (docs/diagnostics.md).

The study names two limits of SPIN: the **labeling issue** (the loss assumes the real
answer y always beats the model's own y') and the **reward-model issue** (the implicit
reward β·log p_θt+1/p_θt, learned on the model's own samples). After θ_{t+1} is exported,
`iteration_diagnostics` measures, under these keys (summary.json's "diagnostics"):

  logp_real_before, logp_generated_before   mean per-token log p_θt of the iteration's own
                                            pairs (iter<t>/pairs.jsonl), each answer's sum
                                            divided by its token count, then averaged over
                                            answers; the stored reference pass
                                            (ref_logps.jsonl) where it holds log p_θt itself
  logp_real_after, logp_generated_after     the same under θ_{t+1}: one no-grad pass
  generated_length_mean                     mean token count of y' (answer tokens + eos, as trained)
  generated_distinct_2                      unique whitespace word bigrams / all bigrams of y'
  judge_prefers_generated, judge_margin_mean  (judged pairs only) share of scored pairs with
                                            score(y') > score(y); mean of score(y') - score(y)
  reward_accuracy_heldout, reward_margin_heldout  (held-out check only) on held-out prompts:
                                            y = the real answer, y' ~ θ_t (the recipe's
                                            sampling); reward r = β·(log p_θt+1 − log p_θt);
                                            share of r(y) > r(y') and mean r(y) − r(y')
  kl_heldout                                (held-out check only) Monte Carlo KL(θ_t+1 ‖ θ_t)
                                            per token: y ~ θ_t+1 at temperature 1, no top-k/p,
                                            Σ (log p_θt+1(y) − log p_θt(y)) / Σ tokens

The log-prob and held-out keys are measured when the recipe runs the held-out check (they
load θ_t and θ_{t+1}) and keeps diagnostics = true (--no-diagnostics turns them off); the
others always. The numbers come from the pure functions below
over log-probs and texts; every log-prob
comes from loss.answer_logps, the training forward. iter<t>/pair_logps.jsonl keeps each
pair's four log-probs and token counts, for the report's implicit rewards.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..core.loss import answer_logps
from ..core.sampling import generate, row_seed
from ..run.checkpoint import load_model
from ..core.device import pick_device
from ..run.data import read_jsonl, read_pairs, read_sft, write_jsonl_atomic
from ..run.layout import export_path, iter_dir, judged_path, pairs_path, theta_path
from ..run.pairs import decode_answer
from ..run.plan import stage_bar
from ..run.rows import TokenizedPair, collate_pairs, collate_sft, tokenize_pairs, tokenize_sft
from ..run.tokenizer import load_tokenizer
from .fixes import apply_recipe_fixes, pair_margin

KEYS = ("reward_accuracy_heldout", "reward_margin_heldout", "logp_real_before", "logp_real_after",
        "logp_generated_before", "logp_generated_after", "kl_heldout", "generated_length_mean",
        "generated_distinct_2", "judge_prefers_generated", "judge_margin_mean")

# which way is better, for the stop rule; a key not listed has no direction (it describes the data)
HIGHER_IS_BETTER = {"reward_accuracy_heldout": True, "reward_margin_heldout": True,
                    "logp_real_after": True, "generated_distinct_2": True, "judge_prefers_generated": False,
                    "judge_margin_mean": False, "kl_heldout": False}


# ---------------------------------------------------------------------- pure functions
def mean_per_token(logps: Sequence[float], counts: Sequence[int]) -> float:
    """Mean over answers of log p(answer) / its token count."""
    vals = [lp / n for lp, n in zip(logps, counts) if n > 0]
    return sum(vals) / len(vals) if vals else float("nan")


def distinct_2(texts: Iterable[str]) -> float:
    """Unique whitespace-separated word bigrams over all bigrams, pooled over the texts
    (bigrams never cross from one text to the next)."""
    grams = []
    for text in texts:
        words = text.split()
        grams += list(zip(words, words[1:]))
    return len(set(grams)) / len(grams) if grams else float("nan")


def reward_stats(real_after: Sequence[float], real_before: Sequence[float], gen_after: Sequence[float],
                 gen_before: Sequence[float], beta: float) -> Tuple[float, float]:
    """(accuracy, mean margin) of the implicit reward r = β·(log p_θt+1 − log p_θt): the share
    of pairs with r(y) > r(y'), and the mean of r(y) − r(y')."""
    margins = [beta * (ra - rb) - beta * (ga - gb)
               for ra, rb, ga, gb in zip(real_after, real_before, gen_after, gen_before)]
    if not margins:
        return float("nan"), float("nan")
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def kl_per_token(logp_new: Sequence[float], logp_old: Sequence[float], counts: Sequence[int]) -> float:
    """Monte Carlo KL(new ‖ old) per token from samples of `new`: Σ(log new − log old) / Σ tokens."""
    n = sum(counts)
    return sum(a - b for a, b in zip(logp_new, logp_old)) / n if n else float("nan")


def judge_stats(pairs: Iterable[dict]) -> Optional[Dict[str, float]]:
    """judge_prefers_generated and judge_margin_mean over the pairs the judge scored both
    answers of; None when none was scored."""
    margins = [m for m in (pair_margin(p) for p in pairs) if m is not None]
    if not margins:
        return None
    return {"judge_prefers_generated": sum(m > 0 for m in margins) / len(margins),
            "judge_margin_mean": sum(margins) / len(margins)}


# ---------------------------------------------------------------------- log-probs of models
@torch.no_grad()
def pair_logps(model, items, pad_id: int, batch_size: int = 16) -> Dict[str, Tuple[float, float]]:
    """{pair key: (log p(y|x), log p(y'|x))} of TokenizedPairs, teacher-forced, no noise."""
    device = next(model.parameters()).device
    out = {}
    for i in range(0, len(items), batch_size):
        part = items[i:i + batch_size]
        batch = collate_pairs(part, pad_id)
        seen = {"attention_mask": batch["attention_mask"].to(device)} if "attention_mask" in batch else {}
        lp = answer_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device), **seen).cpu().tolist()
        for j, p in enumerate(part):
            out[p.key] = (lp[j], lp[len(part) + j])
    return out


@torch.no_grad()
def continuation_logps(model, prompts: List[List[int]], answers: List[List[int]], pad_id: int,
                       batch_size: int = 16) -> List[float]:
    """log p(answer | prompt) of token sequences, teacher-forced."""
    device = next(model.parameters()).device
    items = [TokenizedPair(str(i), p, a, []) for i, (p, a) in enumerate(zip(prompts, answers))]
    out: List[float] = []
    for i in range(0, len(items), batch_size):
        batch = collate_sft(items[i:i + batch_size], pad_id)
        out += answer_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device)).cpu().tolist()
    return out


def stored_reference(path: str) -> Dict[str, Tuple[float, float]]:
    """{key: (real, generated)} from ref_logps.jsonl, the last line of each key winning (the
    reference pass appends; a re-run after a change appends the new values)."""
    out = {}
    if os.path.isfile(path):
        for rec in read_jsonl(path):
            if isinstance(rec, dict) and "key" in rec:
                out[rec["key"]] = (float(rec["real"]), float(rec["generated"]))
    return out


def heldout_diagnostics(theta, theta_next, tok, examples, beta: float, max_length: int, max_prompt_length: int,
                        max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
                        empty_system: bool = True, rows: str = "minispin", decode: str = "minispin",
                        batch_size: int = 16, on_sampled: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """reward_accuracy_heldout, reward_margin_heldout and kl_heldout on held-out examples
    (prompts and real answers θ_t never trained on). on_sampled(n): called as each batch of n
    prompts is sampled (by θ_t, then by θ_{t+1})."""
    on_batch = (lambda idx, _: on_sampled(len(idx))) if on_sampled else None
    items, _ = tokenize_sft(tok, examples, max_length, max_prompt_length, empty_system=empty_system)
    prompts = [it.prompt for it in items]
    # y' ~ θ_t as SPIN samples it, then scored as a training pair would be
    ys = generate(theta, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  eos_id=tok.eos_ids, seeds=[row_seed(seed, ex.id) for ex in examples], batch_size=batch_size,
                  on_batch=on_batch)
    pairs = [{"id": ex.id, "prompt": ex.prompt, "real": ex.real, "generated": decode_answer(tok, y, decode)}
             for ex, y in zip(examples, ys)]
    tp, _ = tokenize_pairs(tok, pairs, "heldout", max_length, max_prompt_length, empty_system=empty_system,
                           rows=rows)
    before, after = pair_logps(theta, tp, tok.pad_id, batch_size), pair_logps(theta_next, tp, tok.pad_id, batch_size)
    keys = [p.key for p in tp]
    acc, margin = reward_stats([after[k][0] for k in keys], [before[k][0] for k in keys],
                               [after[k][1] for k in keys], [before[k][1] for k in keys], beta)
    # y ~ θ_t+1 itself (temperature 1, no truncation of the distribution), eos included when sampled
    samples = generate(theta_next, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                       eos_id=tok.eos_ids, seeds=[row_seed(seed + 1, ex.id) for ex in examples],
                       batch_size=batch_size, on_batch=on_batch)
    samples = [s + [tok.eos_id] if len(s) < max_new_tokens else s for s in samples]
    new = continuation_logps(theta_next, prompts, samples, tok.pad_id, batch_size)
    old = continuation_logps(theta, prompts, samples, tok.pad_id, batch_size)
    return {"reward_accuracy_heldout": acc, "reward_margin_heldout": margin,
            "kl_heldout": kl_per_token(new, old, [len(s) for s in samples])}


def iteration_diagnostics(recipe, t: int, export: Optional[str] = None, progress: bool = False) -> dict:
    """Every diagnostic of iteration t (module docstring), from its files and, when the
    recipe runs the held-out check (eval_data, heldout_examples > 0), from the models θ_t and
    θ_{t+1} too: the log-prob and held-out keys need both models loaded next to each other
    (on the CPU, as the held-out check does), which a 7B recipe without the check does not
    pay for, nor a recipe with diagnostics = false. Writes iter<t>/pair_logps.jsonl when the
    models are scored. progress: a bar over the held-out samples (train.py's "diagnostics" stage)."""
    d, g, ev = recipe.data, recipe.generation, recipe.eval
    work = iter_dir(recipe.run_dir, t)
    theta_dir, next_dir = theta_path(recipe.run_dir, t, recipe.model.path), export or export_path(recipe.run_dir, t)
    tok = load_tokenizer(theta_dir, template=recipe.model.template)
    pairs = read_pairs(pairs_path(recipe.run_dir, t))
    judged = judged_path(recipe.run_dir, t)
    trained = read_pairs(judged) if os.path.isfile(judged) else pairs
    sig = lambda ps: [(p["id"], p["real"], p["generated"]) for p in ps]  # noqa: E731
    if sig(trained) != sig(pairs):   # judged from other pairs: not this iteration's judging
        trained = pairs
    items, _ = tokenize_pairs(tok, pairs, f"iter{t}", d.max_length, d.max_prompt_length,
                              empty_system=recipe.model.empty_system, rows=d.rows)
    n_real, n_gen = [len(p.real) for p in items], [len(p.generated) for p in items]
    out = {"generated_length_mean": sum(n_gen) / len(n_gen) if n_gen else float("nan"),
           "generated_distinct_2": distinct_2(p["generated"] for p in pairs)}
    if trained is not pairs:
        out.update(judge_stats(trained) or {})
    if not (ev.eval_data and ev.heldout_examples > 0 and ev.diagnostics):
        return {k: out[k] for k in KEYS if k in out}
    theta, theta_next = load_model(theta_dir), load_model(next_dir)
    # before: the reference pass's values where they are fp32 log p_θt — not where it added
    # noise, nor from a bf16 pass (a GPU's), which would differ from the fp32 "after" by rounding
    noised = {p["id"] for p in apply_recipe_fixes(trained, recipe)[0] if p.get("noise")}
    tr = recipe.training
    fp32 = ((tr.mixed_precision == "fp32" or (tr.mixed_precision == "auto" and
                                               pick_device(recipe.model.device).type == "cpu"))
            and not (tr.lora_rank > 0 and tr.lora_base_dtype == "bfloat16"))
    stored = stored_reference(os.path.join(work, "ref_logps.jsonl")) if fp32 else {}
    before = {k: v for k, v in stored.items() if k.split("/", 1)[1] not in noised}
    missing = [p for p in items if p.key not in before]
    before.update(pair_logps(theta, missing, tok.pad_id) if missing else {})
    after = pair_logps(theta_next, items, tok.pad_id)
    col = lambda table, side: [table[p.key][side] for p in items]  # noqa: E731
    out.update({"logp_real_before": mean_per_token(col(before, 0), n_real),
                "logp_real_after": mean_per_token(col(after, 0), n_real),
                "logp_generated_before": mean_per_token(col(before, 1), n_gen),
                "logp_generated_after": mean_per_token(col(after, 1), n_gen)})
    examples, _ = read_sft(ev.eval_data, limit=ev.heldout_examples)
    bar = stage_bar("diagnostics", 2 * len(examples), unit="sample", leave=False) if progress else None
    out.update(heldout_diagnostics(
        theta, theta_next, tok, examples, recipe.training.beta, d.max_length, d.max_prompt_length,
        ev.heldout_max_new_tokens, g.temperature, g.top_p, g.top_k, recipe.seed,
        empty_system=recipe.model.empty_system, rows=d.rows, decode=g.decode,
        on_sampled=bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    write_jsonl_atomic(os.path.join(work, "pair_logps.jsonl"), [
        {"key": p.key, "real_tokens": len(p.real), "generated_tokens": len(p.generated),
         "real_before": before[p.key][0], "real_after": after[p.key][0],
         "generated_before": before[p.key][1], "generated_after": after[p.key][1]} for p in items])
    return {k: out[k] for k in KEYS if k in out}


def prompt_text(prompt) -> str:
    """A pairs record's prompt as text: its last user turn (or the string itself)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def sample_pairs(run_dir: str, t: int, beta: float, n: int = 3) -> List[dict]:
    """The first n pairs of iteration t for a person to read: prompt, y, y', the judge's
    scores (None when not judged) and each answer's implicit reward β·(log p_θt+1 − log p_θt)
    from pair_logps.jsonl (None when the models were not scored)."""
    work = iter_dir(run_dir, t)
    path = pairs_path(run_dir, t)
    if not os.path.isfile(path):
        return []
    pairs = read_pairs(path)[:n]
    scores = {}
    judged = judged_path(run_dir, t)
    if os.path.isfile(judged):
        scores = {p["id"]: p.get("scores") or {} for p in read_pairs(judged)}
    logps = {}
    lp_path = os.path.join(work, "pair_logps.jsonl")
    if os.path.isfile(lp_path):
        logps = {r["key"].split("/", 1)[1]: r for r in read_jsonl(lp_path) if isinstance(r, dict) and "key" in r}
    out = []
    for p in pairs:
        sc, lp = scores.get(p["id"], {}), logps.get(p["id"])
        reward = (lambda side: beta * (lp[f"{side}_after"] - lp[f"{side}_before"])) if lp else (lambda side: None)
        out.append({"id": p["id"], "prompt": prompt_text(p["prompt"]), "real": p["real"],
                    "generated": p["generated"], "score_real": sc.get("real"), "score_generated": sc.get("generated"),
                    "reward_real": reward("real"), "reward_generated": reward("generated")})
    return out


def format_diagnostics(diag: dict) -> str:
    """The printed summary's diagnostics block."""
    if not diag:
        return ""
    f = lambda k: "n/a" if k not in diag or math.isnan(diag[k]) else f"{diag[k]:.4f}"  # noqa: E731
    lines = ["  diagnostics (docs/diagnostics.md):"]
    if "logp_real_after" in diag:   # measured with the models (not under --no-diagnostics)
        lines += [f"    log p/token real       θ_t {f('logp_real_before')} -> θ_t+1 {f('logp_real_after')}",
                  f"    log p/token generated  θ_t {f('logp_generated_before')} -> θ_t+1 {f('logp_generated_after')}"]
    lines.append(f"    generated answers      {f('generated_length_mean')} tokens, distinct-2 {f('generated_distinct_2')}")
    if "judge_prefers_generated" in diag:
        lines.append(f"    judge                  prefers y' on {f('judge_prefers_generated')} of the pairs, "
                     f"mean margin {f('judge_margin_mean')}")
    if "kl_heldout" in diag:
        lines.append(f"    held-out reward        accuracy {f('reward_accuracy_heldout')}, "
                     f"margin {f('reward_margin_heldout')}; KL(θ_t+1 ‖ θ_t)/token {f('kl_heldout')}")
    return "\n".join(lines)

