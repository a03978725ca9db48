"""The study's design on a real model, SmolLM2-135M-Instruct (docs/experiments-smollm2.md).

    python scripts/experiments_smollm2.py                  # fetch, run or resume every stage, write the doc's tables
    python scripts/experiments_smollm2.py --tables-only    # rewrite the tables from what has finished so far
    python scripts/experiments_smollm2.py --stages sweep   # only some stages (comma-separated)

Stages, in order; each skips what is already done, so the command can be stopped (Ctrl-C,
a killed job) and run again to continue: train.py skips an iteration whose model exists and
resumes an unfinished one from its pairs file and checkpoints, evaluate.py results are kept.

  sweep   the learning rate: iteration 0 of configs/smollm2-135m.toml (16 prompts, the same
          pairs and reference log-probs for every lr) at lr 1e-7 ... 1e-4 (SWEEP_LRS), cut to two
          steps at the full lr (SWEEP_FLAGS: a probe a shared CPU can afford); held-out
          answer NLL on --sweep-heldout problems (teacher-forced only: one greedy token, so
          the format and exact-match columns of these runs mean nothing and are not shown)
  spin    plain SPIN iterations 0, 1, 2 (θ_1, θ_2, θ_3), --num-prompts prompts each
  fixes   iteration 1 again from the same θ_1 and the same pairs: relabel (the local judge,
          θ_0 itself), noise (ref-logit 0.5 on the real answers), adaptive
  lmeval  arc_easy (25-shot) and hellaswag (10-shot) on the shipped offline samples,
          --lm-eval-limit documents each, for θ_0 and every model above

Everything runs through the project's command-line tools, one process, fixed seeds.
--threads sets OMP_NUM_THREADS of each tool (results do not depend on it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minispin.run.recipe import write_variant  # noqa: E402

DOC = os.path.join(REPO, "docs", "experiments-smollm2.md")
RECIPE = os.path.join(REPO, "configs", "smollm2-135m.toml")
SWEEP_LRS = ["1e-7", "1e-6", "1e-5", "3e-5", "1e-4"]
# a probe, cheap enough for a shared CPU: two steps at the full lr (no warmup) on 8 of the
# 16 pairs, then the held-out answer NLL
SWEEP_FLAGS = ["--max-steps", "2", "--warmup-ratio", "0"]
# then the recipe's whole schedule (8 steps, warmup, linear decay) around the probe's best
SWEEP_FULL = ["3e-6", "1e-5"]
FIXES = {
    "relabel": ["--relabel", "--judge", "local"],
    "noise": ["--noise", "ref-logit=0.5,side=real"],
    "adaptive": ["--adaptive", "--judge", "local"],
}
LM_TASKS = "arc_easy,hellaswag"
STAGES = ("sweep", "spin", "fixes", "lmeval")


def run(cmd, threads: int):
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def train(cfg, run_dir, t, model, threads, extra=()):
    if os.path.isfile(os.path.join(run_dir, f"iter{t}", "summary.json")):
        return
    run([sys.executable, "train.py", "--config", cfg, "--model", model, "--run-dir", run_dir,
         "--iter", str(t), "--no-progress", *extra], threads)


def load(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def device_line() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs, "
            f"torch {torch.__version__}")


# ------------------------------------------------------------------ stages
def stage_sweep(root, model, args):
    cfg = write_variant(os.path.join(root, "sweep.toml"),
                        {"heldout_examples": args.sweep_heldout, "heldout_max_new_tokens": 1}, base=RECIPE)
    first = None
    for lr, name, flags in [(lr, f"lr{lr}", SWEEP_FLAGS) for lr in SWEEP_LRS] + \
            [(lr, f"full-lr{lr}", []) for lr in SWEEP_FULL]:
        run_dir = os.path.join(root, "sweep", name)
        if first is not None and not os.path.isdir(os.path.join(run_dir, "iter0")):
            os.makedirs(os.path.join(run_dir, "iter0"))
            for name in ("pairs.jsonl", "ref_logps.jsonl", "heldout_before.json"):  # same θ_0, same pairs
                src = os.path.join(first, "iter0", name)
                if os.path.isfile(src):
                    shutil.copy(src, os.path.join(run_dir, "iter0", name))
        train(cfg, run_dir, 0, model, args.threads, ["--lr", lr, *flags])
        first = first or run_dir


def experiment_recipe(root, args):
    return write_variant(os.path.join(root, "experiment.toml"),
                         {"num_prompts": args.num_prompts, "heldout_examples": args.heldout}, base=RECIPE)


def stage_spin(root, model, args):
    cfg, spin = experiment_recipe(root, args), os.path.join(root, "spin")
    for t in range(3):
        train(cfg, spin, t, model, args.threads)


def stage_fixes(root, model, args):
    cfg, spin = experiment_recipe(root, args), os.path.join(root, "spin")
    for name, flags in FIXES.items():
        fix = os.path.join(root, name)
        if not os.path.isdir(os.path.join(fix, "iter0")):
            shutil.copytree(os.path.join(spin, "iter0"), os.path.join(fix, "iter0"))
            os.makedirs(os.path.join(fix, "iter1"), exist_ok=True)
            shutil.copy(os.path.join(spin, "iter1", "pairs.jsonl"), os.path.join(fix, "iter1", "pairs.jsonl"))
            # θ_1's held-out numbers: train.py reuses them only if their fingerprint is θ_1's
            before = os.path.join(spin, "iter1", "heldout_before.json")
            if os.path.isfile(before):
                shutil.copy(before, os.path.join(fix, "iter1", "heldout_before.json"))
        train(cfg, fix, 1, model, args.threads, flags)


def models(root, model):
    """(key, label, folder) of every model of the tables, θ_0 first."""
    out = [("theta0", "θ_0", model)]
    out += [(f"spin-iter{t}", f"SPIN iter{t} (θ_{t + 1})", os.path.join(root, "spin", f"iter{t}", "model"))
            for t in range(3)]
    out += [(f"{name}-iter1", f"{name} iter1 (θ_2)", os.path.join(root, name, "iter1", "model")) for name in FIXES]
    return out


def lmeval_path(root, key):
    return os.path.join(root, "lmeval", key, "results.json")


def stage_lmeval(root, model, args):
    for key, _, folder in models(root, model):
        out = lmeval_path(root, key)
        if os.path.isfile(out) or not os.path.isfile(os.path.join(folder, "model.safetensors")):
            continue
        tmp = os.path.join(root, "lmeval", "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run([sys.executable, "evaluate.py", "--model", folder, "--tasks", LM_TASKS, "--offline",
             "--limit", str(args.lm_eval_limit), "--dtype", "float32", "--output", tmp], args.threads)
        done = [os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f == "results.json"]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.move(done[0], out)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ tables
def wilson(p, n, z=1.96):
    """95% Wilson interval of a proportion p over n trials."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def rate(p, n):
    lo, hi = wilson(p, n)
    return f"{p:.3f} [{lo:.2f}, {hi:.2f}]"


