"""One SPIN iteration, start to end: records -> pairs -> judged -> fixes -> rows -> train -> export.

    run_iteration(recipe, t, env)      θ_t -> θ_{t+1}
      1. ensure_pairs    iter<t>/pairs.jsonl: y' ~ p_θt for every SFT prompt (pairs.py),
                         sampled now if missing and the recipe says `generate`; for t >= 1
                         also iter<t-1>/pairs.jsonl, mixed in (SPIN's recipe)
      2. ensure_judged   only for relabel / adaptive: judge scores for every pair
                         (judge.py scores, fixes.relabel decides), judged now if missing
                         or out of date and the recipe names a judge backend
      3. train_iteration fixes.apply_fixes sets each pair's swap / noise, rows.tokenize_pairs
                         builds the rows, Trainer.run() trains θ_{t+1} against the frozen
                         reference θ_t and exports it

Chaining is the run layout (layout.py): θ_0 is the recipe's SFT model and θ_t, for
t >= 1, is iter<t-1>/model — the export of the previous iteration. Every step skips what
is already done (the pairs, the judged file, the reference log-probs, the checkpoints),
so re-running a command after a crash resumes it. What is done is recognised by content:
each pairs line records the fingerprint of the θ_t that sampled it, and pairs from another
θ_t (a previous iteration retrained since) are refused with the command that remakes them.

`train_settings(recipe)` is the one place a recipe becomes the trainer's TrainSettings.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import replace
from typing import Callable, List, Optional, Tuple

from . import distributed as D
from .data import read_jsonl, read_pairs, read_sft, write_json_atomic, write_jsonl_atomic
from .errors import UserError, stage
from ..study.fixes import apply_recipe_fixes, pair_margin
from .layout import (export_path, fingerprint_cache_path, iter_dir, judge_cache_path, judged_path, pairs_path,
                     summary_path, theta_path)
from .rows import tokenize_pairs, tokenize_sft
from .pairs import generate_pairs_file
from .recipe import DEFAULT_RECIPE, Recipe, as_dict
from .tokenizer import load_tokenizer
from ..core.settings import TrainSettings
from .rows import items_fingerprint
from .trainer import SFTTrainer, Trainer

Source = Tuple[str, str]  # (tag "iter<s>", pairs file)


class SetupError(UserError):
    """Something an iteration needs is missing; the message says which command makes it."""


def train_settings(recipe: Recipe) -> TrainSettings:
    """The trainer's settings: every TrainSettings field is the recipe's training key of the
    same name, plus the run's seed and noise (tests/test_trust.py checks that every training
    key of the recipe reaches it, or is declared as not the trainer's)."""
    from dataclasses import fields
    values = {f.name: getattr(recipe.training, f.name) for f in fields(TrainSettings)
              if f.name not in ("seed", "noise")}
    return TrainSettings(seed=recipe.seed, noise=recipe.noise_settings(), **values)


def check_pairs_theta(recipe: Recipe, sources: List[Source], env):
    """Pairs of the run layout were sampled from θ_s, whose fingerprint each line records
    (gen.model_sha): refuse pairs that another θ_s sampled (e.g. iteration s-1 was trained
    again since), naming the file and the command that makes them again. Rank 0 checks
    (hashing θ_0 once), the others follow."""
    problem = None
    if env.is_main:
        try:
            _check_pairs_theta(recipe, sources, env.world_size)
        except SetupError as e:
            problem = str(e)
    problem = D.broadcast_object(problem)
    if problem:
        raise SetupError(problem)


def _check_pairs_theta(recipe: Recipe, sources: List[Source], commands_world: int):
    from .checkpoint import model_fingerprint
    for tag, path in sources:
        s = int(tag[len("iter"):])
        if os.path.abspath(path) != os.path.abspath(pairs_path(recipe.run_dir, s)):
            continue  # a file given by hand: the user vouches for it
        theta = theta_path(recipe.run_dir, s, recipe.model.path)
        if not os.path.isfile(os.path.join(theta, "config.json")):
            continue
        recorded = {(rec.get("gen") or {}).get("model_sha") for rec in read_jsonl(path) if isinstance(rec, dict)}
        recorded.discard(None)  # lines from before fingerprints: not checkable
        if recorded and recorded != {model_fingerprint(theta, fingerprint_cache_path(recipe.run_dir))}:
            raise SetupError(
                f"{path}: these pairs were sampled from another θ_{s} than {theta} holds now (its "
                f"weights changed since); make them again with "
                f"`{command(recipe, 'generate.py', s, '--overwrite', world=commands_world)}`")


