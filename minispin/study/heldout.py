"""A short held-out evaluation for the tiny run: did this iteration help on unseen data?

The full benchmark suite (evaluate.py, lm-eval) says nothing about a 260K-parameter model:
every multiple-choice task sits at chance. So the laptop run measures what such a model
CAN change, on held-out SFT-style data (the recipe's `eval_data`, GSM8K test problems
for the tiny recipe), rendered with the same chat template as training:

* answer_nll   — mean negative log-likelihood per token of the real held-out answers,
                 teacher-forced (lower is better). SPIN's objective raises p_θ(y|x) of
                 real answers relative to its own samples, so this is the first number to
                 move if SPIN generalises.
* format_rate  — share of greedy answers that end the GSM8K way, "#### <number>" followed
                 by eos (higher is better): whether the model learned the answer format.
* exact_match  — share of greedy answers whose final number equals the reference's; at
                 this size expect 0 — it is there so the table has the real task's metric.

All three are computed with the model in eval mode and no noise, greedy decoding, fixed
order: the same model gives the same numbers on any machine with the same torch.
"""
from __future__ import annotations

import os
import re
from typing import Callable, List, Optional

import torch

from ..run.checkpoint import load_model, model_fingerprint
from ..run.data import SFTExample, read_jsonl, read_sft, write_json_atomic
from ..run.errors import UserError, load_json_file
from ..run.plan import current, stage_bar
from ..run.rows import collate_sft, tokenize_sft
from ..core.loss import sequence_logps
from ..core.sampling import generate

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def final_number(text: str) -> Optional[str]:
    m = _FINAL.search(text.strip())
    return m.group(1).replace(",", "") if m else None


