"""Charts and a report of one or several SPIN runs, overlaid (plot.py RUN [RUN ...] [--report]).

Reads what train.py leaves in each run folder (run/layout.py):
* iter<t>/metrics.jsonl  -> training.png: loss, reward margin and accuracy against the
  optimizer step, one line per run and iteration;
* iter<t>/summary.json   -> heldout.png: the held-out metrics of θ_0 (iteration 0's
  "before") and of each θ_{t+1}, one line per run; diagnostics.png: every diagnostic
  (docs/diagnostics.md) against the iteration, one line per run;
* iter<t>/pairs.jsonl, judged.jsonl, pair_logps.jsonl -> the report's sample pairs.

`write_report` puts the tables, the charts (base64 PNG) and, per iteration, a few sample
pairs side by side (prompt, y, y', judge scores, each answer's implicit reward) into one
HTML file that needs nothing else: no script, no stylesheet or image from elsewhere.
matplotlib is passed in by the caller (an optional extra).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from typing import Dict, List, Optional

from ..run.errors import json_loads, load_json_file
from .diagnostics import KEYS as DIAGNOSTICS, sample_pairs

CURVES = [("loss", "SPIN loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "reward accuracy")]
HELDOUT = [("answer_nll", "held-out answer NLL / token (lower is better)"),
           ("format_rate", "held-out format rate ('#### n' + eos)")]


def iterations(run_dir: str) -> List[int]:
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"iter(\d+)", name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append(int(m.group(1)))
    return sorted(found)


def read_metrics(path: str) -> List[dict]:
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json_loads(line))
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


def _json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    return load_json_file(path)   # a file it cannot read is a UserError naming it


def read_run(run_dir: str, samples: int = 3) -> dict:
    """{"name", "dir", "iters": {t: {"metrics", "summary", "samples"}}} of one run folder."""
    iters = {}
    for t in iterations(run_dir):
        work = os.path.join(run_dir, f"iter{t}")
        info = _json(os.path.join(work, "train_info.json")) or {}
        beta = ((info.get("recipe") or {}).get("training") or {}).get("beta", 0.1)
        iters[t] = {"metrics": [r for r in read_metrics(os.path.join(work, "metrics.jsonl")) if "rewards/margins" in r],
                    "summary": _json(os.path.join(work, "summary.json")) or {},
                    "samples": sample_pairs(run_dir, t, beta, samples) if samples else []}
    return {"name": os.path.basename(os.path.normpath(run_dir)), "dir": run_dir, "iters": iters}


def heldout_points(run: dict) -> List[tuple]:
    """[(label, metrics)]: θ_t of the first summarized iteration, then each θ_{t+1}."""
    points = []
    for t, it in sorted(run["iters"].items()):
        h = it["summary"].get("heldout")
        if not h:
            continue
        if not points:
            points.append((f"θ{t}", h["before"]))
        points.append((f"θ{t + 1}", h["after"]))
    return points


def draw_charts(plt, runs: List[dict], out: str, smooth_k: int = 1) -> Dict[str, str]:
    """{chart name: PNG path} of the charts there is data for, overlaying the runs."""
    from matplotlib.ticker import MaxNLocator
    os.makedirs(out, exist_ok=True)
    written = {}
    label = (lambda run, t: f"{run['name']} iter{t}") if len(runs) > 1 else (lambda run, t: f"iter{t}")
    title = runs[0]["name"] if len(runs) == 1 else ", ".join(r["name"] for r in runs)

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    styles = ["-", "--", ":", "-."]
    drawn = False
    for i, run in enumerate(runs):
        for j, (t, it) in enumerate(sorted(run["iters"].items())):
            recs = it["metrics"]
            if not recs:
                continue
            drawn = True
            steps = [r["step"] for r in recs]
            for ax, (key, name) in zip(axes, CURVES):
                ax.plot(steps, smooth([r[key] for r in recs], smooth_k), label=label(run, t),
                        color=f"C{i if len(runs) > 1 else j}", linestyle=styles[j % 4] if len(runs) > 1 else "-")
                ax.set_title(name, fontsize=10)
                ax.set_xlabel("optimizer step")
    if drawn:
        axes[0].legend(fontsize=7)
        fig.suptitle(f"SPIN training: {title}")
        fig.tight_layout()
        written["training"] = os.path.join(out, "training.png")
        fig.savefig(written["training"], dpi=110)
    plt.close(fig)

    series = [(run, heldout_points(run)) for run in runs]
    if any(points for _, points in series):
        fig, axes = plt.subplots(1, len(HELDOUT), figsize=(5 * len(HELDOUT), 3.6))
        for i, (run, points) in enumerate(series):
            for ax, (key, name) in zip(axes, HELDOUT):
                ax.plot([int(p[0][1:]) for p in points], [p[1][key] for p in points], marker="o",
                        label=run["name"], color=f"C{i}")
                ax.set_title(name, fontsize=10)
                ax.set_xlabel("model θ_t")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written["heldout"] = os.path.join(out, "heldout.png")
        fig.savefig(written["heldout"], dpi=110)
        plt.close(fig)

    keys = [k for k in DIAGNOSTICS if any(k in (it["summary"].get("diagnostics") or {})
                                          for run in runs for it in run["iters"].values())]
    if keys:
        cols = 4
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        ts = [t for run in runs for t in run["iters"]]   # one x range for every panel, even a one-point one
        for ax, key in zip(axes.flat, keys):
            for i, run in enumerate(runs):
                pts = [(t, it["summary"]["diagnostics"][key]) for t, it in sorted(run["iters"].items())
                       if key in (it["summary"].get("diagnostics") or {})]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run["name"], color=f"C{i}")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("iteration t")
            ax.set_xlim(min(ts) - 0.25, max(ts) + 0.25)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"SPIN diagnostics per iteration: {title}")
        fig.tight_layout()
        written["diagnostics"] = os.path.join(out, "diagnostics.png")
        fig.savefig(written["diagnostics"], dpi=110)
        plt.close(fig)
    return written


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(header: List[str], rows: List[list], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_report(runs: List[dict], charts: Dict[str, str], path: str) -> str:
    """One self-contained report.html: per run a held-out table and a diagnostics table, the
    charts as embedded PNGs, and per iteration its sample pairs."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>SPIN report</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top;font-size:13px}"
             "td{white-space:pre-wrap;max-width:32em}img{max-width:100%}</style></head><body>",
             f"<h1>SPIN report: {html.escape(', '.join(r['name'] for r in runs))}</h1>",
             "<p>Definitions of the diagnostics: docs/diagnostics.md.</p>"]
    for name, png in charts.items():
        with open(png, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        parts.append(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    for run in runs:
        parts.append(f"<h2>run {html.escape(run['name'])}</h2><p>{html.escape(os.path.abspath(run['dir']))}</p>")
        points = heldout_points(run)
        if points:
            parts.append("<h3>held-out metrics</h3>" + _table(
                ["model", "answer_nll", "format_rate", "exact_match"],
                [[p[0], p[1].get("answer_nll"), p[1].get("format_rate"), p[1].get("exact_match")] for p in points],
                "heldout"))
        its = sorted(run["iters"])
        diag = {t: run["iters"][t]["summary"].get("diagnostics") or {} for t in its}
        keys = [k for k in DIAGNOSTICS if any(k in d for d in diag.values())]
        if keys:
            parts.append("<h3>diagnostics</h3>" + _table(
                ["key"] + [f"iter{t}" for t in its], [[k] + [diag[t].get(k) for t in its] for k in keys],
                "diagnostics"))
        for t in its:
            samples = run["iters"][t]["samples"]
            if samples:
                parts.append(f"<h3>iteration {t}: sample pairs</h3>" + _table(
                    ["id", "prompt x", "real y", "generated y'", "judge y", "judge y'", "reward y", "reward y'"],
                    [[s["id"], s["prompt"], s["real"], s["generated"], s["score_real"], s["score_generated"],
                      s["reward_real"], s["reward_generated"]] for s in samples], "samples"))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