def command(recipe: Recipe, tool: str, t: int, *extra: str, world: int = 1) -> str:
    """The shell command that runs `tool` (train.py, generate.py, judge.py) for iteration t with
    this recipe — spelt the way this run was started: `python train.py` in a checkout, the
    console script (`minispin-train`) where the package is installed and run by that name."""
    name = tool[:-len(".py")]
    if os.path.basename(sys.argv[0]).startswith("minispin-"):
        cmd = (f"torchrun --nproc_per_node {world} -m minispin.cli.{name}" if world > 1
               else f"minispin-{name}")
    else:
        cmd = f"torchrun --nproc_per_node {world} {tool}" if world > 1 else f"python {tool}"
    cmd += f" --iter {t}"
    if recipe.source and os.path.abspath(recipe.source) != os.path.abspath(DEFAULT_RECIPE):
        cmd += f" --config {shlex.quote(recipe.source)}"
    if recipe.run_dir != os.path.join("runs", recipe.name):
        cmd += f" --run-dir {shlex.quote(recipe.run_dir)}"
    return " ".join([cmd, *extra])


@contextlib.contextmanager
def locked(run_dir: str, env):
    """One writer per run folder while the body runs (lock.py): rank 0 takes the lock and
    removes what killed writers left behind (staging folders, unfinished checkpoints); the
    other ranks wait for it, and stop with it if the folder is taken."""
    from .lock import RunLock, RunLockError, clean_orphans
    lock, err = RunLock(run_dir, rank=env.rank), None
    if env.is_main:
        try:
            lock.__enter__()
            for path in clean_orphans(run_dir):
                print(f"note: removed {path}, left by a process that no longer runs", flush=True)
        except UserError as e:
            err = str(e)
    err = D.broadcast_object(err)
    if err:
        raise RunLockError(err)
    try:
        yield
    finally:
        if env.is_main:
            lock.__exit__(None, None, None)


def model_problem(recipe: Recipe, path: str) -> str:
    """Why θ_0 cannot be loaded, naming the flag or recipe key that gave it."""
    from .hub import missing, source_of
    where = recipe.where.get("model", recipe.source)
    if not os.path.exists(path):
        return f"θ_0 = {missing('model', path, where)}"
    return f"θ_0 = {path} ({source_of('model', where)}) is not a model folder (no config.json in it)"


# ---------------------------------------------------------------------- 1. pairs
def ensure_pairs(recipe: Recipe, t: int, env, pairs_file: Optional[str] = None,
                 prev_pairs_file: Optional[str] = None, progress: bool = True,
                 log: Callable = print) -> List[Source]:
    """[(tag, pairs file)] that iteration t trains on, sampling iteration t's if needed."""
    mine = pairs_file or pairs_path(recipe.run_dir, t)
    if not os.path.isfile(mine):
        if pairs_file or not recipe.generation.generate:
            hint = "" if pairs_file else (
                f"; make them with `{command(recipe, 'generate.py', t, world=env.world_size)}`, "
                "or add --generate to this command to sample them first")
            raise SetupError(f"pairs file {mine} not found{hint}")
        log(f"pairs for iteration {t} missing: sampling them first with θ_{t}")
        with stage("generation"):
            generate_pairs_file(recipe, t, env, progress=progress)
        if not os.path.isfile(mine):
            raise SetupError(f"generation did not produce {mine}")
    sources = [(f"iter{t}", mine)]
    if t >= 1 and recipe.data.mix_previous:
        prev = prev_pairs_file or pairs_path(recipe.run_dir, t - 1)
        if not os.path.isfile(prev):
            raise SetupError(
                f"iteration {t} mixes in iteration {t - 1}'s pairs (SPIN's recipe), but {prev} is "
                f"missing; make them with `{command(recipe, 'generate.py', t - 1, world=env.world_size)}`, "
                "or pass --no-mix-previous to train on iteration t's pairs only")
        sources.append((f"iter{t - 1}", prev))
    return sources


# ---------------------------------------------------------------------- 2. judged pairs
def judged_is_current(pairs_file: str, judged_file: str) -> bool:
    """judged_file holds judge scores for exactly the pairs of pairs_file (same ids and
    texts, same order) — else it was made from other pairs and must be made again."""
    if not os.path.isfile(judged_file):
        return False
    try:
        judged = read_jsonl(judged_file)
    except UserError:
        return False
    sig = lambda ps: [(p.get("id"), p.get("prompt"), p.get("real"), p.get("generated")) for p in ps]  # noqa: E731
    return bool(judged) and "scores" in judged[0] and sig(judged) == sig(read_pairs(pairs_file))


