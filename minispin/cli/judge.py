"""minispin-judge (python judge.py in a checkout) — score and relabel one SPIN
iteration's pairs (fix 1; docs/fixes.md).

    python judge.py --iter 0                          # the recipe's backend
    python judge.py --iter 0 --backend local          # the recipe's SFT model as judge
    OPENAI_API_KEY=... python judge.py --iter 1 --backend openai --threshold 0

Reads runs/<name>/iter<t>/pairs.jsonl, scores the real and the generated answer of every
pair 0-100, and writes iter<t>/judged.jsonl (the pairs plus "scores", "margin", "swap") and
iter<t>/judge_summary.json. Scores are cached as they arrive in runs/<name>/judge_cache.jsonl,
so a re-run after a crash or Ctrl-C resumes without paying twice for a score that arrived (a
kill -9 can cost the requests in flight again: at most --concurrency). The API key is read from
OPENAI_API_KEY only (there is deliberately no flag for it).
Exit status: 0 done, 1 some requests failed after all retries (their pairs keep their
labels; re-run to retry only those), 2 a setup error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from minispin.run import recipe as R
from minispin.cli import apply_threads, prog
from minispin.cli.args import ArgumentParser, run_cli, path_arg, iteration_arg
from minispin.run.iteration import judge_file
from minispin.study.judge import format_summary, log_stderr, make_judge
from minispin.run.layout import judge_cache_path, judged_path, pairs_path
from minispin.run.errors import stage
from minispin.run.lock import RunLock
from minispin.run.preflight import judge_preflight

KEYS = ("judge_model", "judge_threshold", "judge_base_url", "judge_concurrency", "judge_timeout",
        "judge_max_retries", "judge_prompt", "judge_system", "judge_api_defaults",
        "device", "dtype", "cpu_threads")
FLAGS = {"judge_threshold": "--threshold", "judge_base_url": "--base-url", "judge_concurrency": "--concurrency",
         "judge_timeout": "--timeout", "judge_max_retries": "--max-retries"}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=prog("minispin-judge"), description="Score each pair's real and generated answers with a judge "
        "(0-100) and swap the pairs whose generated answer wins by >= threshold.")
    ap.add_argument("--iter", type=iteration_arg, required=True, help="SPIN iteration t: judges iter<t>/pairs.jsonl")
    ap.add_argument("--config", type=path_arg, default=None, help="recipe (TOML path or name in configs/); default tiny")
    ap.add_argument("--run-dir", type=path_arg, default=None, help="override the recipe's run_dir")
    ap.add_argument("--pairs", type=path_arg, default=None, help="input pairs file (default run_dir/iter<t>/pairs.jsonl)")
    ap.add_argument("--out", type=path_arg, default=None, help="output (default run_dir/iter<t>/judged.jsonl)")
    ap.add_argument("--cache", type=path_arg, default=None, help="score cache (default run_dir/judge_cache.jsonl)")
    ap.add_argument("--backend", choices=("openai", "local"), default=None,
                    help="openai (any OpenAI-compatible endpoint) or local (a checkpoint, by expected "
                         "score); default: the recipe's judge_backend, else openai")
    ap.add_argument("--retry-unparsable", action="store_true", help="re-ask items whose cached reply had no score")
    ap.add_argument("--limit", type=int, default=None, help="judge only the first N pairs")
    ap.add_argument("--quiet", action="store_true", help="only the summary")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar (answers scored, rate and ETA, on stderr)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a setup error")
    R.add_flags(ap, KEYS, "judge settings (each also a recipe key)", rename=FLAGS)
    return ap


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    recipe = R.resolve(args.config, R.given_flags(args, KEYS), iteration=args.iter, fetch=True)
    apply_threads(recipe)
    backend = args.backend or (recipe.fixes.judge_backend if recipe.fixes.judge_backend != "none" else "openai")
    log = (lambda msg: None) if args.quiet else log_stderr
    changed = R.format_overrides(recipe)
    if changed and not args.quiet:   # on stdout, as train.py's: stderr's error stays one line
        print(changed, flush=True)
    src = args.pairs or pairs_path(recipe.run_dir, args.iter)
    out = args.out or judged_path(recipe.run_dir, args.iter)
    cache = args.cache or judge_cache_path(recipe.run_dir)
    try:
        with RunLock(recipe.run_dir), stage("judging"):   # one writer per run folder (minispin/run/lock.py)
            judge_preflight(recipe, backend, src, out, cache, log)
            summary = judge_file(recipe, src, out, make_judge(recipe, backend), cache,
                                 retry_unparsable=args.retry_unparsable, limit=args.limit, log=log,
                                 progress=args.progress and not args.quiet)
    except KeyboardInterrupt:
        print(f"\n{prog('minispin-judge')}: interrupted; the scores so far are safe in {cache} "
              "(re-run the same command to resume)", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"wrote {out} and its judge_summary.json")
    if summary["failed"]:
        print(f"{prog('minispin-judge')}: {summary['items_failed']} answers failed after all retries; their "
              f"{summary['failed']} pairs keep their labels. Re-run to retry only those.", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """minispin-judge / python judge.py: run, with minispin's errors as one line (errors.run_cli)."""
    return run_cli(run, prog("minispin-judge"), argv)


if __name__ == "__main__":   # python -m minispin.cli.judge
    raise SystemExit(main())
