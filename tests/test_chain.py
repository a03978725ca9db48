"""train.py --iter A-B --stop-when-worse METRIC: iterations in one command, stopped after the
first one that makes the metric worse, with the kept model recorded; re-running resumes."""
import json
import os

import pytest

from helpers import run_cli
from test_diagnostics import small_recipe


def test_iteration_ranges_and_metrics_are_parsed_or_refused_in_one_line(capsys):
    from minispin.cli.args import iteration_range
    assert iteration_range("2") == [2] and iteration_range("0-3") == [0, 1, 2, 3]
    for bad, flag in ((["--iter", "3-1"], "--iter"), (["--iter", "x"], "--iter"),
                      (["--iter", "0-1", "--stop-when-worse", "loss"], "--stop-when-worse")):
        assert run_cli("train.py", *bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, err
    assert run_cli("train.py", "--iter", "0-1", "--pairs", "p.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pairs is for one iteration" in err


def test_worse_follows_each_metrics_direction():
    from minispin.run.chain import verdict
    held = lambda b, a: {"heldout": {"before": {"answer_nll": b, "format_rate": b}, "after": {"answer_nll": a, "format_rate": a}}}  # noqa: E731
    assert verdict("answer_nll", 0, held(1.0, 1.1), None) == (1.0, 1.1)   # lower is better
    assert verdict("answer_nll", 0, held(1.0, 1.0), None) is None         # equal is not worse
    assert verdict("format_rate", 0, held(0.5, 0.6), None) is None        # higher is better
    diag = lambda v: {"diagnostics": {"kl_heldout": v}}                    # noqa: E731
    assert verdict("kl_heldout", 0, diag(0.1), None) is None              # nothing before the first
    assert verdict("kl_heldout", 1, diag(0.3), diag(0.1)) == (0.1, 0.3)


@pytest.mark.slow
def test_a_chain_stops_after_the_first_iteration_that_worsens_heldout_nll_and_a_rerun_resumes(tmp_path, capsys):
    recipe, run_dir = small_recipe(str(tmp_path)), str(tmp_path / "run")
    args = ["--config", recipe, "--run-dir", run_dir, "--iter", "0-2", "--stop-when-worse", "answer_nll",
            "--lr", "2e-5", "--no-progress"]
    assert run_cli("train.py", *args) == 0
    out = capsys.readouterr().out
    # the stop, recomputed from the summaries: the first iteration whose θ_t+1 NLL > θ_t's
    nll = {}
    for t in range(3):
        path = os.path.join(run_dir, f"iter{t}", "summary.json")
        if os.path.isfile(path):
            h = json.load(open(path))["heldout"]
            nll[t] = (h["before"]["answer_nll"], h["after"]["answer_nll"])
    first_worse = next((t for t in sorted(nll) if nll[t][1] > nll[t][0]), None)
    chain = json.load(open(os.path.join(run_dir, "chain.json")))
    assert chain["stopped_after"] == first_worse and sorted(nll) == list(range((first_worse or 2) + 1))
    if first_worse is not None:
        assert not os.path.isdir(os.path.join(run_dir, f"iter{first_worse + 1}", "model"))
        assert chain["kept"] == f"θ_{first_worse}"
        assert f"iteration {first_worse} made answer_nll worse" in out
        assert json.load(open(os.path.join(run_dir, f"iter{first_worse}", "summary.json")))["stop"] == chain
    # with these settings iteration 0 leaves the NLL as it was and iteration 1 worsens it
    assert first_worse == 1 and chain["kept_model"] == os.path.join(run_dir, "iter0", "model")

    assert run_cli("train.py", *args) == 0   # nothing to train again: the summaries decide the same
    out = capsys.readouterr().out
    assert "iteration 0 is already trained" in out and "iteration 1 is already trained" in out
    assert json.load(open(os.path.join(run_dir, "chain.json"))) == chain


def test_a_range_starting_after_0_compares_a_diagnostic_with_the_iteration_before_it(tmp_path, monkeypatch):
    """--iter 1-2 --stop-when-worse kl_heldout: iteration 1 is judged against iteration 0's
    summary, left by an earlier command (training and summaries replaced by stand-ins)."""
    from types import SimpleNamespace

    from minispin.run import chain
    kl = {0: 0.1, 1: 0.3, 2: 0.2}
    for t in (0,):
        os.makedirs(tmp_path / f"iter{t}")
        json.dump({"diagnostics": {"kl_heldout": kl[t]}}, open(tmp_path / f"iter{t}" / "summary.json", "w"))
    trained = []

    def summarize(recipe, t, progress=False):
        json.dump({"diagnostics": {"kl_heldout": kl[t]}}, open(tmp_path / f"iter{t}" / "summary.json", "w"))
        return f"summary {t}"
    monkeypatch.setattr(chain, "run_iteration", lambda recipe, t, env, **kw: trained.append(t) or
                        os.makedirs(tmp_path / f"iter{t}", exist_ok=True) or {"loss": 0.5})
    monkeypatch.setattr(chain, "summarize", summarize)
    monkeypatch.setattr(chain.D, "broadcast_object", lambda obj: obj)
    recipe = SimpleNamespace(run_dir=str(tmp_path), model=SimpleNamespace(path="sft"),
                             eval=SimpleNamespace(eval_data="x", heldout_examples=1, diagnostics=True))
    out = chain.run_chain(lambda t: recipe, [1, 2], SimpleNamespace(is_main=True), "kl_heldout", log=lambda *a: None)
    assert trained == [1] and out["stopped_after"] == 1 and out["kept"] == "θ_1"
    assert out["reason"] == "iteration 1 made kl_heldout worse (0.1000 -> 0.3000; lower is better)"


def test_a_chain_checks_every_iterations_recipe_before_the_first_starts(tmp_path, capsys):
    """An iteration whose own table turns the held-out check off, or --no-diagnostics with a
    model diagnostic as the metric: one line at once, not when that iteration comes."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(open(small_recipe(str(tmp_path))).read() + "\n[iterations.2]\nheldout_examples = 0\n")
    run_dir = tmp_path / "run"
    rc = run_cli("train.py", "--config", recipe, "--run-dir", run_dir, "--iter", "0-2",
                 "--stop-when-worse", "answer_nll", "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "iteration 2: --stop-when-worse answer_nll is measured with the held-out check" in err, err
    rc = run_cli("train.py", "--config", small_recipe(str(tmp_path)), "--run-dir", run_dir, "--iter", "0-1",
                 "--stop-when-worse", "kl_heldout", "--no-diagnostics", "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "diagnostics = false (--no-diagnostics)" in err, err
    assert not (run_dir / "iter0").exists()