def check_cache_path(cache_path: str, pairs_file: str, out: str):
    """The score cache is neither the pairs file nor the output, nor any file that is not a
    score cache: refused before anything touches it."""
    from ..study.judge import refuse_foreign_cache
    for other, what in ((pairs_file, "the pairs file"), (out, "the output")):
        if os.path.abspath(cache_path) == os.path.abspath(other):
            raise UserError(f"{cache_path}: the score cache is {what}; give --cache another file")
    refuse_foreign_cache(cache_path)


def judge_file(recipe: Recipe, pairs_file: str, out: str, backend, cache_path: str,
               retry_unparsable: bool = False, limit: Optional[int] = None,
               log: Callable = print, progress: bool = False) -> dict:
    """Score both answers of every pair of pairs_file (cached), apply the swap rule at the
    recipe's threshold, and write `out` (judged pairs) and judge_summary.json beside it."""
    from ..study.judge import ScoreCache, judge_pairs
    check_cache_path(cache_path, pairs_file, out)
    pairs = read_pairs(pairs_file)[:limit]
    cache = ScoreCache(cache_path)
    try:
        judged, summary = judge_pairs(pairs, backend, cache, threshold=recipe.fixes.judge_threshold, log=log,
                                      retry_unparsable=retry_unparsable, progress=progress)
    finally:
        cache.close()
    summary.update({"pairs_file": pairs_file, "output": out, "cache": cache_path,
                    "backend": backend.judge_id.split(":")[0]})
    write_jsonl_atomic(out, judged)
    write_json_atomic(os.path.join(os.path.dirname(os.path.abspath(out)), "judge_summary.json"), summary)
    return summary


def judged_target(recipe: Recipe, t: int, path: str, custom: bool) -> Optional[str]:
    """Where the judged copy of pairs file `path` lives; None for a file given by hand that
    already carries scores (it is used as it is)."""
    if custom:
        if any(pair_margin(p) is not None for p in read_pairs(path)):
            return None
        return os.path.splitext(path)[0] + ".judged.jsonl"
    return judged_path(recipe.run_dir, t)


def judging_needed(recipe: Recipe, t: int, pairs_file: Optional[str] = None,
                   prev_pairs_file: Optional[str] = None) -> bool:
    """Whether iteration t will call its judge backend: relabel or adaptive, and some pairs
    it trains on are yet to be sampled or lack a current judged file."""
    fx = recipe.fixes
    if not (fx.relabel or fx.adaptive) or fx.judge_backend == "none":
        return False
    sources = [(t, pairs_file or pairs_path(recipe.run_dir, t), bool(pairs_file))]
    if t >= 1 and recipe.data.mix_previous:
        sources.append((t - 1, prev_pairs_file or pairs_path(recipe.run_dir, t - 1), bool(prev_pairs_file)))
    for s, path, custom in sources:
        if not os.path.isfile(path):
            return True
        target = judged_target(recipe, s, path, custom)
        if target is not None and not judged_is_current(path, target):
            return True
    return False


def ensure_judged(recipe: Recipe, sources: List[Source], env, custom: Tuple[str, ...] = (),
                  log: Callable = print, progress: bool = False) -> List[Source]:
    """[(tag, pairs file)] -> [(tag, judged file)], judging what is missing or stale first
    (on rank 0; the others wait) or naming the judge.py command. Mixed-in iteration t-1
    pairs are judged too: every pair trained on goes through the same mode (the cache makes
    re-judging them free)."""
    fx = recipe.fixes
    out = []
    for tag, path in sources:
        t = int(tag[len("iter"):])
        target = judged_target(recipe, t, path, path in custom)
        if target is None:
            out.append((tag, path))
            continue
        if not judged_is_current(path, target):
            if fx.judge_backend == "none":
                what = "out of date (made from other pairs)" if os.path.isfile(target) else "missing"
                extra = (f"--pairs {shlex.quote(path)} --out {shlex.quote(target)}",) if path in custom else ()
                raise SetupError(
                    f"--{'adaptive' if fx.adaptive else 'relabel'} trains on judged pairs, but {target} "
                    f"is {what}; judge them with `{command(recipe, 'judge.py', t, *extra)}`, or add "
                    "--judge local|openai to this command to judge them first (recipe key judge_backend)")
            failure = None
            if env.is_main:
                from ..study.judge import format_summary, make_judge
                log(f"judged pairs {target} missing or out of date: judging {path} first "
                    f"({fx.judge_backend} judge)")
                try:
                    with stage("judging"):
                        s = judge_file(recipe, path, target, make_judge(recipe, fx.judge_backend, env.device),
                                       judge_cache_path(recipe.run_dir), log=log, progress=progress)
                    log(format_summary(s))
                    if s["failed"]:
                        failure = (f"{s['failed']} pairs could not be scored (requests failed after all "
                                   "retries); scores so far are cached: re-run this command to retry them")
                except UserError as e:
                    failure = str(e)
            failure = D.broadcast_object(failure)   # every rank waits here for rank 0's judge
            if failure:
                raise SetupError(f"judging {path} stopped: {failure}")
        out.append((tag, target))
    return out


