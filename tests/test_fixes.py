"""train.py's --relabel, --noise and --adaptive (docs/fixes.md), end to end on CPU.

In-process runs use stories260K (no transformers needed) on 16 synthetic pairs whose judge
scores are written by the test, so every margin is known: -30, -6, -5, -4, -1, 0, 1, 4,
5, 6, 30, unscored, -5, 5, 2, -2. At τ = 5: 4 pairs swap (margins 5, 6, 30, 5), 4 are
kept by the judge (-30, -6, -5, -5), 8 are small-margin or unscored (adaptive: noised).
The last test runs the real tiny recipe from the command line, one command per mode,
with the local judge.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, STORIES, run_cli


class train:  # the train.py command, run in this process
    main = staticmethod(lambda args: run_cli("train.py", *args))

WORDS = ("the cat sat on a mat and then ran to see dog bird tree sun moon star red blue "
         "big small happy sad jumped over under").split()
MARGINS = [-30, -6, -5, -4, -1, 0, 1, 4, 5, 6, 30, None, -5, 5, 2, -2]
TAU = 5
SWAPPED = {i for i, m in enumerate(MARGINS) if m is not None and m >= TAU}
KEPT = {i for i, m in enumerate(MARGINS) if m is not None and m <= -TAU}
SMALL = set(range(len(MARGINS))) - SWAPPED - KEPT
SEED = 42  # the tiny recipe's seed: data order and default noise seed
TIMING = ("time", "tokens/s")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pairs(seed=0):
    import random
    rng = random.Random(seed)
    pairs = []
    for i, m in enumerate(MARGINS):
        p = {"id": f"p{i}",
             "prompt": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))}],
             "real": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))),
             "generated": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))), "gen": {}}
        pairs.append(p)
    return pairs


def judged_of(pairs):
    """judge.py's output for these pairs, with the test's margins (its own "swap" field is
    deliberately all False: train.py must apply the rule itself)."""
    out = []
    for p, m in zip(pairs, MARGINS):
        q = dict(p, scores={"real": 50, "generated": None if m is None else 50 + m},
                 margin=m, swap=False)
        out.append(q)
    return out


def write(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def new_run(root, name, pairs, judged=True, t=0):
    run = os.path.join(str(root), name)
    shutil.rmtree(run, ignore_errors=True)
    write(os.path.join(run, f"iter{t}", "pairs.jsonl"), pairs)
    if judged:
        write(os.path.join(run, f"iter{t}", "judged.jsonl"), judged_of(pairs))
    return run


# lr > 0 is required (an lr of 0 is refused as nonsense); 1e-30 moves no weight of these
# models: an RMSprop step is about 10 x lr = 1e-29, far below half an fp32 ulp of any weight,
# so "lr 0" measurements (every step under θ_t) stay bit-identical
NO_UPDATE = "1e-30"


def args_for(run, *extra, lr="1e-3", batch="4", micro="2", epochs="1", steps="4"):
    return ["--model", STORIES, "--run-dir", run, "--batch-size", batch, "--micro-batch-size", micro,
            "--max-length", "80", "--max-prompt-length", "48", "--lr", lr, "--epochs", epochs,
            "--max-steps", steps, "--device", "cpu", "--no-progress", "--checkpoint-every", "0",
            "--heldout-examples", "0", "--judge", "none", *extra]


def metrics(run, t=0):
    with open(os.path.join(run, f"iter{t}", "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def refs(run, t=0):
    out = {}
    with open(os.path.join(run, f"iter{t}", "ref_logps.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["key"]] = (r["real"], r["generated"])  # the last record of a key wins
    return out


def info(run, t=0):
    with open(os.path.join(run, f"iter{t}", "train_info.json")) as f:
        return json.load(f)


def step_pairs(n=len(MARGINS), seed=SEED):
    """Pair index of each step for batch_size 1, epoch 0: the trainer's data order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixes")
    pairs = make_pairs()
    plain = new_run(root, "plain", pairs)
    assert train.main(args_for(plain)) == 0
    return {"root": root, "pairs": pairs, "plain": plain}


