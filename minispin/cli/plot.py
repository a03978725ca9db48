"""minispin-plot (python plot.py in a checkout) — charts of one or several SPIN runs, overlaid:
training curves per iteration, held-out metrics and diagnostics across iterations, and a
self-contained HTML report.

    python plot.py runs/tiny                              # writes runs/tiny/plots/*.png
    python plot.py runs/tiny --out docs                   # e.g. the charts checked in under docs/
    python plot.py runs/plain runs/relabel runs/noise --out cmp --report   # overlaid, + cmp/report.html

Reads what train.py leaves in each run folder (see minispin/run/layout.py):
* iter<t>/metrics.jsonl  -> training.png: loss, rewards/margins and rewards/accuracies
  against the optimizer step, one line per run and iteration;
* iter<t>/summary.json   -> heldout.png: the held-out metrics of θ_0 (from iteration 0's
  "before") and of each θ_{t+1}; diagnostics.png: every diagnostic against the iteration
  (docs/diagnostics.md), one line per run;
* --report: report.html beside the PNGs, with the tables, the charts embedded and a few
  sample pairs per iteration (minispin/study/report.py).
matplotlib is an optional extra: pip install 'minispin[plot]' (in a checkout: pip install -e .[plot])
"""
from __future__ import annotations

import os
import sys

from minispin.cli import prog
from minispin.cli.args import ArgumentParser, RawDescriptionHelpFormatter
from minispin.run.errors import UserError


def main(argv=None) -> int:
    name = prog("minispin-plot")
    ap = ArgumentParser(prog=name, description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folders, e.g. runs/tiny; several are overlaid")
    ap.add_argument("--out", help="folder for the PNGs and the report (default FIRST_RUN/plots)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over this many steps")
    ap.add_argument("--report", action="store_true", help="also write report.html: tables, charts and sample "
                    "pairs in one self-contained file")
    ap.add_argument("--samples", type=int, default=3, help="sample pairs per iteration in the report")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{name}: needs matplotlib: pip install 'minispin[plot]' (in a checkout: pip install -e .[plot])",
              file=sys.stderr)
        return 2
    from minispin.study.report import draw_charts, iterations, read_run, write_report
    for run_dir in args.run_dirs:
        if not os.path.isdir(run_dir):
            print(f"{name}: error: {run_dir} is not a folder", file=sys.stderr)
            return 2
        if not iterations(run_dir):
            print(f"{name}: error: no iter<t>/ folders in {run_dir}", file=sys.stderr)
            return 2
    out = args.out or os.path.join(args.run_dirs[0], "plots")
    try:
        runs = [read_run(r, args.samples if args.report else 0) for r in args.run_dirs]
    except UserError as e:   # e.g. a summary.json that is not JSON: one line naming it
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    charts = draw_charts(plt, runs, out, args.smooth)
    written = list(charts.values())
    if args.report:
        written.append(write_report(runs, charts, os.path.join(out, "report.html")))
    for p in written:
        print(f"wrote {p}")
    if not charts:
        print(f"{name}: nothing to plot yet in {', '.join(args.run_dirs)} (no metrics.jsonl or summary.json)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":   # python -m minispin.cli.plot
    raise SystemExit(main())
