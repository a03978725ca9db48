"""What the largest fidelity switches change, measured on the tiny setting (docs/fidelity.md).

    python scripts/fidelity.py                     # runs everything, prints the table
    python scripts/fidelity.py --write             # and puts it into docs/fidelity.md

SPIN iteration 0 of the tiny recipe (configs/tiny.toml: θ_0 = assets/models/tiny-sft, 64
GSM8K prompts, 16 steps, 100 held-out problems), five times:

* minispin — our defaults: one template for generation and training (zephyr, <s>),
  sampling at temperature 1, our rows;
* SPIN's rows — the same pairs, trained on uclaml/SPIN's rows (rows = "spin": no <s>,
  each piece tokenized alone, eos hidden from attention, SPIN's truncation);
* the study's rows — the same pairs, trained on the study's rows (rows = "study": as SPIN's,
  but no system turn and each answer row holds the question again, labelled);
* SPIN's generation — pairs sampled as spin/generate.py does ("### Instruction:" prompt
  without <s>, greedy, decode-and-strip, prompts shuffled with seed 42), our rows;
* SPIN (both) — SPIN's generation and SPIN's rows.

One seed, a 260K-parameter model: differences in the third decimal are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIN_GENERATION = ["--gen-template", "instruction", "--no-gen-bos", "--temperature", "0",
                   "--decode", "spin", "--shuffle-seed", "42"]
# (label, run name, generate.py flags, train.py flags, the run whose pairs it reuses)
RUNS = [("minispin (defaults)", "ours", None, [], None),
        ("SPIN's rows", "spin-rows", None, ["--rows", "spin"], "ours"),
        ("the study's rows", "study-rows", None, ["--rows", "study"], "ours"),
        ("SPIN's generation", "spin-gen", SPIN_GENERATION, [], None),
        ("SPIN (generation and rows)", "spin-both", None, ["--rows", "spin"], "spin-gen")]


def run_tool(script: str, *argv):
    cmd = [sys.executable, script, *argv]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)


def train(root: str, name: str, gen_flags, train_flags, pairs_from):
    """One iteration 0 in root/name: its pairs copied from another run, sampled by
    generate.py with gen_flags, or (neither) sampled by train.py's own --generate."""
    run = os.path.join(root, name)
    pairs = os.path.join(run, "iter0", "pairs.jsonl")
    if pairs_from and not os.path.isfile(pairs):
        os.makedirs(os.path.dirname(pairs), exist_ok=True)
        shutil.copy(os.path.join(root, pairs_from, "iter0", "pairs.jsonl"), pairs)
    if gen_flags is not None:
        run_tool("generate.py", "--run-dir", run, "--no-progress", *gen_flags)
    run_tool("train.py", "--run-dir", run, "--no-progress", *train_flags)
    return run


def row(label: str, run: str) -> str:
    it = os.path.join(run, "iter0")
    s = json.load(open(os.path.join(it, "summary.json")))
    pairs = [json.loads(line) for line in open(os.path.join(it, "pairs.jsonl"))]
    n = len(pairs)
    tokens = sum(p["gen"]["new_tokens"] for p in pairs) / n
    finished = sum(p["gen"]["finished"] for p in pairs) / n
    h = s["heldout"]
    return (f"| {label} | {tokens:.0f} | {finished:.2f} | {s['loss_first']:.4f} | {s['loss_last_quarter']:.4f} | "
            f"{s['rewards/accuracies_last_quarter']:.3f} | {s['rewards/margins_last_quarter']:.3f} | "
            f"{h['after']['answer_nll']:.4f} | {h['after']['format_rate']:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(REPO, "runs", "fidelity"), help="where the runs go")
    ap.add_argument("--write", action="store_true", help="write the table into docs/fidelity.md")
    args = ap.parse_args(argv)
    runs = {name: train(args.root, name, gen, flags, src) for _, name, gen, flags, src in RUNS}
    h0 = json.load(open(os.path.join(runs["ours"], "iter0", "summary.json")))["heldout"]["before"]
    lines = ["| run | y' tokens (mean) | y' finished | loss, step 1 | loss, last quarter | "
             "reward acc. | reward margin | held-out NLL ↓ | format rate ↑ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| θ_0 (tiny-sft), before SPIN | | | | | | | {h0['answer_nll']:.4f} | {h0['format_rate']:.3f} |"]
    lines += [row(label, runs[name]) for label, name, *_ in RUNS]
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = os.path.join(REPO, "docs", "fidelity.md")
        text = open(path).read()
        new = re.sub(r"<!-- table:start -->.*<!-- table:end -->",
                     f"<!-- table:start -->\n{table}\n<!-- table:end -->", text, flags=re.S)
        open(path, "w").write(new)
        print(f"wrote the table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
