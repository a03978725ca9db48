"""scripts/experiments_smollm2.py writes docs/experiments-smollm2.md's tables from run files.

No model runs here: the tables are built from summary files laid out as train.py writes
them, and the 95% Wilson interval is checked against closed forms of its own.
"""
import json
import math
import os

import pytest

from helpers import load_script

X = load_script("experiments_smollm2")


def test_wilson_interval_closed_forms():
    z, n = 1.96, 50
    lo, hi = X.wilson(0.0, n)  # 0 of n: [0, z^2 / (n + z^2)]
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / (n + z * z), rel=1e-12)
    lo, hi = X.wilson(1.0, n)  # n of n: the mirror image
    assert hi == pytest.approx(1.0, abs=1e-12) and lo == pytest.approx(n / (n + z * z), rel=1e-12)
    lo, hi = X.wilson(0.5, n)  # one half: centred on 0.5, half-width z * sqrt(n/4 + z^2/4) / (n + z^2)
    assert (lo + hi) / 2 == pytest.approx(0.5)
    assert hi - lo == pytest.approx(2 * z * math.sqrt(n / 4 + z * z / 4) / (n + z * z), rel=1e-12)
    assert X.rate(0.44, 50) == "0.440 [0.31, 0.58]"


def _summary(path, before, after, acc=1.0, margin=2.5):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"steps": 8, "loss_first": 0.6931, "loss_last_quarter": 0.1,
                   "rewards/accuracies_last_quarter": acc, "rewards/margins_last_quarter": margin,
                   "heldout": {"examples": 50, "before": before, "after": after}}, f)


def test_main_table_rows_and_pending(tmp_path):
    theta0 = {"answer_nll": 1.5, "format_rate": 0.0, "exact_match": 0.0}
    theta1 = {"answer_nll": 1.25, "format_rate": 0.5, "exact_match": 0.02}
    _summary(tmp_path / "spin" / "iter0", theta0, theta1, acc=0.75, margin=3.25)
    table = X.main_table(str(tmp_path)).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| ")}
    # θ_0's row is iteration 0's "before", θ_1's its "after" with that run's training columns
    assert rows["θ_0 (SmolLM2-135M-Instruct)"].startswith("| θ_0 (SmolLM2-135M-Instruct) | 1.5000 | 0.000 [")
    assert "| 1.2500 | 0.500 [0.37, 0.63] | 0.020 [0.00, 0.10] | 0.750 | 3.250 |" in rows["SPIN iter0 (θ_1)"]
    for label in ("SPIN iter1 (θ_2)", "SPIN iter2 (θ_3)", "relabel iter1 (θ_2)", "noise iter1 (θ_2)",
                  "adaptive iter1 (θ_2)"):
        assert X.PENDING in rows[label]
    assert "first 50 GSM8K test problems" in table[-1]


def test_lmeval_table_reads_results(tmp_path):
    out = X.lmeval_path(str(tmp_path), "theta0")
    os.makedirs(os.path.dirname(out))
    with open(out, "w") as f:
        json.dump({"results": {"arc_easy": {"acc_norm,none": 0.61, "acc_norm_stderr,none": 0.049},
                               "hellaswag": {"acc_norm,none": 0.46, "acc_norm_stderr,none": 0.05}},
                   "n-samples": {"arc_easy": {"effective": 100}, "hellaswag": {"effective": 100}}}, f)
    lines = X.lmeval_table(str(tmp_path), "MODEL").splitlines()
    assert lines[2] == "| θ_0 | 0.610 ± 0.049 | 0.460 ± 0.050 | 100 |"
    assert all(X.PENDING in line for line in lines[3:])


def test_diagnostics_table_rows_with_the_held_out_reward_accuracys_interval_and_pending(tmp_path):
    _summary(tmp_path / "relabel" / "iter1", {"answer_nll": 1.5, "format_rate": 0.0, "exact_match": 0.0},
             {"answer_nll": 1.375, "format_rate": 0.25, "exact_match": 0.0})
    path = tmp_path / "relabel" / "iter1" / "summary.json"
    s = json.loads(path.read_text())
    s["diagnostics"] = {"logp_real_before": -1.25, "logp_real_after": -1.0, "logp_generated_before": -2.0,
                        "logp_generated_after": -2.5, "reward_accuracy_heldout": 0.5, "reward_margin_heldout": 3.0,
                        "kl_heldout": 0.125, "generated_length_mean": 150.25, "generated_distinct_2": 0.8125,
                        "judge_prefers_generated": 0.625, "judge_margin_mean": 4.5}
    path.write_text(json.dumps(s))
    lines = X.diagnostics_table(str(tmp_path)).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    lo, hi = X.wilson(0.5, 50)
    assert rows["relabel iter1"] == (f"| relabel iter1 | 1.5000 → 1.3750 | -1.2500 → -1.0000 | "
                                     f"-2.0000 → -2.5000 | "
                                     f"0.500 [{lo:.2f}, {hi:.2f}] | 3.0000 | 0.1250 | 150.2 | 0.812 | 0.625 | 4.50 |")
    for label in ("SPIN iter0", "SPIN iter1", "SPIN iter2", "noise iter1", "adaptive iter1"):
        assert X.PENDING in rows[label]
    assert "first 50 GSM8K test problems" in lines[-1]
