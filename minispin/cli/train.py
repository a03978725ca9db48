"""minispin-train (python train.py in a checkout) — one SPIN iteration (or an SFT run), on
1 process, 8 GPUs or many nodes.

    python train.py                                    # the tiny CPU recipe, iteration 0
    torchrun --nproc_per_node 8 train.py --iter 1      # 8 processes (GPUs, or CPU/gloo)
    torchrun --nproc_per_node 8 train.py --config zephyr-7b-sft-full --iter 0 --generate
    python train.py --sft                              # SFT on the recipe's real answers
    python train.py --iter 0-3 --stop-when-worse answer_nll   # iterations 0..3, stopped when one hurts

Iteration t starts from θ_t (the recipe's SFT model for t = 0, else runs/<name>/iter<t-1>/model),
uses θ_t frozen as the reference, trains on iter<t>/pairs.jsonl (plus iter<t-1>'s for t >= 1)
and writes θ_{t+1} to iter<t>/model. Re-running the same command resumes; a finished
iteration is skipped unless --force (refused if this command's settings differ from those it
was trained with). SIGTERM / SIGUSR1 stop it after the step in flight, with a checkpoint
(minispin/run/preempt.py). The logic is minispin/run/iteration.py (docs/reading.md
walks through it); this file only reads the command line.

Settings: built-in defaults < recipe < the recipe's [iterations.<t>] (or [sft]) table < flags.
Exit status: 0 done, 1 training stopped (e.g. non-finite loss), 2 a setup, data or flag error,
143 / 138 stopped by SIGTERM / SIGUSR1 (checkpoint saved; the same command resumes).
"""
from __future__ import annotations

import argparse

from minispin.run import distributed as D
from minispin.run import recipe as R
from minispin.cli import apply_threads, prog
from minispin.cli.args import ArgumentParser, iteration_range, metric_arg, run_cli, path_arg
from minispin.run.chain import check_metric, run_chain
from minispin.run.errors import UserError
from minispin.run.iteration import locked, run_iteration, run_sft, summarize, summary_missing
from minispin.run.preempt import stoppable
from minispin.run.preflight import check_reporters, train_preflight

MODEL_KEYS = ("model", "data", "template", "empty_system", "device", "dtype", "cpu_threads",
              "dist_timeout")
