"""A stopped run loses nothing (docs/reliability.md, "Stops"): SIGTERM / SIGUSR1 from a
scheduler, a peer that stops answering, a re-run of a finished iteration with other
settings, a run stopped before its summary, θ_t's files replaced, a reference pass killed
half way, non-finite reference log-probs. Each case runs the command as a user would
(train.py / generate.py in this process through helpers.run_cli, or under torchrun) and
ends with one line and a distinct exit status, or with a result bit-identical to an
uninterrupted run (losses compared with ==, weight files byte for byte). The model is a
stories260K copy; runs are 4 steps of 8 pairs."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, STORIES, run_cli

WORDS = "the cat sat on a mat and then ran to see dog bird tree sun moon star red blue".split()


def write_pairs(path, n=8, seed=0):
    import random
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            # lengths vary widely, so a batch of other pairs pads (and rounds) differently
            f.write(json.dumps({"id": f"p{i}",
                                "prompt": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 7)))}],
                                "real": " ".join(rng.choices(WORDS, k=rng.randint(3, 120))),
                                "generated": " ".join(rng.choices(WORDS, k=rng.randint(2, 120)))}) + "\n")
    return path


def args(model, run, *extra):
    return ["--model", model, "--run-dir", run, "--device", "cpu", "--no-progress", "--batch-size", "2",
            "--micro-batch-size", "1", "--max-length", "256", "--max-prompt-length", "32", "--lr", "1e-3",
            "--epochs", "1", "--checkpoint-every", "2", "--heldout-examples", "0", "--no-mix-previous", *extra]


def metrics(run, t=0):
    with open(os.path.join(run, f"iter{t}", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run, t=0):
    return [(r["step"], r["loss"], r["rewards/margins"]) for r in metrics(run, t)]


def weights_sha(run, t=0):
    """sha256 of the exported weight file's bytes (independent of minispin's own marker)."""
    with open(os.path.join(run, f"iter{t}", "model", "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fresh(base, tmp_path, name="run"):
    run = str(tmp_path / name)
    os.makedirs(os.path.join(run, "iter0"))
    shutil.copy(os.path.join(base["run"], "iter0", "pairs.jsonl"), os.path.join(run, "iter0", "pairs.jsonl"))
    return run


def cli(capsys, script, *argv):
    """Run a tool in this process: (exit status, stdout, the non-empty stderr lines)."""
    capsys.readouterr()
    rc = run_cli(script, *argv)
    out, err = capsys.readouterr()
    return rc, out, [x for x in err.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return shutil.copytree(STORIES, str(tmp_path_factory.mktemp("m") / "model"))


@pytest.fixture(scope="module")
def base(model, tmp_path_factory):
    """An uninterrupted run: the losses and weights every stopped-and-resumed run must equal."""
    run = str(tmp_path_factory.mktemp("base") / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", *args(model, run, "--keep-checkpoints-after-export")) == 0
    return {"run": run, "losses": losses(run), "weights": weights_sha(run)}


@pytest.fixture
def hooks():
    from minispin.run.resume import add_hook, clear_hooks
    yield add_hook
    clear_hooks()


def signal_self_after_step(add_hook, n, sig):
    add_hook("step_end", lambda trainer, done: os.kill(os.getpid(), sig) if done == n else None)


# ---------------------------------------------------------------------- signals, one process
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_during_training_saves_a_checkpoint_and_the_rerun_resumes_bit_identically(
        model, base, tmp_path, capsys, hooks, sig):
    run = fresh(base, tmp_path)
    signal_self_after_step(hooks, 3, sig)   # checkpoints every 2 steps: step 3 is saved only for the stop
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    from minispin.run.resume import clear_hooks
    clear_hooks()
    name = signal.Signals(sig).name
    assert rc == 128 + sig, (rc, err)
    assert len(err) == 1 and f"stopped by {name} after step 3 of 4" in err[0], err
    assert "step_3 saved on every rank" in err[0] and "re-run the same command to resume" in err[0]
    assert sorted(os.listdir(os.path.join(run, "iter0", "ckpt"))) == ["step_2", "step_3"]
    assert not os.path.exists(os.path.join(run, ".minispin.lock"))    # the lock is released
    assert not os.path.exists(os.path.join(run, "iter0", "model"))
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    assert rc == 0, err
    assert "resumed from" in out and "step_3" in out
    assert losses(run) == base["losses"]
    assert weights_sha(run) == base["weights"]


@pytest.mark.slow
def test_a_stop_signal_during_the_reference_pass_stops_at_once_and_the_rerun_is_bit_identical(
        model, base, tmp_path, capsys, hooks):
    """SIGTERM after 3 reference records (an odd number: the second batch of 2 is half
    cached): one line, exit 143; the re-run computes that batch whole, so its pairs get the
    padding and rounding of the uninterrupted run: the first loss and the weights are equal."""
    run = fresh(base, tmp_path)
    hooks("ref_record", lambda reference, n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None)
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    from minispin.run.resume import clear_hooks
    clear_hooks()
    assert rc == 143 and len(err) == 1 and "stopped by SIGTERM" in err[0], (rc, err)
    with open(os.path.join(run, "iter0", "ref_logps.jsonl")) as f:
        assert len(f.read().splitlines()) == 3
    assert not os.path.exists(os.path.join(run, "iter0", "metrics.jsonl"))
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    assert rc == 0, err
    assert "(3 cached)" not in out and "(2 cached)" in out   # the half-cached batch is computed whole
    assert losses(run) == base["losses"]
    assert weights_sha(run) == base["weights"]
    with open(os.path.join(run, "iter0", "ref_logps.jsonl")) as a, \
            open(os.path.join(base["run"], "iter0", "ref_logps.jsonl")) as b:
        first = {}
        for line in b:
            r = json.loads(line)
            first[r["key"]] = (r["real"], r["generated"])
        for line in a:   # every record, also the one written twice, equals the uninterrupted run's
            r = json.loads(line)
            assert (r["real"], r["generated"]) == first[r["key"]]


@pytest.mark.slow
def test_a_stop_signal_during_generation_exits_with_one_line_and_the_rerun_samples_the_same_pairs(
        model, tmp_path, capsys, monkeypatch):
    import minispin.run.pairs as pairs
    flags = ["--model", model, "--device", "cpu", "--no-progress", "--num-prompts", "6", "--batch-size", "2",
             "--max-new-tokens", "6", "--max-length", "96", "--max-prompt-length", "64"]
    whole = str(tmp_path / "whole")
    assert run_cli("generate.py", *flags, "--run-dir", whole) == 0
    real_generate, calls = pairs.generate, []

    def generate_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:   # the first batch's lines are written by now
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*a, **k)
    monkeypatch.setattr(pairs, "generate", generate_then_signal)
    stopped = str(tmp_path / "stopped")
    rc, out, err = cli(capsys, "generate.py", *flags, "--run-dir", stopped)
    err = [x for x in err if "error:" in x]    # generate.py reports its progress on stderr too
    assert rc == 143 and len(err) == 1 and "stopped by SIGTERM" in err[0], (rc, err)
    assert not os.path.exists(os.path.join(stopped, "iter0", "pairs.jsonl"))
    with open(os.path.join(stopped, "iter0", "pairs.jsonl.part-0")) as f:
        assert len(f.read().splitlines()) == 2
    monkeypatch.setattr(pairs, "generate", real_generate)
    rc, out, err = cli(capsys, "generate.py", *flags, "--run-dir", stopped)
    assert rc == 0, err
    with open(os.path.join(whole, "iter0", "pairs.jsonl")) as a, \
            open(os.path.join(stopped, "iter0", "pairs.jsonl")) as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_a_stop_signal_during_the_held_out_check_is_finished_by_the_rerun(model, tmp_path, capsys, monkeypatch):
    """Training finished, the held-out check was stopped: no summary.json; the re-run says
    the iteration is trained, runs the check and writes the summary an uninterrupted run writes."""
    import minispin.study.heldout as heldout
    held = ["--heldout-examples", "2"]
    whole = str(tmp_path / "whole")
    write_pairs(os.path.join(whole, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", *args(model, whole, *held)) == 0
    real, calls = heldout.heldout_metrics, []

    def measure_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:   # θ_t measured (and cached), θ_{t+1} not yet
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(heldout, "heldout_metrics", measure_then_signal)
    run = str(tmp_path / "stopped")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    rc, out, err = cli(capsys, "train.py", *args(model, run, *held))
    assert rc == 143 and len(err) == 1 and "stopped by SIGTERM" in err[0], (rc, err)
    assert os.path.isfile(os.path.join(run, "iter0", "model", "config.json"))
    assert not os.path.exists(os.path.join(run, "iter0", "summary.json"))
    monkeypatch.setattr(heldout, "heldout_metrics", real)
    rc, out, err = cli(capsys, "train.py", *args(model, run, *held))
    assert rc == 0 and "already trained" in out, err
    with open(os.path.join(whole, "iter0", "summary.json")) as a, open(os.path.join(run, "iter0", "summary.json")) as b:
        assert json.load(a) == json.load(b)


# ---------------------------------------------------------------------- a finished iteration re-run
@pytest.mark.slow
def test_a_finished_iteration_rerun_with_other_settings_is_refused_naming_them(model, base, tmp_path, capsys):
    run = fresh(base, tmp_path)
    shutil.copytree(os.path.join(base["run"], "iter0", "model"), os.path.join(run, "iter0", "model"))
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    assert rc == 0 and "already trained" in out, err     # the same command: nothing to do
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--lr", "1e-2", "--beta", "0.5"))
    assert rc == 2 and len(err) == 1, (rc, err)
    assert "lr: 0.001 -> 0.01" in err[0] and "beta: 0.1 -> 0.5" in err[0] and "--force" in err[0]
    rc, out, err = cli(capsys, "train.py", *args("/nonexistent", run))
    assert rc == 2 and len(err) == 1 and "θ_t (/nonexistent) is not a model folder" in err[0], (rc, err)
    assert f"trained from θ_t = {model}" in err[0]
    pairs = os.path.join(run, "iter0", "pairs.jsonl")
    write_pairs(pairs, seed=1)
    rc, out, err = cli(capsys, "train.py", *args(model, run))
    assert rc == 2 and len(err) == 1 and f"the pairs of iter0 ({pairs}) changed" in err[0], (rc, err)
    os.remove(pairs)   # pairs no longer at hand: the settings are still compared
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--lr", "1e-2"))
    assert rc == 2 and len(err) == 1 and "lr: 0.001 -> 0.01" in err[0], (rc, err)
    shutil.copy(os.path.join(base["run"], "iter0", "pairs.jsonl"), pairs)
    marker = os.path.join(run, "iter0", "model", "minispin_export.json")
    with open(marker) as f:
        recorded = json.load(f)
    with open(marker, "w") as f:   # an export of an older minispin: no record, nothing to compare
        json.dump({k: v for k, v in recorded.items() if k != "training"}, f)
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--lr", "1e-2"))
    assert rc == 0 and "already trained" in out, err
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--lr", "1e-2", "--force"))
    assert rc == 0, err
    assert losses(run) != base["losses"]   # --force trained it again, with the new lr
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--lr", "1e-2"))
    assert rc == 0 and "already trained" in out, err


# ---------------------------------------------------------------------- θ_t replaced
@pytest.mark.slow
def test_other_weights_of_the_same_size_copied_into_theta_are_noticed(model, base, tmp_path, capsys):
    """iter0/model gets another model's weight file of the same size (a new mtime): the
    fingerprint is computed again, the reference log-probs too, and iteration 1's first loss
    is ln 2 (policy = reference), not the loss against the old θ_1's cached log-probs."""
    import torch
    from minispin.run.checkpoint import load_model, save_model
    run = fresh(base, tmp_path)
    shutil.copytree(os.path.join(base["run"], "iter0", "model"), os.path.join(run, "iter0", "model"))
    write_pairs(os.path.join(run, "iter1", "pairs.jsonl"), seed=2)
    assert run_cli("train.py", *args(model, run, "--iter", "1")) == 0
    assert abs(metrics(run, 1)[0]["loss"] - math.log(2)) < 1e-5
    other = str(tmp_path / "other")
    m = load_model(os.path.join(run, "iter0", "model"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(m, other)
    theta1 = os.path.join(run, "iter0", "model", "model.safetensors")
    assert os.path.getsize(os.path.join(other, "model.safetensors")) == os.path.getsize(theta1)
    shutil.copy(os.path.join(other, "model.safetensors"), theta1)
    rc, out, err = cli(capsys, "train.py", *args(model, run, "--iter", "1", "--force"))
    assert rc == 0, err
    assert abs(metrics(run, 1)[0]["loss"] - math.log(2)) < 1e-5, metrics(run, 1)[0]["loss"]


# ---------------------------------------------------------------------- bad numbers
@pytest.mark.slow
def test_a_non_finite_reference_log_prob_stops_the_reference_pass_naming_theta_and_the_pair(
        model, tmp_path, capsys):
    """Finite weights whose logits overflow (a final norm of 3e38): the reference pass stops
    with one line naming θ_0 and the pair, and writes no NaN."""
    from safetensors.torch import load_file, save_file
    big = shutil.copytree(model, str(tmp_path / "overflow"))
    path = os.path.join(big, "model.safetensors")
    state = load_file(path)
    name = next(k for k in state if k.endswith("norm.weight") and "layers" not in k)
    state[name] = state[name] * 0 + 3e38
    save_file(state, path, metadata={"format": "pt"})
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    rc, out, err = cli(capsys, "train.py", *args(big, run))
    assert rc == 2 and len(err) == 1, (rc, err)
    assert f"θ_t = {big} gives pair iter0/p" in err[0] and "non-finite log-prob" in err[0]
    ref = os.path.join(run, "iter0", "ref_logps.jsonl")
    assert not os.path.exists(ref) or "NaN" not in open(ref).read()
    assert not os.path.exists(os.path.join(run, "iter0", "metrics.jsonl"))


# ---------------------------------------------------------------------- torchrun, 2 ranks on CPU
def torchrun(argv, fault=None, timeout=300):
    script = [os.path.join(REPO, "tests", "fault_train.py"), fault] if fault else [os.path.join(REPO, "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script, *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_rank_and_the_rerun_is_bit_identical(model, tmp_path):
    """SIGTERM to torchrun (as a scheduler sends it) after step 3: torchrun passes it to both
    ranks, they finish the step, save step_3 (both ranks' files) and exit 143 with one line;
    the same command resumes and ends with the losses and weights of an uninterrupted
    2-process run."""
    whole = str(tmp_path / "whole")
    write_pairs(os.path.join(whole, "iter0", "pairs.jsonl"))
    r = torchrun(args(model, whole))
    assert r.returncode == 0, r.stderr[-3000:]
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    r = torchrun(args(model, run), fault="term@3")
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "stopped by SIGTERM" in x]
    assert len(lines) == 2 and all("after step 3 of 4" in x and "step_3 saved" in x for x in lines), r.stderr[-3000:]
    step3 = os.path.join(run, "iter0", "ckpt", "step_3")
    assert {n for n in os.listdir(step3) if "rank" in n} >= {"rank0.safetensors", "rank1.safetensors"}, os.listdir(step3)
    assert not os.path.exists(os.path.join(run, ".minispin.lock"))
    r = torchrun(args(model, run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    assert losses(run) == losses(whole)
    assert weights_sha(run) == weights_sha(whole)


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_within_dist_timeout_naming_it(model, tmp_path):
    run = str(tmp_path / "run")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    t0 = time.monotonic()
    r = torchrun(args(model, run, "--dist-timeout", "5"), fault="stall@2", timeout=240)
    took = time.monotonic() - t0
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "stopped answering" in x]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "rank 0: rank 1 of 2 stopped answering" in lines[0] and "dist_timeout = 5 s" in lines[0]
    assert "exitcode  : 1 (pid" in r.stderr   # torchrun's report of rank 0: a stopped run's status
    assert took < 120, took


def test_dist_timeout_is_a_checked_recipe_key(capsys):
    rc, out, err = cli(capsys, "train.py", "--dist-timeout", "0")
    assert rc == 2 and len(err) == 1 and "dist_timeout" in err[0], (rc, err)


@pytest.mark.slow
def test_a_finished_sft_run_rerun_with_other_settings_is_refused_naming_them(model, tmp_path, capsys):
    data = str(tmp_path / "sft.jsonl")
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"say {i}", "completion": " ".join(WORDS[i:i + 6])}) + "\n")
    sft = args(model, str(tmp_path / "run"), "--sft", "--data", data)
    assert run_cli("train.py", *sft) == 0
    rc, out, err = cli(capsys, "train.py", *sft)
    assert rc == 0 and "already trained" in out, err
    rc, out, err = cli(capsys, "train.py", *sft, "--lr", "1e-2")
    assert rc == 2 and len(err) == 1 and "lr: 0.001 -> 0.01" in err[0] and "--force" in err[0], (rc, err)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "say more", "completion": "the cat sat"}) + "\n")
    rc, out, err = cli(capsys, "train.py", *sft)
    assert rc == 2 and len(err) == 1 and f"the examples of sft ({data}) changed" in err[0], (rc, err)