# ---------------------------------------------------------------------- 3. train
def build_rows(recipe: Recipe, tok, sources: List[Source], log: Callable = print):
    """The rows training sees: each source's pairs with the fixes applied, tokenized and
    truncated. Returns (rows, per-source info, truncation stats)."""
    noise = recipe.noise_settings()
    rows, stats, per_source = [], None, {}
    for tag, path in sources:
        pairs, summary = apply_recipe_fixes(read_pairs(path), recipe)
        items, stats = tokenize_pairs(tok, pairs, tag, recipe.data.max_length,
                                      recipe.data.max_prompt_length,
                                      empty_system=recipe.model.empty_system, stats=stats,
                                      rows=recipe.data.rows)
        rows += items
        per_source[tag] = {"file": path, "pairs": len(items), "swapped": sum(p.swap for p in items),
                           "noised": sum(p.noise > 0 for p in items), "fixes": summary,
                           "sha": items_fingerprint(items)}
        if summary["mode"] != "plain":
            log(f"{tag}: {describe(summary, noise.side)}")
    if noise.neftune_alpha > 0:
        log(f"NEFTune α {noise.neftune_alpha:g} on the policy's input embeddings (training only)")
    return rows, per_source, stats


def describe(s: dict, side: str) -> str:
    if s["mode"] == "adaptive":
        return (f"adaptive (τ {s['threshold']:g}, σ {s['sigma']:g} on the {side} side): {s['swapped']} "
                f"swapped and {s['kept']} kept by the judge, {s['noised']} small-margin pairs noised "
                f"({s['unscored']} unscored) of {s['pairs']}")
    parts = []
    if "relabel" in s["mode"]:
        parts.append(f"relabel (τ {s['threshold']:g}): {s['swapped']} of {s['pairs']} pairs swapped "
                     f"({s['unscored']} unscored)")
    if "noise" in s["mode"]:
        parts.append(f"ref-logit noise σ {s['sigma']:g} on the {side} side of {s['noised']} pairs")
    return "; ".join(parts)


