"""Several SPIN iterations in one command, and the rule that stops them: `train.py --iter 0-3
--stop-when-worse METRIC`.

Each iteration t of the range runs as `train.py --iter t` would (generate, judge when the
recipe asks, train, evaluate), so each stays resumable: re-running the command skips what is
done and reads the summaries of finished iterations. After iteration t, the metric decides:

* a held-out metric (answer_nll, format_rate, exact_match): iteration t made it worse when
  θ_{t+1}'s value is worse than θ_t's (summary.json "heldout" after vs before);
* a diagnostic (docs/diagnostics.md): when iteration t's value is worse than iteration t−1's
  (no verdict for an iteration 0, or one whose predecessor has no summary).

"Worse" is strict, in the metric's direction (METRICS). The chain then ends and keeps θ_t,
the model iteration t started from; run_dir/chain.json and iteration t's summary.json
("stop") record the metric, its values, which model was kept and why.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from ..study.diagnostics import HIGHER_IS_BETTER
from . import distributed as D
from .data import write_json_atomic
from .errors import UserError, load_json_file
from .iteration import run_iteration, summarize, summary_missing
from .layout import export_path, iter_dir, theta_path

HELDOUT_METRICS = {"answer_nll": False, "format_rate": True, "exact_match": True}
METRICS: Dict[str, bool] = {**HELDOUT_METRICS, **HIGHER_IS_BETTER}   # metric -> higher is better


def check_metric(metric: str, recipe):
    """A metric measured on held-out data needs the held-out check (eval_data, heldout_examples)."""
    held = metric in HELDOUT_METRICS or metric.endswith("_heldout") or metric.startswith("logp_")
    if held and not (recipe.eval.eval_data and recipe.eval.heldout_examples > 0):
        raise UserError(f"--stop-when-worse {metric} is measured with the held-out check, which this recipe "
                        "does not run; set eval_data and heldout_examples > 0 (--heldout-examples N)")
    if held and metric not in HELDOUT_METRICS and not recipe.eval.diagnostics:
        raise UserError(f"--stop-when-worse {metric} is a diagnostic measured with the models, which "
                        "diagnostics = false (--no-diagnostics) turns off; drop one of the two")


def values(metric: str, summary: dict) -> Tuple[Optional[float], Optional[float]]:
    """(value before, value after) of an iteration: θ_t's and θ_{t+1}'s for a held-out
    metric, (None, the iteration's value) for a diagnostic; None where it is missing."""
    if metric in HELDOUT_METRICS:
        h = summary.get("heldout") or {}
        return (h.get("before") or {}).get(metric), (h.get("after") or {}).get(metric)
    return None, (summary.get("diagnostics") or {}).get(metric)


def is_worse(metric: str, old: float, new: float) -> bool:
    return new < old if METRICS[metric] else new > old


def verdict(metric: str, t: int, summary: dict, previous: Optional[dict]) -> Optional[Tuple[float, float]]:
    """(old, new) when iteration t made the metric worse than the one before, else None."""
    before, after = values(metric, summary)
    if before is None and previous is not None:
        before = values(metric, previous)[1]
    if before is None or after is None:
        return None
    return (before, after) if is_worse(metric, before, after) else None


def record(run_dir: str, metric: str, ran: List[int], per_iter: Dict[int, Optional[float]],
           stopped: Optional[Tuple[int, float, float]], kept: str, kept_model: str) -> dict:
    """The chain's outcome as chain.json (and the stopping iteration's summary.json "stop")."""
    direction = "higher" if METRICS[metric] else "lower"
    if stopped:
        t, old, new = stopped
        reason = (f"iteration {t} made {metric} worse ({old:.4f} -> {new:.4f}; {direction} is better)")
    else:
        reason = f"no iteration of {ran[0]}-{ran[-1]} made {metric} worse ({direction} is better)"
    out = {"metric": metric, "higher_is_better": METRICS[metric], "iterations_run": ran,
           "values": {str(t): v for t, v in per_iter.items()}, "stopped_after": stopped[0] if stopped else None,
           "kept": kept, "kept_model": kept_model, "reason": reason}
    write_json_atomic(os.path.join(run_dir, "chain.json"), out, indent=2)
    if stopped:
        path = os.path.join(run_dir, f"iter{stopped[0]}", "summary.json")
        summary = load_json_file(path)
        summary["stop"] = out
        write_json_atomic(path, summary, indent=2)
    return out


def run_chain(resolve, iterations: List[int], env, metric: Optional[str] = None, force: bool = False,
              progress: bool = True, log=print) -> Optional[dict]:
    """Iterations one after the other, each as `train.py --iter t` runs it; resolve(t) is
    iteration t's recipe. With a metric, stop after the first iteration that makes it worse
    (module docstring). Returns the chain record (rank 0, with a metric), else None."""
    previous, per_iter, stopped, recipe = None, {}, None, None
    before_first = os.path.join(iter_dir(resolve(iterations[0]).run_dir, iterations[0] - 1), "summary.json")
    if iterations[0] > 0 and os.path.isfile(before_first):   # the iteration before the range, if it ran
        previous = load_json_file(before_first)
    for t in iterations:
        recipe = resolve(t)
        if metric:
            check_metric(metric, recipe)
        log(f"== SPIN iteration {t} (of {iterations[0]}-{iterations[-1]}) ==")
        trained = run_iteration(recipe, t, env, force=force, progress=progress, log=log)
        worse = None
        if env.is_main:
            path = os.path.join(iter_dir(recipe.run_dir, t), "summary.json")
            summary = None
            # done before: its summary, if it is complete and has the metric
            if trained is None and os.path.isfile(path) and not summary_missing(recipe, t):
                summary = load_json_file(path)
                if metric and values(metric, summary)[1] is None:
                    summary = None
            if summary is None:
                print(summarize(recipe, t, progress=progress), flush=True)
                summary = load_json_file(path)
            if metric:
                per_iter[t] = values(metric, summary)[1]
                worse = verdict(metric, t, summary, previous)
            previous = summary
        worse = D.broadcast_object(worse)
        if worse:
            stopped = (t, *worse)
            break
    if not metric or not env.is_main:
        return None
    if stopped:
        t = stopped[0]
        kept, kept_model = f"θ_{t}", theta_path(recipe.run_dir, t, recipe.model.path)
    else:
        kept, kept_model = f"θ_{iterations[-1] + 1}", export_path(recipe.run_dir, iterations[-1])
    out = record(recipe.run_dir, metric, [t for t in iterations if t in per_iter], per_iter, stopped, kept,
                 kept_model)
    ends = (f"the chain stops after iteration {stopped[0]}" if stopped
            else f"the chain ran iterations {iterations[0]}-{iterations[-1]}")
    log(f"stop-when-worse: {out['reason']}: {ends} and keeps {kept} = {kept_model} "
        f"({os.path.join(recipe.run_dir, 'chain.json')})")
    return out