PENDING = "pending (not yet run)"


def sweep_table(root):
    lines = ["| lr | steps | first loss | loss, last quarter | reward acc., last quarter | margin, last quarter | "
             "held-out answer NLL/token (θ_0 → θ_1) |", "|---|---|---:|---:|---:|---:|---|"]
    n = None
    for lr, name, what in [(lr, f"lr{lr}", "2, probe") for lr in SWEEP_LRS] + \
            [(lr, f"full-lr{lr}", "8, the recipe's schedule") for lr in SWEEP_FULL]:
        s = load(os.path.join(root, "sweep", name, "iter0", "summary.json"))
        if s is None:
            lines.append(f"| {lr} | {what} | {PENDING} | | | | |")
            continue
        h = s["heldout"]
        n = h["examples"]
        lines.append(f"| {lr} | {what} | {s['loss_first']:.4f} | {s['loss_last_quarter']:.4f} | "
                     f"{s['rewards/accuracies_last_quarter']:.3f} | {s['rewards/margins_last_quarter']:.3f} | "
                     f"{h['before']['answer_nll']:.4f} → {h['after']['answer_nll']:.4f} |")
    if n:
        lines += ["", f"Held-out: the first {n} GSM8K test problems, teacher-forced."]
    return "\n".join(lines)