def run_iteration(recipe: Recipe, t: int, env, pairs_file: Optional[str] = None,
                  prev_pairs_file: Optional[str] = None, out: Optional[str] = None,
                  force: bool = False, dump_rows: Optional[str] = None, progress: bool = True,
                  log: Callable = print) -> Optional[dict]:
    """SPIN iteration t: θ_t -> θ_{t+1}. Returns the last step's metrics, or None when the
    iteration was already trained (or only its rows were dumped)."""
    theta = theta_path(recipe.run_dir, t, recipe.model.path)
    export = out or export_path(recipe.run_dir, t)
    if os.path.isfile(os.path.join(export, "config.json")) and not force and not dump_rows:
        check_same_settings(recipe, t, env, theta, export, pairs_file, prev_pairs_file)
        log(f"iteration {t} is already trained: {export} exists (pass --force to train it again)")
        return None
    if not os.path.isfile(os.path.join(theta, "config.json")):
        if t == 0:
            raise SetupError(model_problem(recipe, theta))
        raise SetupError(f"θ_{t} = {theta} does not exist: train iteration {t - 1} first "
                         f"(`{command(recipe, 'train.py', t - 1)}`)")
    from .checkpoint import check_export_target
    check_export_target(export)  # before any work: never after hours of it
    if not dump_rows:
        from .plan import activate, make_plan
        plan = activate(make_plan(recipe, t, env.world_size, pairs_file, prev_pairs_file, export,
                                  judging=judging_needed(recipe, t, pairs_file, prev_pairs_file)))
        log(plan.describe())
        if 0 < plan.pairs < recipe.training.batch_size:   # known before generating: at most num_prompts new pairs
            raise SetupError(f"iteration {t} has at most {plan.pairs} pairs, fewer than one global batch "
                             f"(batch_size {recipe.training.batch_size}); lower --batch-size or raise --num-prompts")
    sources = ensure_pairs(recipe, t, env, pairs_file, prev_pairs_file, progress, log)
    check_pairs_theta(recipe, sources, env)
    if recipe.fixes.relabel or recipe.fixes.adaptive:
        sources = ensure_judged(recipe, sources, env, tuple(p for p in (pairs_file, prev_pairs_file) if p), log,
                                progress)
    tok = load_tokenizer(theta, template=recipe.model.template)
    rows, per_source, stats = build_rows(recipe, tok, sources, log)
    log(f"iteration {t}: θ_{t} = {theta}; " + "; ".join(
        f"{tag}: {v['pairs']} pairs from {v['file']}" for tag, v in per_source.items()))
    log(f"truncation (max_length {recipe.data.max_length}, max_prompt_length "
        f"{recipe.data.max_prompt_length}): {stats.prompts} prompts, {stats.real} real and "
        f"{stats.generated} generated answers cut of {stats.pairs} pairs")
    if dump_rows:
        from .rows import dump_rows as write_rows
        if env.is_main:
            write_rows(dump_rows, rows)
            log(f"wrote {len(rows)} pairs as {2 * len(rows)} rows to {dump_rows}")
        return None
    info = {"iteration": t, "theta": theta, "sources": per_source, "truncation": stats.as_dict(),
            "fingerprints": {tag: {"file": v["file"], "sha": v["sha"]} for tag, v in per_source.items()},
            "recipe": as_dict(recipe)}
    trainer = Trainer(train_settings(recipe), env, rows, theta, iter_dir(recipe.run_dir, t), export, tok.pad_id,
                      info, progress=progress)
    return trainer.run()


def check_same_settings(recipe: Recipe, t: int, env, theta: str, export: str,
                        pairs_file: Optional[str], prev_pairs_file: Optional[str]):
    """An export of iteration t exists: refuse (exit 2, naming them) if this command's
    settings, θ_t or pairs differ from those it was trained with (resume.py). The pairs
    are compared when they are all at hand (never sampled or judged for this); else the
    settings and θ_t alone."""
    from ..core.train import resume_settings
    from .checkpoint import model_fingerprint
    from .resume import check_trained, trained_record
    record = trained_record(export)
    if record is None:   # exported before exports recorded their settings: nothing to compare
        return
    quiet = lambda *m: None  # noqa: E731
    settings = train_settings(recipe)
    if not os.path.isfile(os.path.join(theta, "config.json")):
        now = dict(resume_settings(settings, env.device), mode=Trainer.mode, theta=None)
        return check_trained(record, now, export, theta, {}, keys=set(now))
    try:
        if recipe.fixes.judge_backend != "none" and (recipe.fixes.relabel or recipe.fixes.adaptive):
            raise SetupError("judging is not done to compare settings")
        sources = ensure_pairs(replace(recipe, generation=replace(recipe.generation, generate=False)),
                               t, env, pairs_file, prev_pairs_file, False, quiet)
        if recipe.fixes.relabel or recipe.fixes.adaptive:
            sources = ensure_judged(recipe, sources, env, tuple(p for p in (pairs_file, prev_pairs_file) if p),
                                    quiet)
    except SetupError:   # pairs or judged pairs no longer there: compare the rest
        fp = model_fingerprint(theta, fingerprint_cache_path(recipe.run_dir)) if env.is_main else None
        now = dict(resume_settings(settings, env.device), mode=Trainer.mode, theta=D.broadcast_object(fp))
        return check_trained(record, now, export, theta, {}, keys=set(now))
    rows, per_source, _ = build_rows(recipe, load_tokenizer(theta, template=recipe.model.template), sources, quiet)
    info = {"fingerprints": {tag: {"file": v["file"], "sha": v["sha"]} for tag, v in per_source.items()}}
    trainer = Trainer(settings, env, rows, theta, iter_dir(recipe.run_dir, t), export, 0, info, progress=False)
    check_trained(record, trainer.resume_key(), export, theta, {tag: v["file"] for tag, v in per_source.items()})


