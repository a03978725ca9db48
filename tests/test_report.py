"""plot.py RUN [RUN ...] --report: the charts overlay the runs, and report.html holds every
table, every chart as an embedded PNG and the sample pairs, with nothing fetched from
elsewhere. No headless browser is installed here (no chromium, firefox, selenium or
playwright), so the HTML is parsed and checked instead of opened."""
import base64
import json
import os
from html.parser import HTMLParser

import pytest

from helpers import run_cli

pytest.importorskip("matplotlib")
BETA = 0.1


def fake_run(root, name, nll, diag, scores=True):
    """A run folder as train.py leaves it, written by hand: 2 iterations, 4 steps each."""
    run = os.path.join(root, name)
    for t in range(2):
        work = os.path.join(run, f"iter{t}")
        os.makedirs(work)
        with open(os.path.join(work, "metrics.jsonl"), "w") as f:
            for s in range(1, 5):
                f.write(json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.1 * s,
                                    "rewards/accuracies": 0.5}) + "\n")
        with open(os.path.join(work, "train_info.json"), "w") as f:
            json.dump({"recipe": {"training": {"beta": BETA}}}, f)
        pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"{name} question {t}.{i} <b>?"}],
                  "real": f"real answer {i}", "generated": f"own answer {i}", "gen": {}} for i in range(4)]
        with open(os.path.join(work, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        if scores:
            with open(os.path.join(work, "judged.jsonl"), "w") as f:
                f.writelines(json.dumps(dict(p, scores={"real": 7, "generated": 3 + i})) + "\n"
                             for i, p in enumerate(pairs))
        with open(os.path.join(work, "pair_logps.jsonl"), "w") as f:
            for i, p in enumerate(pairs):
                f.write(json.dumps({"key": f"iter{t}/{p['id']}", "real_tokens": 3, "generated_tokens": 3,
                                    "real_before": -10.0, "real_after": -9.0 - i, "generated_before": -8.0,
                                    "generated_after": -8.5}) + "\n")
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump({"steps": 4, "heldout": {"before": {"answer_nll": nll[t], "format_rate": 0.5, "exact_match": 0.0},
                                               "after": {"answer_nll": nll[t + 1], "format_rate": 0.4, "exact_match": 0.0}},
                       "diagnostics": {k: v + t for k, v in diag.items()}}, f)
    return run


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.srcs, self.tags = [], [], [], set()
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self.tables.append({"class": a.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.mark.slow
def test_report_html_holds_every_chart_table_and_sample_pair_of_two_overlaid_runs(tmp_path, capsys):
    plain = fake_run(str(tmp_path), "plain", [1.5, 1.4, 1.45], {"kl_heldout": 0.01, "generated_distinct_2": 0.9})
    noise = fake_run(str(tmp_path), "noise", [1.5, 1.3, 1.35], {"kl_heldout": 0.02, "generated_distinct_2": 0.8},
                     scores=False)
    out = str(tmp_path / "cmp")
    assert run_cli("plot.py", plain, noise, "--out", out, "--report") == 0
    page = Page()
    page.feed(open(os.path.join(out, "report.html"), encoding="utf-8").read())

    assert {i["alt"] for i in page.imgs} == {"training", "heldout", "diagnostics"}
    for img in page.imgs:   # every image inline, and the PNG written beside the report
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data) == open(os.path.join(out, img["alt"] + ".png"), "rb").read()
    assert all(s.startswith("data:image/png;base64,") for s in page.srcs)   # nothing from elsewhere
    assert not page.tags & {"script", "link", "iframe"}

    kinds = [t["class"] for t in page.tables]
    assert kinds == ["heldout", "diagnostics", "samples", "samples"] * 2
    held = page.tables[0]["rows"]
    assert held[0] == ["model", "answer_nll", "format_rate", "exact_match"]
    assert [r[:2] for r in held[1:]] == [["θ0", "1.5000"], ["θ1", "1.4000"], ["θ2", "1.4500"]]
    diag = page.tables[5]["rows"]   # the noise run's
    assert diag[0] == ["key", "iter0", "iter1"] and ["kl_heldout", "0.0200", "1.0200"] in diag
    samples = page.tables[2]["rows"]   # plain, iteration 0
    assert samples[0] == ["id", "prompt x", "real y", "generated y'", "judge y", "judge y'", "reward y", "reward y'"]
    assert len(samples) == 1 + 3   # three pairs by default
    for i, row in enumerate(samples[1:]):
        assert row[:4] == [f"p{i}", f"plain question 0.{i} <b>?", f"real answer {i}", f"own answer {i}"]
        assert row[4:6] == ["7", str(3 + i)]
        assert row[6:] == [f"{BETA * (1.0 - i):.4f}", f"{BETA * -0.5:.4f}"]
    assert page.tables[6]["rows"][1][4:6] == ["", ""]   # the noise run was not judged
    assert "wrote" in capsys.readouterr().out


def test_plot_of_a_missing_run_folder_is_one_line(tmp_path, capsys):
    assert run_cli("plot.py", str(tmp_path / "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]


def test_experiments_diagnostics_table_has_a_row_per_iteration_and_a_dash_where_a_key_is_absent(tmp_path):
    from helpers import load_script
    X = load_script("experiments")
    for run, t in [("spin", 0), ("spin", 1), ("spin", 2), ("relabel", 1), ("noise", 1), ("adaptive", 1)]:
        os.makedirs(tmp_path / run / f"iter{t}", exist_ok=True)
        diag = {"kl_heldout": 0.001 * (t + 1), "generated_distinct_2": 0.5}
        if run == "relabel":
            diag["judge_prefers_generated"] = 0.25
        json.dump({"diagnostics": diag}, open(tmp_path / run / f"iter{t}" / "summary.json", "w"))
    lines = X.diagnostics_table(str(tmp_path)).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:8]}
    assert list(rows) == ["SPIN iter0", "SPIN iter1", "SPIN iter2", "relabel iter1", "noise iter1", "adaptive iter1"]
    assert rows["SPIN iter2"][header.index("KL/tok")] == "0.0030"
    assert rows["relabel iter1"][header.index("judge prefers y'")] == "0.2500"
    assert rows["noise iter1"][header.index("judge prefers y'")] == "-"