@torch.no_grad()
def heldout_metrics(model, tok, examples: List[SFTExample], max_length: int = 512,
                    max_prompt_length: int = 256, max_new_tokens: int = 256, batch_size: int = 16,
                    empty_system: bool = True, progress: str = "",
                    on_answered: Optional[Callable[[int], None]] = None) -> dict:
    """progress: a label for a progress bar on stderr that counts examples, once while
    scoring them and again while answering them; "" = none. on_answered(n): called as each
    batch of n examples is answered (train.py's stage bar)."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items, _ = tokenize_sft(tok, examples, max_length, max_prompt_length, empty_system=empty_system)
    bar = tqdm(total=len(items), desc=f"{progress} (scoring)", unit="ex", disable=not progress, leave=False)
    nll, ntok = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = collate_sft(items[i:i + batch_size], tok.pad_id)
        ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
        nll -= float(sequence_logps(model(ids), ids, mask).sum())
        ntok += int(mask[:, 1:].sum())
        bar.update(len(ids))
    bar.refresh()  # the scoring count as it ended, before the bar starts over for answering
    bar.set_description(f"{progress} (answering)", refresh=False)
    bar.reset()
    prompts = [it.prompt for it in items]

    def answered(idx, _):
        bar.update(len(idx))
        if on_answered is not None:
            on_answered(len(idx))
    outs = generate(model, prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_ids,
                    batch_size=batch_size, on_batch=answered)
    bar.refresh()
    bar.close()
    formatted = correct = 0
    for ex, out in zip(examples, outs):
        finished = len(out) < max_new_tokens  # stopped at eos, not at the length limit
        got = final_number(tok.decode(out))
        formatted += int(finished and got is not None)
        correct += int(got is not None and got == final_number(ex.real))
    model.train(was_training)
    n = max(len(examples), 1)
    return {"examples": len(examples), "answer_nll": nll / max(ntok, 1),
            "format_rate": formatted / n, "exact_match": correct / n}


def _mean(recs, key):
    vals = [r[key] for r in recs if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def iteration_summary(work_dir: str, theta: str, export: str, eval_data: Optional[str],
                      n_examples: int, template: str = "zephyr", empty_system: bool = True,
                      max_length: int = 512, max_prompt_length: int = 256,
                      max_new_tokens: int = 256, progress: bool = False) -> dict:
    """Training rewards of the iteration plus held-out metrics of θ_t and θ_{t+1}.

    Reads work_dir/metrics.jsonl; writes work_dir/summary.json. The "before" numbers are
    cached in work_dir/heldout_before.json, so a re-run does not recompute them.
    """
    from ..run.tokenizer import load_tokenizer

    metrics = [r for r in read_jsonl(os.path.join(work_dir, "metrics.jsonl")) if "rewards/accuracies" in r]
    tail = metrics[-max(1, len(metrics) // 4):] if metrics else []
    summary = {
        "steps": len(metrics),
        "loss_first": metrics[0]["loss"] if metrics else None,
        "loss_last_quarter": _mean(tail, "loss"),
        "rewards/accuracies_last_quarter": _mean(tail, "rewards/accuracies"),
        "rewards/margins_last_quarter": _mean(tail, "rewards/margins"),
    }
    if eval_data and n_examples > 0:
        examples, _ = read_sft(eval_data, limit=n_examples)
        kw = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_new_tokens=max_new_tokens, empty_system=empty_system)
        cache = os.path.join(work_dir, "heldout_before.json")
        before = None
        try:  # a cache that cannot be read (cut short by a crash) is made again
            saved = load_json_file(cache) if os.path.isfile(cache) else None
        except UserError:
            saved = None
        if isinstance(saved, dict):
            # θ_t by content: a model retrained at the same path is measured again
            if saved.get("theta_fingerprint") == model_fingerprint(theta) and saved.get("examples") == len(examples):
                before = saved
        models = 2 if before is None else 1
        # under train.py's plan: one bar for the stage, with the whole iteration's ETA (run/plan.py)
        bar = None
        if progress and current() is not None and current().stage("heldout") is not None:
            bar = stage_bar("heldout", len(examples) * models, unit="ex", leave=False)
            kw.update(on_answered=bar.update)
        own_bar = progress and bar is None   # outside train.py's plan: a bar per model, as before
        if before is None:
            before = heldout_metrics(load_model(theta), load_tokenizer(theta, template=template), examples, **kw,
                                     progress="held-out θ_t" if own_bar else "")
            before["theta"] = os.path.abspath(theta)
            before["theta_fingerprint"] = model_fingerprint(theta)
            write_json_atomic(cache, before, indent=2)
        after = heldout_metrics(load_model(export), load_tokenizer(export, template=template), examples, **kw,
                                progress="held-out θ_t+1" if own_bar else "")
        if bar is not None:
            bar.close()
        summary["heldout"] = {"data": eval_data, "examples": len(examples),
                              "before": {k: before[k] for k in ("answer_nll", "format_rate", "exact_match")},
                              "after": {k: after[k] for k in ("answer_nll", "format_rate", "exact_match")}}
    write_json_atomic(os.path.join(work_dir, "summary.json"), summary)  # a stopped run leaves none, never half
    return summary


def format_summary(s: dict, t: int) -> str:
    if not s["steps"] or s["loss_first"] is None:  # metrics.jsonl missing or emptied by hand
        lines = [f"SPIN iteration {t} summary", "  training: no step metrics logged (metrics.jsonl is empty)"]
    else:
        lines = [f"SPIN iteration {t} summary",
                 f"  training: {s['steps']} steps, loss {s['loss_first']:.4f} -> {s['loss_last_quarter']:.4f} "
                 f"(mean of the last quarter), reward accuracy {s['rewards/accuracies_last_quarter']:.3f}, "
                 f"reward margin {s['rewards/margins_last_quarter']:.4f}"]
    h = s.get("heldout")
    if h:
        b, a = h["before"], h["after"]
        lines.append(f"  held-out ({h['examples']} examples of {h['data']}):")
        lines.append(f"    answer NLL/token  θ_t {b['answer_nll']:.4f} -> θ_t+1 {a['answer_nll']:.4f}  (lower is better)")
        lines.append(f"    format rate       θ_t {b['format_rate']:.3f} -> θ_t+1 {a['format_rate']:.3f}")
        lines.append(f"    exact match       θ_t {b['exact_match']:.3f} -> θ_t+1 {a['exact_match']:.3f}")
    return "\n".join(lines)