def main_table(root):
    spin = os.path.join(root, "spin")
    rows = []
    s0 = load(os.path.join(spin, "iter0", "summary.json"))
    rows.append(("θ_0 (SmolLM2-135M-Instruct)", s0["heldout"]["before"] if s0 else None, None))
    for t in range(3):
        s = load(os.path.join(spin, f"iter{t}", "summary.json"))
        rows.append((f"SPIN iter{t} (θ_{t + 1})", s["heldout"]["after"] if s else None, s))
    for name in FIXES:
        s = load(os.path.join(root, name, "iter1", "summary.json"))
        rows.append((f"{name} iter1 (θ_2)", s["heldout"]["after"] if s else None, s))
    n = s0["heldout"]["examples"] if s0 else 0
    lines = ["| model | held-out answer NLL/token ↓ | format rate ↑ [95% CI] | exact match ↑ [95% CI] | "
             "train reward acc. | train margin |", "|---|---:|---:|---:|---:|---:|"]
    for label, h, s in rows:
        if h is None:
            lines.append(f"| {label} | {PENDING} | | | | |")
            continue
        acc = f"{s['rewards/accuracies_last_quarter']:.3f}" if s else "-"
        margin = f"{s['rewards/margins_last_quarter']:.3f}" if s else "-"
        lines.append(f"| {label} | {h['answer_nll']:.4f} | {rate(h['format_rate'], n)} | "
                     f"{rate(h['exact_match'], n)} | {acc} | {margin} |")
    if n:
        lines += ["", f"Held-out: the first {n} GSM8K test problems (never trained on), greedy, "
                  "256 new tokens. Training columns: mean over the last quarter of the steps."]
    return "\n".join(lines)


