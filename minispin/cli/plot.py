"""minispin-plot (python plot.py in a checkout) — charts of a SPIN run: training curves per
iteration and held-out metrics across them.

    python plot.py runs/tiny                 # writes runs/tiny/plots/*.png
    python plot.py runs/tiny --out docs      # e.g. the charts checked in under docs/

Reads what train.py leaves in the run folder (see minispin/run/layout.py):
* iter<t>/metrics.jsonl  -> training.png: loss, rewards/margins and rewards/accuracies
  against the optimizer step, one line per iteration;
* iter<t>/summary.json   -> heldout.png: the held-out metrics of θ_0 (from iteration 0's
  "before") and of each θ_{t+1}, against the model index.
matplotlib is an optional extra: pip install 'minispin[plot]' (in a checkout: pip install -e .[plot])
"""
from __future__ import annotations

import json
import os
import re
import sys

from minispin.cli import prog
from minispin.cli.args import ArgumentParser, RawDescriptionHelpFormatter

CURVES = [("loss", "SPIN loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "reward accuracy")]
HELDOUT = [("answer_nll", "held-out answer NLL / token (lower is better)"),
           ("format_rate", "held-out format rate ('#### n' + eos)")]


def iterations(run_dir: str):
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"iter(\d+)", name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append(int(m.group(1)))
    return sorted(found)


def read_metrics(path: str):
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a torn last line of a run still in progress
    return out


def smooth(values, k):
    if k <= 1:
        return values
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def main(argv=None) -> int:
    name = prog("minispin-plot")
    ap = ArgumentParser(prog=name, description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder, e.g. runs/tiny")
    ap.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over this many steps")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{name}: needs matplotlib: pip install 'minispin[plot]' (in a checkout: pip install -e .[plot])",
              file=sys.stderr)
        return 2
    if not os.path.isdir(args.run_dir):
        print(f"{name}: error: {args.run_dir} is not a folder", file=sys.stderr)
        return 2
    its = iterations(args.run_dir)
    if not its:
        print(f"{name}: error: no iter<t>/ folders in {args.run_dir}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    any_curve = False
    for t in its:
        recs = [r for r in read_metrics(os.path.join(args.run_dir, f"iter{t}", "metrics.jsonl"))
                if "rewards/margins" in r]
        if not recs:
            continue
        any_curve = True
        steps = [r["step"] for r in recs]
        for ax, (key, title) in zip(axes, CURVES):
            ax.plot(steps, smooth([r[key] for r in recs], args.smooth), label=f"iter{t}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("optimizer step")
    if any_curve:
        axes[0].legend()
        fig.suptitle(f"SPIN training: {os.path.basename(os.path.normpath(args.run_dir))}")
        fig.tight_layout()
        path = os.path.join(out, "training.png")
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)

    points = []  # (label, metrics)
    for t in its:
        path = os.path.join(args.run_dir, f"iter{t}", "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            h = json.load(f).get("heldout")
        if not h:
            continue
        if not points:
            points.append((f"θ{t} (start)", h["before"]))
        points.append((f"iter{t} → θ{t + 1}", h["after"]))
    if points:
        fig, axes = plt.subplots(1, len(HELDOUT), figsize=(5 * len(HELDOUT), 3.6))
        for ax, (key, title) in zip(axes, HELDOUT):
            ax.plot(range(len(points)), [p[1][key] for p in points], marker="o")
            ax.set_xticks(range(len(points)), [p[0] for p in points], rotation=20, fontsize=8)
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out, "heldout.png")
        fig.savefig(path, dpi=110)
        written.append(path)
        plt.close(fig)
    for p in written:
        print(f"wrote {p}")
    if not written:
        print(f"{name}: nothing to plot yet in {args.run_dir} (no metrics.jsonl or summary.json)",
              file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":   # python -m minispin.cli.plot
    raise SystemExit(main())