# ---------------------------------------------------------------------- off = plain SPIN
def test_noise_off_is_bit_identical_to_plain_spin(base):
    """Fixes switched off explicitly (σ = 0, α = 0, a side or a threshold with nothing to
    act on) give the very same numbers as no flag at all: every metric, every reference
    log-prob, bit for bit."""
    ref_m, ref_r = metrics(base["plain"]), refs(base["plain"])
    assert ref_m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for i, extra in enumerate((["--noise", "ref-logit=0,neftune=0"],
                               ["--noise", "side=both,mode=fresh,seed=3", "--threshold", "0"])):
        run = new_run(base["root"], f"off{i}", base["pairs"])
        assert train.main(args_for(run, *extra)) == 0
        assert metrics(run) == ref_m
        assert refs(run) == ref_r


def test_fix_settings_resolve_and_refuse(base, capsys):
    """The swap rule is applied by train.py at its own threshold (exact at τ), the adaptive
    plan matches the margins, and impossible combinations stop with exit status 2."""
    from minispin.study.fixes import apply_recipe_fixes
    from minispin.run.recipe import resolve

    def prepared(**flags):
        recipe = resolve(None, dict(model=STORIES, **flags))
        return apply_recipe_fixes(judged_of(base["pairs"]), recipe) + (recipe,)

    out, _, _ = prepared(relabel=True)
    assert {i for i, p in enumerate(out) if p["swap"]} == SWAPPED  # margin 5 swaps, 4 does not
    assert all(p["noise"] == 0 for p in out)
    out, _, _ = prepared(relabel=True, judge_threshold=0)
    assert {i for i, p in enumerate(out) if p["swap"]} == {i for i, m in enumerate(MARGINS)
                                                           if m is not None and m >= 0}
    out, summary, recipe = prepared(adaptive=True, adaptive_sigma=0.25, noise="side=both")
    assert {i for i, p in enumerate(out) if p["swap"]} == SWAPPED
    assert {i for i, p in enumerate(out) if p["noise"] == 0.25} == SMALL
    assert all(p["noise"] == 0 for i, p in enumerate(out) if i not in SMALL)
    assert recipe.noise_settings().side == "both"
    assert summary["noised"] == len(SMALL)
    out, _, _ = prepared(relabel=True, noise="ref-logit=0.5")
    assert {i for i, p in enumerate(out) if p["swap"]} == SWAPPED and all(p["noise"] == 0.5 for p in out)
    out, _, _ = prepared(noise="neftune=5")  # NEFTune alone leaves the pairs as read
    assert out == judged_of(base["pairs"])

    run = new_run(base["root"], "refuse", base["pairs"])
    for flags, msg in ((["--noise", "ref-logit=0.5,mode=fresh"], "--ref-mode online"),
                       (["--adaptive", "--noise", "ref-logit=0.5"], "per pair"),
                       (["--adaptive-sigma", "0.3"], "add --adaptive"),
                       (["--noise", "colour=1"], "unknown key")):
        capsys.readouterr()
        assert train.main(args_for(run, *flags)) == 2, flags
        assert msg in capsys.readouterr().err, flags
    assert not os.path.exists(os.path.join(run, "iter0", "metrics.jsonl"))