DATA_KEYS = ("max_length", "max_prompt_length", "mix_previous", "rows", "num_prompts", "seed")
GEN_KEYS = ("generate", "max_new_tokens", "compile", "gen_template", "gen_bos", "decode", "shuffle_seed", "shuffle_rows")
TRAIN_KEYS = tuple(k for k, v in R.KEYS.items() if v.section == "training")
FIX_KEYS = tuple(k for k, v in R.KEYS.items() if v.section == "fixes")
EVAL_KEYS = ("heldout_examples", "diagnostics")


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=prog("minispin-train"), description="Train one SPIN iteration θ_t -> θ_{t+1} (or SFT with --sft). "
        "Run with python for one process or torchrun for many; flags override the recipe.")
    ap.add_argument("--config", type=path_arg, default=None, help="recipe: a TOML path or a name in configs/ "
                    "(default: tiny, the CPU recipe)")
    ap.add_argument("--iter", type=iteration_range, default="0", dest="iterations", metavar="T|A-B",
                    help="SPIN iteration t: start from θ_t, reference θ_t, train on iter<t> pairs (default 0); "
                    "a range A-B runs iterations A to B one after the other")
    ap.add_argument("--stop-when-worse", type=metric_arg, default=None, metavar="METRIC",
                    help="with a range: stop after the first iteration that makes METRIC worse (a held-out "
                    "metric such as answer_nll, or a diagnostic; docs/diagnostics.md) and keep the model before it")
    ap.add_argument("--sft", action="store_true", help="supervised fine-tuning (cross-entropy on the "
                    "real answers of the recipe's data) instead of SPIN; writes run_dir/sft/model")
    ap.add_argument("--run-dir", type=path_arg, default=None, help="where iterations live (default runs/<recipe name>)")
    ap.add_argument("--pairs", type=path_arg, default=None, help="train on this pairs file instead of iter<t>/pairs.jsonl")
    ap.add_argument("--prev-pairs", type=path_arg, default=None, help="iteration t-1's pairs to mix in "
                    "(default iter<t-1>/pairs.jsonl)")
    ap.add_argument("--out", type=path_arg, default=None, help="export folder (default iter<t>/model, or sft/model)")
    ap.add_argument("--force", action="store_true", help="train even if the export already exists")
    ap.add_argument("--dump-rows", type=path_arg, default=None, metavar="FILE", help="write the training rows "
                    "(one JSON line per answer: input_ids, labels, attention_mask) and exit without training")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe (the recipe, "
                    "its [iterations.<t>] or [sft] table and the flags) as TOML, and exit")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a setup error")
    R.add_flags(ap, MODEL_KEYS + DATA_KEYS + GEN_KEYS, "model, data and generation")
    R.add_flags(ap, TRAIN_KEYS, "training")
    R.add_flags(ap, FIX_KEYS, "the study's fixes (docs/fixes.md; all off by default)")
    R.add_flags(ap, EVAL_KEYS, "held-out check")
    return ap


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    flags = R.given_flags(args, MODEL_KEYS + DATA_KEYS + GEN_KEYS + TRAIN_KEYS + FIX_KEYS + EVAL_KEYS)
    its, chain = args.iterations, len(args.iterations) > 1 or args.stop_when_worse is not None
    # a run given --pairs never reads the recipe's data: its Hub id is not fetched then
    fetch = () if args.print_config else ("model", "eval_data") if args.pairs else True
    recipe = R.resolve(args.config, flags, iteration=its[0], sft=args.sft, fetch=fetch)
    if args.print_config:
        print(R.to_toml(recipe), end="")
        return 0
    one_only = [f for f, v in (("--sft", args.sft), ("--pairs", args.pairs), ("--prev-pairs", args.prev_pairs),
                               ("--out", args.out), ("--dump-rows", args.dump_rows)) if v]
    if chain and one_only:
        raise UserError(f"{one_only[0]} is for one iteration; give --iter one iteration T, not a range or "
                        "--stop-when-worse, with it")
    # a chain's every iteration resolved and checked now, not hours later when it starts
    recipes = {t: recipe if t == its[0] else R.resolve(args.config, flags, iteration=t, fetch=fetch)
               for t in its} if chain else {its[0]: recipe}
    if args.stop_when_worse:
        for t, r in recipes.items():
            try:
                check_metric(args.stop_when_worse, r)
            except UserError as e:
                raise UserError(f"iteration {t}: {e}" if len(recipes) > 1 else str(e)) from None
    for r in recipes.values():
        check_reporters(r.training.report_to)   # a reporter that cannot start: one line now, before any model loads
    apply_threads(recipe)
    env = D.init_distributed(recipe.model.device, recipe.model.dist_timeout)
    log = (lambda *m: print(*m, flush=True)) if env.is_main else (lambda *m: None)
    changed = R.format_overrides(recipe)
    if changed:
        log(changed)
    try:
        with stoppable(env, recipe.model.dist_timeout), locked(recipe.run_dir, env), train_preflight(
                recipe, env, its[0], args.sft, args.out, args.force, args.dump_rows, args.pairs,
                args.prev_pairs, log, later=[(t, recipes[t]) for t in its[1:]]):
            if args.sft:
                run_sft(recipe, env, out=args.out, force=args.force, progress=args.progress, log=log)
            elif chain:
                run_chain(recipes.__getitem__, its, env, args.stop_when_worse,
                          args.force, args.progress, log)
            else:
                trained = run_iteration(recipe, its[0], env, args.pairs, args.prev_pairs, args.out,
                                        args.force, args.dump_rows, args.progress, log) is not None
                # also a finished iteration whose summary a stopped run did not write
                finish = trained or summary_missing(recipe, its[0], args.out)
                if env.is_main and not args.dump_rows and finish:
                    print(summarize(recipe, its[0], args.out, progress=args.progress), flush=True)
        return 0
    finally:
        D.close_distributed(env)


def main(argv=None) -> int:
    """minispin-train / python train.py: run, with minispin's errors as one line (errors.run_cli)."""
    return run_cli(run, prog("minispin-train"), argv)


if __name__ == "__main__":   # python -m minispin.cli.train, or torchrun -m minispin.cli.train
    raise SystemExit(main())
