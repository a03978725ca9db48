"""CLI: the study's lm-eval suite on one or more models, and one table across them.

    python evaluate.py --model runs/tiny/iter0/model --model runs/tiny/iter1/model --suite spin
    python evaluate.py --model assets/models/stories260K --offline --limit 20
    torchrun --nproc_per_node 8 evaluate.py --model runs/zephyr/iter0/model --suite spin

For each model it runs lm-evaluation-harness with the "minispin" backend
(minispin/evaluation.py) on the suite — arc_challenge 25-shot, arc_easy 25,
truthfulqa_mc1 0, truthfulqa_mc2 0, winogrande 5, gsm8k 5, hellaswag 10, mmlu 5 — and
writes lm-eval's results JSON; then one Markdown table, a row per model and a column per
task with the leaderboard metric (acc_norm for ARC and HellaSwag, mc1/mc2 accuracy for
TruthfulQA, acc for WinoGrande and MMLU, strict exact match for GSM8K) plus the Average.
The table is printed and written next to the JSON files.

--offline runs the "_local" copies of the tasks on the small samples shipped in
assets/eval (no network; see docs/evaluation.md for how they differ from the official
tasks). Without it the official data sets are fetched from the Hugging Face hub.

Where things go: with --output DIR, DIR/<model label>/results.json and DIR/results.md.
Without it, a model at runs/<name>/iter<t>/model writes runs/<name>/iter<t>/eval/results.json
(the run layout, minispin/layout.py); the table goes to runs/<name>/eval/results.md when
all models belong to one run, else to runs/eval/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, Optional

INSTALL_HINT = ("evaluate.py needs lm-evaluation-harness, an optional extra of minispin:\n"
                "    pip install -e .[eval]")
_ITER_MODEL = re.compile(r"^(?P<run>.*)/(?P<iter>iter\d+)/model/?$")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="lm-eval suite of the SPIN study over minispin models",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", action="append", required=True,
                    help="HF-format model folder (repeat for a table across models)")
    ap.add_argument("--suite", default="spin", help="task suite (default: spin)")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval tasks instead of the suite (suite tasks keep their shots/metric)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="override every task's shot count")
    ap.add_argument("--limit", type=float, default=None,
                    help="documents per task (a fraction if < 1) — for quick checks, not for reporting")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--output", default=None, help="folder for results JSON and the table")
    ap.add_argument("--offline", action="store_true",
                    help="use the shipped task samples in assets/eval; never touch the network")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def model_label(path: str, taken: set) -> str:
    """iter<t> for a run's export, else the folder's name; made unique."""
    path = os.path.normpath(path)
    m = _ITER_MODEL.match(path.replace(os.sep, "/"))
    label = m.group("iter") if m else os.path.basename(path)
    if label in taken:
        label = path
    taken.add(label)
    return label


def output_paths(models: List[str], labels: List[str], output: Optional[str]):
    """(per-model results.json paths, table path) — see the module docstring."""
    if output:
        return [os.path.join(output, lab.replace(os.sep, "_"), "results.json") for lab in labels], \
            os.path.join(output, "results.md")
    runs, jsons = set(), []
    for path, lab in zip(models, labels):
        m = _ITER_MODEL.match(os.path.normpath(path).replace(os.sep, "/"))
        if m:
            runs.add(m.group("run"))
            jsons.append(os.path.join(m.group("run"), m.group("iter"), "eval", "results.json"))
        else:
            runs.add(None)
            jsons.append(os.path.join("runs", "eval", lab.replace(os.sep, "_"), "results.json"))
    run = runs.pop() if len(runs) == 1 else None
    table = os.path.join(run, "eval", "results.md") if run else os.path.join("runs", "eval", "results.md")
    return jsons, table


def _write(path: str, text: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _finish_distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.offline:  # before datasets is imported: it reads these once
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from minispin import evaluation as E

    for path in args.model:
        if not os.path.isdir(path):
            print(f"evaluate.py: model folder {path} not found", file=sys.stderr)
            return 2
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        tasks = E.resolve_tasks(names, args.suite, args.num_fewshot)
    except ValueError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    taken: set = set()
    labels = [model_label(p, taken) for p in args.model]
    json_paths, table_path = output_paths(args.model, labels, args.output)

    rows, rank = {}, 0
    for path, label, json_path in zip(args.model, labels, json_paths):
        lm = E.MinispinLM(pretrained=path, dtype=args.dtype, device=args.device,
                          batch_size=args.batch_size)
        rank = lm.rank
        try:
            results = E.run_tasks(lm, tasks, offline=args.offline, limit=args.limit)
        except ValueError as e:
            print(f"evaluate.py: {e}", file=sys.stderr)
            return 2
        if lm.world_size > 1:
            print(f"rank {rank}/{lm.world_size}: answered {lm.requests_done} requests", file=sys.stderr)
        del lm
        if rank != 0 or results is None:
            continue
        _write(json_path, json.dumps(results, indent=2, default=str))
        print(f"{label}: lm-eval results in {json_path}")
        rows[label] = E.results_row(results, tasks)
    _finish_distributed()
    if rank != 0:
        return 0
    table = E.markdown_table(rows)
    note = " (offline samples in assets/eval)" if args.offline else ""
    limit = f", --limit {args.limit}" if args.limit is not None else ""
    _write(table_path, f"{table}\n\nlm-eval{note}{limit}; backend minispin.\n")
    print()
    print(table)
    print(f"\ntable written to {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