def run_sft(recipe: Recipe, env, out: Optional[str] = None, force: bool = False,
            progress: bool = True, log: Callable = print) -> Optional[dict]:
    """Supervised fine-tuning on the recipe's real answers (the SFT baseline, θ_0)."""
    from ..core.train import resume_settings
    from .resume import check_trained, trained_record
    work = os.path.join(recipe.run_dir, "sft")
    export = out or os.path.join(work, "model")
    trained = os.path.isfile(os.path.join(export, "config.json")) and not force
    record = trained_record(export) if trained else None
    if trained and record is None:   # exported before exports recorded their settings
        log(f"SFT model already trained: {export} exists (pass --force to train it again)")
        return None
    if not os.path.isfile(os.path.join(recipe.model.path, "config.json")):
        if trained:
            now = dict(resume_settings(train_settings(recipe), env.device), mode=SFTTrainer.mode, theta=None)
            check_trained(record, now, export, recipe.model.path, {}, keys=set(now))
        raise SetupError(model_problem(recipe, recipe.model.path))
    tok = load_tokenizer(recipe.model.path, template=recipe.model.template)
    examples, rstats = read_sft(recipe.data.path, limit=recipe.training.sft_limit or None)
    items, stats = tokenize_sft(tok, examples, recipe.data.max_length, recipe.data.max_prompt_length,
                                empty_system=recipe.model.empty_system)
    if not trained:
        log(f"SFT: {len(items)} examples from {recipe.data.path} (skipped: {rstats.skipped or 'none'}); "
            f"truncated {stats.prompts} prompts and {stats.real} answers")
    info = {"data": recipe.data.path, "read": {"records": rstats.records, "skipped": rstats.skipped},
            "truncation": stats.as_dict(),
            "fingerprints": {"sft": {"file": recipe.data.path, "sha": items_fingerprint(items)}},
            "recipe": as_dict(recipe)}
    trainer = SFTTrainer(train_settings(recipe), env, items, recipe.model.path, work, export, tok.pad_id, info,
                         progress=progress)
    if trained:   # refused if trained with other settings, data or θ_0
        check_trained(record, trainer.resume_key(), export, recipe.model.path, {"sft": recipe.data.path})
        log(f"SFT model already trained: {export} exists (pass --force to train it again)")
        return None
    return trainer.run()


def summary_missing(recipe: Recipe, t: int, export: Optional[str] = None) -> bool:
    """Iteration t is trained but its summary was not written, or written without the
    diagnostics (a run stopped in its held-out check or its diagnostics): the re-run writes it."""
    if not os.path.isfile(os.path.join(export or export_path(recipe.run_dir, t), "config.json")):
        return False
    path = summary_path(recipe.run_dir, t)
    if not os.path.isfile(path):
        return True
    if not os.path.isfile(pairs_path(recipe.run_dir, t)):   # no diagnostics without the run's pairs file
        return False
    from .errors import load_json_file
    try:
        return "diagnostics" not in load_json_file(path)
    except UserError:   # unreadable: written again
        return True


def summarize(recipe: Recipe, t: int, export: Optional[str] = None, progress: bool = False) -> str:
    """Reward statistics of iteration t and, when the recipe names held-out data, θ_t vs
    θ_{t+1} on it (heldout.py); written to iter<t>/summary.json, returned as text."""
    from ..study.heldout import format_summary, iteration_summary
    ev = recipe.eval
    with stage("the held-out check"):
        summary = iteration_summary(
            iter_dir(recipe.run_dir, t), theta_path(recipe.run_dir, t, recipe.model.path),
            export or export_path(recipe.run_dir, t), ev.eval_data, ev.heldout_examples,
            template=recipe.model.template, empty_system=recipe.model.empty_system,
            max_length=recipe.data.max_length, max_prompt_length=recipe.data.max_prompt_length,
            max_new_tokens=ev.heldout_max_new_tokens, progress=progress)
    if os.path.isfile(pairs_path(recipe.run_dir, t)):   # the diagnostics (diagnostics.py), after the export
        from ..study.diagnostics import format_diagnostics, iteration_diagnostics, sample_pairs
        from .reporting import report_summary
        summary["diagnostics"] = iteration_diagnostics(recipe, t, export, progress=progress)
        write_json_atomic(os.path.join(iter_dir(recipe.run_dir, t), "summary.json"), summary)
        report_summary(recipe.training.report_to, iter_dir(recipe.run_dir, t), summary, name=f"{recipe.name}-iter{t}",
                       group=recipe.name, config=as_dict(recipe),
                       samples=sample_pairs(recipe.run_dir, t, recipe.training.beta))
        return format_summary(summary, t) + "\n" + format_diagnostics(summary["diagnostics"])
    return format_summary(summary, t)
