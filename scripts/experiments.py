"""The study's experiment in miniature: SFT vs SPIN iterations 0-2, and at iteration 1
plain SPIN vs judge relabeling vs reference noise vs the adaptive combination.

    python scripts/experiments.py                 # runs everything, rewrites docs/experiments.md's table
    python scripts/experiments.py --check         # recompute and fail if the table differs

Everything goes through the project's own command-line tools (train.py with --generate,
--relabel, --noise, --adaptive; the local judge), on the tiny recipe with more prompts:
one process, one CPU thread, fixed seeds — the same machine and torch give the same numbers.

Runs live under --root (default runs/experiments):
  spin/iter0, iter1, iter2      plain SPIN, three iterations (θ_1, θ_2, θ_3)
  relabel|noise|adaptive/iter1  iteration 1 again from the same θ_1 and the same pairs
                                (iteration 0 is copied, so only the fix differs)
The table rows read each iteration's summary.json (minispin/study/heldout.py): the held-out
metrics of the model it produced, and the training rewards; the diagnostics table reads its
"diagnostics" (minispin/study/diagnostics.py, docs/diagnostics.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minispin.run.recipe import write_variant as write_recipe_variant  # noqa: E402

DOC = os.path.join(REPO, "docs", "experiments.md")
START, END = "<!-- table:start -->", "<!-- table:end -->"
DIAG_START, DIAG_END = "<!-- diagnostics:start -->", "<!-- diagnostics:end -->"
DIAG_COLUMNS = [("logp_real_before", "log p/tok y, θ_t"), ("logp_real_after", "log p/tok y, θ_t+1"),
                ("logp_generated_before", "log p/tok y', θ_t"), ("logp_generated_after", "log p/tok y', θ_t+1"),
                ("reward_accuracy_heldout", "held-out reward acc."), ("reward_margin_heldout", "held-out reward margin"),
                ("kl_heldout", "KL/tok"), ("generated_length_mean", "y' tokens"),
                ("generated_distinct_2", "y' distinct-2"), ("judge_prefers_generated", "judge prefers y'"),
                ("judge_margin_mean", "judge margin")]

# the tiny recipe, scaled up for a less noisy comparison (still minutes per iteration)
OVERRIDES = {"num_prompts": 256, "heldout_examples": 200}
FIXES = {
    "relabel": ["--relabel", "--judge", "local"],
    "noise": ["--noise", "ref-logit=0.5,side=real"],
    "adaptive": ["--adaptive", "--judge", "local"],
}


def recipe(root: str) -> str:
    return write_recipe_variant(os.path.join(root, "experiment.toml"), OVERRIDES)


def train(cfg: str, run_dir: str, t: int, extra=()):
    cmd = [sys.executable, "train.py", "--config", cfg, "--run-dir", run_dir, "--iter", str(t),
           "--no-progress", *extra]
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def summary(run_dir: str, t: int) -> dict:
    with open(os.path.join(run_dir, f"iter{t}", "summary.json")) as f:
        return json.load(f)


def fix_stats(run_dir: str, t: int) -> str:
    """Pairs the fix changed, over all sources (iteration t-1's mixed-in pairs too)."""
    with open(os.path.join(run_dir, f"iter{t}", "train_info.json")) as f:
        sources = json.load(f)["sources"].values()
    total = sum(s["pairs"] for s in sources)
    swapped = sum(s.get("swapped", 0) for s in sources)
    noised = sum(s.get("noised", 0) for s in sources)
    parts = [f"{swapped} swapped"] if swapped else []
    parts += [f"{noised} noised"] if noised else []
    return f"{', '.join(parts)} (of {total})" if parts else "-"


def table(root: str) -> str:
    spin = os.path.join(root, "spin")
    rows = [("SFT (θ_0, bundled tiny-sft)", summary(spin, 0)["heldout"]["before"], None, "-")]
    for t in range(3):
        s = summary(spin, t)
        rows.append((f"SPIN iter{t} (θ_{t + 1})", s["heldout"]["after"], s, "-"))
    for name in FIXES:
        run = os.path.join(root, name)
        s = summary(run, 1)
        rows.append((f"{name} iter1 (θ_2)", s["heldout"]["after"], s, fix_stats(run, 1)))
    n = summary(spin, 0)["heldout"]["examples"]
    lines = ["| model | held-out answer NLL/token ↓ | format rate ↑ | exact match ↑ | "
             "train reward acc. | train margin | pairs changed |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, h, s, changed in rows:
        acc = f"{s['rewards/accuracies_last_quarter']:.3f}" if s else "-"
        margin = f"{s['rewards/margins_last_quarter']:.3f}" if s else "-"
        lines.append(f"| {label} | {h['answer_nll']:.4f} | {h['format_rate']:.3f} | "
                     f"{h['exact_match']:.3f} | {acc} | {margin} | {changed} |")
    lines.append("")
    lines.append(f"Held-out: the first {n} GSM8K test problems (never trained on), greedy decoding. "
                 f"Training columns: mean over the last quarter of the iteration's steps.")
    return "\n".join(lines)


def diagnostics_table(root: str) -> str:
    """Every iteration's diagnostics, one row per trained iteration ("-" where a key is absent:
    the judge keys without judging)."""
    runs = [(f"SPIN iter{t}", os.path.join(root, "spin"), t) for t in range(3)]
    runs += [(f"{name} iter1", os.path.join(root, name), 1) for name in FIXES]
    lines = ["| iteration | " + " | ".join(h for _, h in DIAG_COLUMNS) + " |",
             "|---|" + "---:|" * len(DIAG_COLUMNS)]
    for label, run, t in runs:
        d = summary(run, t).get("diagnostics") or {}
        lines.append(f"| {label} | " + " | ".join(f"{d[k]:.4f}" if k in d else "-" for k, _ in DIAG_COLUMNS) + " |")
    lines.append("")
    lines.append("Per-token log-probs of this iteration's own pairs (iter<t>/pairs.jsonl); held-out columns on the "
                 "same held-out problems as above; definitions in docs/diagnostics.md.")
    return "\n".join(lines)


def section(doc: str, start: str, end: str) -> str:
    if start not in doc or end not in doc:
        raise SystemExit(f"{DOC} lacks the {start} / {end} markers")
    return doc[doc.index(start) + len(start):doc.index(end)].strip("\n")


def replace_section(doc: str, start: str, end: str, new: str) -> str:
    return doc[:doc.index(start) + len(start)] + "\n" + new + "\n" + doc[doc.index(end):]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(REPO, "runs", "experiments"),
                    help="where the runs go (default runs/experiments)")
    ap.add_argument("--check", action="store_true",
                    help="do not write docs/experiments.md; exit 1 if its table differs")
    ap.add_argument("--fresh", action="store_true", help="delete --root first (else finished "
                    "iterations are reused: train.py skips an iteration whose model exists)")
    args = ap.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.root, ignore_errors=True)
    os.makedirs(args.root, exist_ok=True)
    cfg = recipe(args.root)
    spin = os.path.join(args.root, "spin")
    for t in range(3):
        train(cfg, spin, t)  # the recipe generates each iteration's pairs with θ_t first
    for name, flags in FIXES.items():
        run = os.path.join(args.root, name)
        if not os.path.isdir(os.path.join(run, "iter0")):
            shutil.copytree(os.path.join(spin, "iter0"), os.path.join(run, "iter0"))
            os.makedirs(os.path.join(run, "iter1"), exist_ok=True)
            shutil.copy(os.path.join(spin, "iter1", "pairs.jsonl"), os.path.join(run, "iter1", "pairs.jsonl"))
        train(cfg, run, 1, flags)
    new, new_diag = table(args.root), diagnostics_table(args.root)
    print(new)
    print(new_diag)
    with open(DOC) as f:
        doc = f.read()
    old, old_diag = section(doc, START, END), section(doc, DIAG_START, DIAG_END)
    if args.check:
        if old != new or old_diag != new_diag:
            print("docs/experiments.md's tables differ from this run", file=sys.stderr)
            return 1
        print("docs/experiments.md's tables reproduced exactly")
        return 0
    with open(DOC, "w") as f:
        f.write(replace_section(replace_section(doc, START, END, new), DIAG_START, DIAG_END, new_diag))
    print(f"wrote the tables into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