# ---------------------------------------------------------------------- relabel
def test_relabel_swaps_exactly_the_judged_pairs(base):
    """--relabel trains exactly like plain SPIN on a file in which the pairs with margin >= τ
    have their two answers exchanged: same losses, and margins/accuracies measured
    chosen-minus-rejected (a reward accuracy of 1 means "the judge's winner won")."""
    run = new_run(base["root"], "relabel", base["pairs"])
    assert train.main(args_for(run, "--relabel")) == 0
    exchanged = [dict(p, real=p["generated"], generated=p["real"]) if i in SWAPPED else p
                 for i, p in enumerate(base["pairs"])]
    twin = new_run(base["root"], "exchanged", exchanged, judged=False)
    assert train.main(args_for(twin)) == 0
    a, b = metrics(run), metrics(twin)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k in ("loss", "rewards/margins", "rewards/accuracies"):
            assert abs(x[k] - y[k]) <= 1e-5, (x["step"], k, x[k], y[k])
    plain = metrics(base["plain"])
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a[1:], plain[1:])) > 1e-4  # it matters
    src = info(run)["sources"]["iter0"]
    assert src["swapped"] == len(SWAPPED) and src["file"].endswith("judged.jsonl")
    fixes = info(run)["sources"]["iter0"]["fixes"]
    assert fixes["mode"] == "relabel" and fixes["threshold"] == TAU


# ---------------------------------------------------------------------- adaptive
def test_adaptive_changes_only_the_small_margin_pairs(base):
    """Per-pair losses: batch 1 and lr NO_UPDATE (no weight moves), so step i is pair perm[i] under θ_t. Against the
    relabel run (same judge decisions) every decided pair's loss and reference log-probs
    are bit-identical and every small-margin pair's differ; against plain SPIN the pairs
    the judge kept are bit-identical too."""
    runs = {}
    for name, extra in (("plain", []), ("relabel", ["--relabel"]), ("adaptive", ["--adaptive"])):
        runs[name] = new_run(base["root"], f"pp-{name}", base["pairs"])
        assert train.main(args_for(runs[name], *extra, lr=NO_UPDATE, batch="1", micro="1",
                                   steps="0")) == 0
    m = {k: metrics(v) for k, v in runs.items()}
    r = {k: refs(v) for k, v in runs.items()}
    order = step_pairs()
    assert len(m["adaptive"]) == len(MARGINS)
    for step, i in enumerate(order):
        la, lr_, lp = (m[k][step]["loss"] for k in ("adaptive", "relabel", "plain"))
        key = f"iter0/p{i}"
        if i in SMALL:
            assert abs(la - lr_) > 1e-3, (i, la, lr_)
            assert r["adaptive"][key][0] != r["plain"][key][0]        # real side noised
            assert r["adaptive"][key][1] == r["plain"][key][1]        # generated side clean
        else:
            assert la == lr_, (i, la, lr_)
            assert r["adaptive"][key] == r["plain"][key]
            if i in KEPT:
                assert la == lp, (i, la, lp)
    assert info(runs["adaptive"])["sources"]["iter0"]["noised"] == len(SMALL)
    assert info(runs["adaptive"])["sources"]["iter0"]["swapped"] == len(SWAPPED)


# ---------------------------------------------------------------------- noise
def test_neftune_is_absent_from_the_reference_pass_and_generation(base):
    """NEFTune changes training (step 1 is no longer ln 2) but not the precomputed reference
    (the policy with the hook, in eval mode under no_grad) nor the online reference, and a
    hooked model generates exactly what the plain model does."""
    run = new_run(base["root"], "neftune", base["pairs"])
    assert train.main(args_for(run, "--noise", "neftune=5")) == 0
    assert refs(run) == refs(base["plain"])
    a, plain = metrics(run), metrics(base["plain"])
    assert abs(a[0]["loss"] - plain[0]["loss"]) > 1e-5
    online = new_run(base["root"], "neftune-online", base["pairs"])
    assert train.main(args_for(online, "--noise", "neftune=5", "--ref-mode", "online")) == 0
    assert abs(metrics(online)[0]["loss"] - a[0]["loss"]) < 1e-5  # same draws, clean reference

    from minispin import generate, load_model
    from minispin.core.noise import add_neftune
    model = load_model(STORIES)
    prompts = [[1, 400, 31, 90], [1, 55, 66]]
    plain_out = generate(model, prompts, max_new_tokens=12, temperature=1.0, eos_id=2, seed=3)
    h = add_neftune(model, 50.0)
    model.train()  # even a model left in training mode: generation runs without autograd
    assert generate(model, prompts, max_new_tokens=12, temperature=1.0, eos_id=2, seed=3) == plain_out
    h.remove()


