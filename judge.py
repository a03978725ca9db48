"""Judge and relabel one SPIN iteration's pairs (fix 1; see docs/fixes.md).

    python judge.py --iter 0                         # recipe's backend (default: OpenAI)
    python judge.py --iter 0 --backend local          # the recipe's SFT model as judge
    OPENAI_API_KEY=... python judge.py --iter 1 --threshold 0

Reads runs/<name>/iter<t>/pairs.jsonl, scores the real and the generated answer of every
pair 0-100, and writes iter<t>/judged.jsonl (the pairs plus "scores", "margin", "swap";
written atomically) and iter<t>/judge_summary.json. Scores are cached as they arrive in
runs/<name>/judge_cache.jsonl, so a re-run after a crash or Ctrl-C resumes without
paying twice. Exit status: 0 done, 1 some requests failed after all retries (their pairs
keep their labels; re-run to retry only those), 2 a setup error, 130 interrupted.

Recipe keys (all optional): judge_backend ("openai" | "local"), judge_model,
judge_threshold, judge_concurrency, judge_timeout, judge_max_retries, judge_base_url.
The API key is read from OPENAI_API_KEY only (there is deliberately no flag for it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from minispin.data import DataError, read_pairs, write_jsonl_atomic
from minispin.judge import (DEFAULT_MODEL, DEFAULT_THRESHOLD, JudgeError, LocalJudge, OpenAIJudge,
                            ScoreCache, format_summary, judge_pairs, log_stderr)
from minispin.layout import REPO_ROOT, judged_path, load_recipe, pairs_path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Score each pair's real and generated answers with a judge (0-100) and "
                    "swap the pairs whose generated answer wins by >= threshold.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--iter", type=int, required=True, help="SPIN iteration t: judges iter<t>/pairs.jsonl")
    ap.add_argument("--config", default=None, help="recipe (TOML path or name in configs/); default tiny")
    ap.add_argument("--run-dir", default=None, help="override the recipe's run_dir")
    ap.add_argument("--pairs", default=None, help="input pairs file (default run_dir/iter<t>/pairs.jsonl)")
    ap.add_argument("--out", default=None, help="output (default run_dir/iter<t>/judged.jsonl)")
    ap.add_argument("--cache", default=None, help="score cache (default run_dir/judge_cache.jsonl)")
    ap.add_argument("--backend", choices=("openai", "local"), default=None,
                    help="recipe judge_backend, else openai")
    ap.add_argument("--judge-model", default=None,
                    help=f"openai: model name (default {DEFAULT_MODEL}); local: checkpoint folder "
                         "(default the recipe's SFT model)")
    ap.add_argument("--threshold", type=float, default=None,
                    help=f"swap iff score(generated) - score(real) >= threshold (default {DEFAULT_THRESHOLD})")
    ap.add_argument("--base-url", default=None, help="chat-completions base URL (default $OPENAI_BASE_URL, "
                    "else https://api.openai.com/v1)")
    ap.add_argument("--concurrency", type=int, default=None, help="parallel requests (default 8)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per request (default 60)")
    ap.add_argument("--max-retries", type=int, default=None, help="retries per item (default 6)")
    ap.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubled each retry")
    ap.add_argument("--retry-unparsable", action="store_true", help="re-ask items whose cached reply had no score")
    ap.add_argument("--limit", type=int, default=None, help="judge only the first N pairs")
    ap.add_argument("--device", default="cpu", help="local judge device")
    ap.add_argument("--dtype", default="float32", help="local judge dtype")
    ap.add_argument("--quiet", action="store_true", help="only the summary")
    return ap


def _resolve(path: str) -> str:
    if os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else log_stderr
    try:
        recipe = load_recipe(args.config)
        run_dir = args.run_dir or recipe["run_dir"]
        src = args.pairs or pairs_path(run_dir, args.iter)
        out = args.out or judged_path(run_dir, args.iter)
        summary_path = os.path.join(os.path.dirname(os.path.abspath(out)), "judge_summary.json")
        cache_path = args.cache or os.path.join(run_dir, "judge_cache.jsonl")
        backend_name = args.backend or recipe.get("judge_backend", "openai")
        threshold = args.threshold if args.threshold is not None else recipe.get("judge_threshold", DEFAULT_THRESHOLD)
        if float(threshold).is_integer():
            threshold = int(threshold)
        pairs = read_pairs(src)
        if args.limit is not None:
            pairs = pairs[:args.limit]
        if backend_name == "local":
            model = _resolve(args.judge_model or recipe.get("judge_model") or recipe["model"])
            backend = LocalJudge(model, device=args.device, dtype=args.dtype,
                                 template=recipe.get("template", "zephyr"),
                                 empty_system=recipe.get("empty_system", True))
        else:
            backend = OpenAIJudge(
                model=args.judge_model or recipe.get("judge_model", DEFAULT_MODEL),
                base_url=args.base_url or recipe.get("judge_base_url"),
                timeout=args.timeout or recipe.get("judge_timeout", 60.0),
                max_retries=args.max_retries if args.max_retries is not None else recipe.get("judge_max_retries", 6),
                backoff=args.backoff,
                concurrency=args.concurrency or recipe.get("judge_concurrency", 8), log=log)
    except (FileNotFoundError, DataError, JudgeError, ValueError) as e:
        print(f"judge.py: error: {e}", file=sys.stderr)
        return 2

    cache = ScoreCache(cache_path)
    try:
        judged, summary = judge_pairs(pairs, backend, cache, threshold=threshold,
                                      retry_unparsable=args.retry_unparsable, log=log)
    except KeyboardInterrupt:
        print(f"\njudge.py: interrupted; {len(cache)} scores are safe in {cache_path} "
              "(re-run the same command to resume)", file=sys.stderr)
        return 130
    except JudgeError as e:
        print(f"judge.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cache.close()
    summary.update({"backend": backend_name, "pairs_file": src, "output": out, "cache": cache_path})
    write_jsonl_atomic(out, judged)
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(tmp, summary_path)
    print(format_summary(summary))
    print(f"wrote {out} and {summary_path}")
    if summary["failed"]:
        print(f"judge.py: {summary['items_failed']} answers failed after all retries; their "
              f"{summary['failed']} pairs keep their labels. Re-run to retry only those.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
