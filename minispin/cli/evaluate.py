"""minispin-eval (python evaluate.py in a checkout) — the study's lm-eval suite on one
or more models, and one table across them.

    python evaluate.py --model runs/tiny/iter0/model --model runs/tiny/iter1/model
    python evaluate.py --model assets/models/stories260K --offline --limit 20
    python evaluate.py --model alignment-handbook/zephyr-7b-sft-full@ac6e600e   # a Hub id
    torchrun --nproc_per_node 8 evaluate.py --model runs/zephyr/iter0/model

For each model: lm-evaluation-harness with the "minispin" backend (minispin/study/evaluation.py)
on the suite — arc_challenge 25-shot, arc_easy 25, truthfulqa_mc1 0, truthfulqa_mc2 0,
winogrande 5, gsm8k 5, hellaswag 10, mmlu 5 — then one Markdown table, a row per model and
a column per task with the leaderboard metric, plus the Average. --offline runs the
"_local" copies of the tasks on the samples shipped in assets/eval (docs/evaluation.md).
Where results go: see minispin.study.evaluation.results_paths.
"""
from __future__ import annotations

import argparse
import os
import sys

from minispin.run import recipe as R
from minispin.cli import apply_threads, prog
from minispin.run.errors import UserError
from minispin.cli.args import ArgumentParser, RawDescriptionHelpFormatter, run_cli, path_arg

INSTALL_HINT = ("needs lm-evaluation-harness, an optional extra of minispin: pip install 'minispin[eval]' "
                "(in a checkout: pip install -e .[eval])")
KEYS = ("device", "dtype", "eval_bos", "cpu_threads")


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=prog("minispin-eval"), description="lm-eval suite of the SPIN study "
                                 "over minispin models", formatter_class=RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--model", type=path_arg, action="append", required=True,
                    help="HF-format model folder, or a Hugging Face Hub id ORG/NAME[@REVISION] "
                         "fetched into huggingface_hub's cache (repeat for a table across models)")
    ap.add_argument("--config", type=path_arg, default=None, help="recipe whose device/dtype settings apply (default tiny)")
    ap.add_argument("--suite", default="spin", help="task suite (default: spin)")
    ap.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks instead of the suite "
                    "(suite tasks keep their shots/metric)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="override every task's shot count")
    ap.add_argument("--limit", type=float, default=None,
                    help="documents per task (a fraction if < 1) — for quick checks, not for reporting")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    ap.add_argument("--output", type=path_arg, default=None, help="folder for results JSON and the table")
    ap.add_argument("--offline", action="store_true",
                    help="use the shipped task samples in assets/eval; never touch the network")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a setup error")
    R.add_flags(ap, KEYS, "device and tokens")
    return ap


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.offline:  # before datasets is imported: it reads these once
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    recipe = R.resolve(args.config, R.given_flags(args, KEYS))
    apply_threads(recipe)
    try:
        import lm_eval
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    from minispin.study import evaluation as E
    from minispin.run.hub import missing, resolve
    folders = [resolve(value, "model", "--model") for value in args.model]
    for value, path in zip(args.model, folders):
        if not os.path.isdir(path):
            raise UserError(missing("model", value, "--model"))
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    tasks = E.resolve_tasks(names, args.suite, args.num_fewshot)
    labels, json_paths, table_path = E.results_paths(args.model, args.output)
    if not args.offline:
        E.check_hub_reachable()   # before any model loads: without network, one line that names --offline
    rows, rank = {}, 0
    for path, label, json_path in zip(folders, labels, json_paths):
        bos = {"auto": None, "yes": True, "no": False}[recipe.eval.eval_bos]
        lm = E.MinispinLM(pretrained=path, dtype=recipe.model.dtype, device=recipe.model.device,
                          batch_size=args.batch_size, add_bos_token=bos)
        rank = lm.rank
        results = E.run_tasks(lm, tasks, offline=args.offline, limit=args.limit)
        if lm.world_size > 1:
            print(f"rank {rank}/{lm.world_size}: answered {lm.requests_done} requests", file=sys.stderr)
        del lm
        if rank == 0 and results is not None:
            E.write_text(json_path, E.results_json(results))
            print(f"{label}: lm-eval results in {json_path}")
            rows[label] = E.results_row(results, tasks)
    E.finish_distributed()
    if rank != 0:
        return 0
    table = E.markdown_table(rows)
    note = " (offline samples in assets/eval)" if args.offline else ""
    limit = f", --limit {args.limit}" if args.limit is not None else ""
    E.write_text(table_path, f"{table}\n\nlm-eval {lm_eval.__version__}{note}{limit}; backend minispin; "
                             f"<s> first: {recipe.eval.eval_bos}.\n")
    print(f"\n{table}\n\ntable written to {table_path}")
    return 0


def main(argv=None) -> int:
    """minispin-eval / python evaluate.py: run, with minispin's errors as one line (errors.run_cli)."""
    return run_cli(run, prog("minispin-eval"), argv)


if __name__ == "__main__":   # python -m minispin.cli.evaluate, or torchrun -m minispin.cli.evaluate
    raise SystemExit(main())