def test_fresh_noise_redraws_each_step_online(base):
    """mode=fresh (online reference): the same pairs get a new draw at the next step (here
    epoch 2); frozen gives them the same one. Batch = all 16 pairs, lr NO_UPDATE, 2 epochs."""
    losses = {}
    for mode in ("fresh", "frozen"):
        run = new_run(base["root"], f"mode-{mode}", base["pairs"])
        assert train.main(args_for(run, "--noise", f"ref-logit=0.5,mode={mode}", "--ref-mode", "online",
                                   lr=NO_UPDATE, batch="16", micro="4", epochs="2", steps="0")) == 0
        losses[mode] = [x["loss"] for x in metrics(run)]
    assert abs(losses["frozen"][0] - losses["frozen"][1]) < 1e-5
    assert abs(losses["fresh"][0] - losses["fresh"][1]) > 1e-3


def test_reference_cache_follows_noise_sigma_side_and_seed(base, capsys):
    """Precomputed reference log-probs are reused only under the same noise: a new σ, side
    or seed recomputes them; the same settings again compute nothing."""
    run = new_run(base["root"], "cache", base["pairs"])

    def go(spec):
        capsys.readouterr()
        assert train.main(args_for(run, "--noise", spec, "--force", steps="1")) == 0
        m = re.search(r"reference pass: log p_θt for (\d+) pairs \((\d+) cached\)", capsys.readouterr().out)
        counts = (int(m.group(1)), int(m.group(2))) if m else (0, len(MARGINS))
        return counts, refs(run)  # refs: the newest record of each key

    n, first = go("ref-logit=0.5")
    loss = metrics(run)[0]["loss"]
    assert n == (16, 0)
    assert go("ref-logit=0.5")[0] == (0, 16)
    n, seeded = go("ref-logit=0.5,seed=7")
    assert n == (16, 0) and all(seeded[k][0] != first[k][0] for k in first)
    assert all(seeded[k][1] == first[k][1] for k in first)      # side real: generated clean
    n, both = go("ref-logit=0.5,seed=7,side=both")
    assert n == (16, 0) and all(both[k][1] != seeded[k][1] for k in first)
    n, smaller = go("ref-logit=0.3,seed=7,side=both")
    assert n == (16, 0) and all(smaller[k][0] != both[k][0] for k in first)
    n, _ = go("ref-logit=0.5")  # the first settings: their records are still valid
    assert n == (0, 16) and metrics(run)[0]["loss"] == loss
    n, _ = go("ref-logit=0.3,seed=7,side=both")
    assert n == (0, 16) and metrics(run)[0]["loss"] != loss


# ---------------------------------------------------------------------- judged files
def test_missing_or_stale_judged_pairs_name_the_judge_command_and_mixed_pairs_are_judged(base, capsys):
    """Iteration 1 mixes in iteration 0's pairs; under --relabel both sources must be
    judged. Missing: the error is the exact judge.py command; stale (pairs regenerated
    after judging): the same; then both sources are relabeled."""
    root = base["root"]
    run = new_run(root, "iter1", base["pairs"], t=1)
    shutil.copytree(STORIES, os.path.join(run, "iter0", "model"))  # θ_1
    prev = make_pairs(seed=1)
    write(os.path.join(run, "iter0", "pairs.jsonl"), prev)
    args = args_for(run, "--iter", "1", "--relabel", steps="1")
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"`python judge.py --iter 0 --run-dir {run}`" in err and "missing" in err
    write(os.path.join(run, "iter0", "judged.jsonl"), judged_of(make_pairs(seed=2)))
    assert train.main(args) == 2
    assert "out of date" in capsys.readouterr().err
    write(os.path.join(run, "iter0", "judged.jsonl"), judged_of(prev))
    assert train.main(args) == 0
    src = info(run, 1)["sources"]
    assert src["iter1"]["swapped"] == src["iter0"]["swapped"] == len(SWAPPED)
    assert src["iter0"]["file"].endswith(os.path.join("iter0", "judged.jsonl"))


