"""The iteration's plan (minispin/plan.py): its stage counts against the recipe's arithmetic,
and its whole-iteration ETA against hand-computed sums."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from minispin.run import plan as P
from minispin.run.recipe import resolve


def write_lines(path, n):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": str(i)}) + "\n")


def test_the_tiny_recipes_plan_counts_prompts_pairs_steps_and_heldout_examples(tmp_path):
    r = resolve(None, {"run_dir": str(tmp_path / "run")})
    plan = P.make_plan(r, 0, 1)
    # tiny.toml: 64 prompts, batch 8, 2 epochs (drop the last partial batch), 100 held-out examples
    assert [(s.name, s.count) for s in plan.stages] == [
        ("generate", 64), ("reference", 64), ("train", 64 // 8 * 2), ("export", 1), ("heldout", 200),
        ("diagnostics", 200)]
    text = plan.describe()
    assert text.startswith("plan for iteration 0: 1. generate 64 prompts (256 new tokens at most) -> "
                           "2. reference pass 64 pairs -> 3. train 16 steps (8 pairs each) -> 4. export "), text
    assert text.endswith("5. held-out 100 examples x 2 models -> 6. diagnostics 64 pairs x 2 models, "
                         "100 held-out samples x 2 models"), text
    # --no-diagnostics, or a --pairs file of its own (the diagnostics read the run's pairs file)
    r = resolve(None, {"run_dir": str(tmp_path / "run"), "diagnostics": False})
    assert [s.name for s in P.make_plan(r, 0, 1).stages][-1] == "heldout"
    r = resolve(None, {"run_dir": str(tmp_path / "run")})
    write_lines(str(tmp_path / "mine.jsonl"), 10)
    assert [s.name for s in P.make_plan(r, 0, 1, pairs_file=str(tmp_path / "mine.jsonl")).stages][-1] == "heldout"


def test_a_rerun_plans_only_what_is_left_and_iteration_1_counts_the_mixed_in_pairs(tmp_path):
    run = tmp_path / "run"
    write_lines(str(run / "iter0" / "pairs.jsonl"), 20)
    write_lines(str(run / "iter1" / "pairs.jsonl"), 30)
    (run / "iter1" / "heldout_before.json").write_text("{}")
    r = resolve(None, {"run_dir": str(run), "max_steps": 5}, iteration=1)
    plan = P.make_plan(r, 1, 2)
    assert [(s.name, s.count) for s in plan.stages] == [
        ("reference", 50), ("train", 5), ("export", 1), ("heldout", 100), ("diagnostics", 200)]
    r = resolve(None, {"run_dir": str(run), "mix_previous": False, "ref_mode": "online"}, iteration=1)
    assert [(s.name, s.count) for s in P.make_plan(r, 1, 1).stages][:1] == [("train", 30 // 8 * 2)]


def test_the_eta_adds_this_stages_pace_and_later_stages_at_the_pace_measured_for_their_kind():
    gen = P.Stage("generate", 10, "prompt", "decode", 100, "g")
    ref = P.Stage("reference", 40, "pair", "forward", 2, "r", share=2)
    train = P.Stage("train", 6, "step", "forward", 48, "t")
    held = P.Stage("heldout", 8, "example", "decode", 50, "h")
    plan = P.Plan(0, [gen, ref, P.Stage("export", 1, "model", "", 0, "e"), train, held])
    gen.started, gen.done = 1000.0, 4
    # generation: 4 prompts in 20 s -> 6 left = 30 s; nothing forward measured yet: a lower bound
    # that also holds the held-out check at 20 s / (4 x 100 tokens) = 0.05 s per token
    plan.pace["decode"] = 20 / (4 * 100)
    assert plan.eta(now=1020.0) == "≥ " + P.format_seconds(30 + 8 * 50 * 0.05)
    gen.finished = True
    ref.started, ref.done = 2000.0, 10
    plan.pace["forward"] = 5 / (10 / 2 * 2)          # 10 pairs shared by 2 processes in 5 s
    want = 30 / 10 * 5 + 6 * 48 * plan.pace["forward"] + 8 * 50 * 0.05
    assert plan.eta(now=2005.0) == P.format_seconds(want)
    assert P.format_seconds(59.6) == "1m00s" and P.format_seconds(3725) == "1h02m"


@pytest.mark.slow
def test_the_held_out_check_and_the_diagnostics_show_their_stage_and_the_iteration_eta(tmp_path):
    """train.py's last two stages have bars of the plan: "[5/6 heldout]" counts the examples
    of both models, "[6/6 diagnostics]" the held-out samples of both models."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--run-dir", str(tmp_path / "run"),
                        "--num-prompts", "8", "--max-steps", "1", "--heldout-examples", "3",
                        "--max-new-tokens", "8"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    err = p.stderr.replace("\r", "\n").splitlines()
    for label in ("[5/6 heldout] iteration ETA", "[6/6 diagnostics] iteration ETA"):
        counts = [line.split("|")[2].split()[0] for line in err if line.startswith(label)]
        assert counts and counts[0] == "0/6" and counts[-1] == "6/6", (label, counts, err[-20:])


def test_a_judging_iteration_plans_its_judge_stage_with_a_pace_of_its_own(tmp_path):
    """relabel / adaptive with pairs still to judge: "judge" after generation, before the
    reference pass, counting both answers of every pair; its pace is measured by its own bar."""
    from minispin.run.iteration import judging_needed
    run = tmp_path / "run"
    r = resolve(None, {"run_dir": str(run), "relabel": True, "judge_backend": "local"})
    plan = P.make_plan(r, 0, 1, judging=judging_needed(r, 0))
    assert [(s.name, s.count) for s in plan.stages][:3] == [("generate", 64), ("judge", 128), ("reference", 64)]
    assert "2. judge 64 pairs (local, relabel)" in plan.describe(), plan.describe()
    judge = plan.stage("judge")
    assert judge.kind == "judge" and judge.kind not in ("decode", "forward")
    plain = resolve(None, {"run_dir": str(run)})
    assert "judge" not in [s.name for s in P.make_plan(plain, 0, 1, judging=judging_needed(plain, 0)).stages]


def test_too_few_prompts_for_one_batch_is_refused_before_generation(tmp_path, capsys):
    from helpers import run_cli
    run = tmp_path / "run"
    rc = run_cli("train.py", "--run-dir", run, "--num-prompts", "4", "--no-progress")   # tiny: batch_size 8
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [
        "train.py: error: iteration 0 has at most 4 pairs, fewer than one global batch (batch_size 8); "
        "lower --batch-size or raise --num-prompts"], err
    assert not (run / "iter0" / "pairs.jsonl").exists()