def diagnostics_table(root):
    """Every iteration's diagnostics (docs/diagnostics.md), one row per trained iteration, beside
    the same run's held-out answer NLL of θ_t and θ_t+1 (so each row reads against its own run);
    the held-out reward accuracy with its 95% Wilson interval over the held-out problems."""
    runs = [(f"SPIN iter{t}", os.path.join(root, "spin"), t) for t in range(3)]
    runs += [(f"{name} iter1", os.path.join(root, name), 1) for name in FIXES]
    lines = ["| iteration | held-out answer NLL/tok, θ_t → θ_t+1 | log p/tok y, θ_t → θ_t+1 | "
             "log p/tok y', θ_t → θ_t+1 | held-out reward acc. [95% CI] | held-out reward margin | KL/tok | "
             "y' tokens | y' distinct-2 | judge prefers y' | judge margin |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = None
    for label, run_dir, t in runs:
        s = load(os.path.join(run_dir, f"iter{t}", "summary.json"))
        d = (s or {}).get("diagnostics")
        if not d or "kl_heldout" not in d:
            lines.append(f"| {label} | {PENDING} | | | | | | | | | |")
            continue
        n, h = s["heldout"]["examples"], s["heldout"]
        f = lambda k, fmt="{:.4f}": fmt.format(d[k]) if k in d else "-"  # noqa: E731
        lines.append(f"| {label} | {h['before']['answer_nll']:.4f} → {h['after']['answer_nll']:.4f} | "
                     f"{f('logp_real_before')} → {f('logp_real_after')} | "
                     f"{f('logp_generated_before')} → {f('logp_generated_after')} | "
                     f"{rate(d['reward_accuracy_heldout'], n)} | {f('reward_margin_heldout')} | {f('kl_heldout')} | "
                     f"{f('generated_length_mean', '{:.1f}')} | {f('generated_distinct_2', '{:.3f}')} | "
                     f"{f('judge_prefers_generated', '{:.3f}')} | {f('judge_margin_mean', '{:.2f}')} |")
    if n:
        lines += ["", f"Log-probs per token of each iteration's own training pairs; held-out columns on the first {n} "
                  "GSM8K test problems; definitions in docs/diagnostics.md. \"-\": no judge in that run."]
    return "\n".join(lines)


def lmeval_table(root, model):
    lines = ["| model | arc_easy acc_norm (25-shot) ± stderr | hellaswag acc_norm (10-shot) ± stderr | docs |",
             "|---|---:|---:|---:|"]
    for key, label, _ in models(root, model):
        r = load(lmeval_path(root, key))
        if r is None:
            lines.append(f"| {label} | {PENDING} | | |")
            continue
        cells, docs = [], ""
        for task in ("arc_easy", "hellaswag"):
            res = r["results"].get(task) or r["results"].get(f"{task}_local", {})
            cells.append(f"{res['acc_norm,none']:.3f} ± {res.get('acc_norm_stderr,none', float('nan')):.3f}")
            n = (r.get("n-samples", {}).get(task) or r.get("n-samples", {}).get(f"{task}_local") or {})
            docs = n.get("effective", docs)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {docs} |")
    return "\n".join(lines)


TABLES = ("sweep", "table", "diagnostics", "lmeval")


def write_tables(root, model, only=TABLES):
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    makers = {"sweep": sweep_table, "table": main_table, "diagnostics": diagnostics_table,
              "lmeval": lambda r: lmeval_table(r, model)}
    for key in only:
        text = makers[key](root)
        start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
        if start not in doc or end not in doc:
            raise SystemExit(f"{DOC} lacks the {start} / {end} markers")
        doc = doc[:doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
    info = load(os.path.join(root, "device.json")) or {}
    start, end = "<!-- device:start -->", "<!-- device:end -->"
    if info and start in doc and "table" in only:   # the machine the main table was made on
        doc = doc[:doc.index(start) + len(start)] + f"\nMade on: {info['device']} (started {info['started']}).\n" \
            + doc[doc.index(end):]
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(doc)
    print(f"wrote the tables into {DOC}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(REPO, "runs", "experiments-smollm2"),
                    help="where the runs go (default runs/experiments-smollm2)")
    ap.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct"),
                    help="θ_0's folder; fetched with scripts/fetch_smollm2.py when missing")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--num-prompts", type=int, default=64, help="SPIN prompts per iteration (default 64)")
    ap.add_argument("--heldout", type=int, default=50, help="held-out GSM8K test problems (default 50)")
    ap.add_argument("--sweep-heldout", type=int, default=20,
                    help="held-out problems of the lr sweep (teacher-forced NLL only; default 20)")
    ap.add_argument("--lm-eval-limit", type=int, default=100, help="documents per lm-eval task (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each tool (default 2)")
    ap.add_argument("--tables-only", action="store_true", help="run nothing; rewrite the tables")
    ap.add_argument("--tables", default=",".join(TABLES),
                    help=f"which of the doc's tables to rewrite, comma-separated, of {', '.join(TABLES)} (default all)")
    args = ap.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    model = os.path.abspath(args.model)
    tables = [t for t in args.tables.split(",") if t]
    for t in tables:
        if t not in TABLES:
            ap.error(f"--tables: unknown table '{t}' (choose from {', '.join(TABLES)})")
    if not args.tables_only:
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            run([sys.executable, "scripts/fetch_smollm2.py", "--out", model, "--no-progress"], args.threads)
        if not os.path.isfile(os.path.join(args.root, "device.json")):
            with open(os.path.join(args.root, "device.json"), "w") as f:
                json.dump({"device": device_line(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f)
        stages = {"sweep": stage_sweep, "spin": stage_spin, "fixes": stage_fixes, "lmeval": stage_lmeval}
        for name in args.stages.split(","):
            if name not in stages:
                ap.error(f"--stages: unknown stage '{name}' (choose from {', '.join(STAGES)})")
            stages[name](args.root, model, args)
            write_tables(args.root, model, tables)  # after each stage, so a stopped run leaves its tables
    write_tables(args.root, model, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