# ---------------------------------------------------------------------- the tiny recipe
@pytest.mark.slow
def test_tiny_recipe_runs_each_mode_from_the_command_line(tmp_path):
    """The documented commands (docs/fixes.md) on the tiny recipe, each one process with
    the recipe's local judge (judge_backend = "local", run by train.py itself), at test
    size: 8 generated pairs shared by the four runs, 2 steps, 2 held-out examples."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    gen = tmp_path / "gen"
    r = subprocess.run([sys.executable, "generate.py", "--run-dir", str(gen), "--num-prompts", "8",
                        "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    modes = {"plain": [], "relabel": ["--relabel"], "noise": ["--noise", "ref-logit=0.5,side=real"],
             "adaptive": ["--adaptive"]}
    out = {}
    for name, flags in modes.items():
        run = tmp_path / name
        os.makedirs(run / "iter0")
        shutil.copy(gen / "iter0" / "pairs.jsonl", run / "iter0" / "pairs.jsonl")
        if name == "adaptive":  # the same judge, the same answers: every score is cached
            shutil.copy(tmp_path / "relabel" / "judge_cache.jsonl", run / "judge_cache.jsonl")
        cmd = [sys.executable, "train.py", *flags, "--run-dir", str(run), "--max-steps", "2",
               "--heldout-examples", "2", "--no-progress"]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-2000:])
        assert "SPIN iteration 0 summary" in r.stdout
        assert os.path.isfile(run / "iter0" / "model" / "config.json")
        out[name] = {"stdout": r.stdout, "stderr": r.stderr, "info": info(str(run)),
                     "refs": refs(str(run)), "metrics": metrics(str(run))}
        assert len(out[name]["metrics"]) == 2
    assert out["plain"]["info"]["sources"]["iter0"]["fixes"]["mode"] == "plain"
    for name in ("relabel", "adaptive"):
        run = tmp_path / name
        judged = [json.loads(line) for line in open(run / "iter0" / "judged.jsonl")]
        summary = json.load(open(run / "iter0" / "judge_summary.json"))
        assert summary["pairs"] == 8 and summary["judge"].startswith("local:")
        assert "judge summary" in out[name]["stdout"]
        src = out[name]["info"]["sources"]["iter0"]
        margins = [p["margin"] for p in judged]
        if name == "relabel":
            assert src["swapped"] == sum(m is not None and m >= TAU for m in margins)
        else:
            assert src["noised"] == sum(m is None or abs(m) < TAU for m in margins)
            assert summary["items_cached_before"] == summary["items"]  # nothing judged twice
    noised = out["noise"]["refs"]
    assert all(noised[k][0] != v[0] and noised[k][1] == v[1] for k, v in out["plain"]["refs"].items())
    assert out["noise"]["info"]["sources"]["iter0"]["noised"] == 8


@pytest.mark.slow
def test_torchrun_judges_on_rank_0_only(base):
    """Two processes, judged pairs missing, --judge local: rank 0 judges (each answer scored
    once: one cache line per answer), rank 1 waits, then both train on the judged pairs."""
    run = new_run(base["root"], "torchrun-judge", base["pairs"], judged=False)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"),
           *args_for(run, "--relabel", "--judge", "local", "--judge-model", STORIES, steps="2")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout and r.stdout.count("judge summary") == 1
    with open(os.path.join(run, "judge_cache.jsonl")) as f:
        keys = [json.loads(line)["key"] for line in f]
    assert len(keys) == len(set(keys)) == 2 * len(MARGINS)
    judged = [json.loads(line) for line in open(os.path.join(run, "iter0", "judged.jsonl"))]
    assert [p["id"] for p in judged] == [p["id"] for p in base["pairs"]]
    assert info(run)["sources"]["iter0"]["swapped"] == sum(bool(p["swap"]) for p in judged)
    assert len(metrics(run)) == 2
