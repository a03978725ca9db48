"""train.py end to end on CPU (gloo): 1 process, torchrun 2 processes, two "nodes" over c10d,
precomputed vs online reference, kill + resume, NaN stop, export into transformers, iterations,
SFT, bad input. A tiny random Llama (2 layers, d=64) keeps each run at a few seconds.

Tolerance for "the same losses" across process counts / reference modes: 1e-5 absolute on
each step's loss (observed: < 1e-6). Batches are padded differently (a micro-batch is padded
to its own longest row, the precompute pass groups pairs by length), so float32 sums differ
in the last bits; the data order and the maths are the same.
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, STORIES, free_port, make_hf_model, run_cli, undocumented_flags


class train:  # the train.py command, run in this process
    main = staticmethod(lambda args: run_cli("train.py", *args))

WORDS = ("the cat sat on a mat and then ran to see dog bird tree sun moon star red blue "
         "big small happy sad jumped over under").split()
TOL = 1e-5


def write_pairs(path, n=16, seed=0, drop_field=None, drop_line=None):
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"p{i}",
                   "prompt": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))}],
                   "real": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))),
                   "generated": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))), "gen": {}}
            if drop_line == i + 1:
                rec.pop(drop_field)
            f.write(json.dumps(rec) + "\n")
    return path


def metrics(run_dir, t=0, sub=None):
    path = os.path.join(run_dir, sub or f"iter{t}", "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def common(model):
    return ["--model", model, "--batch-size", "4", "--micro-batch-size", "1", "--max-length", "80",
            "--max-prompt-length", "48", "--lr", "1e-3", "--epochs", "2", "--checkpoint-every", "3",
            "--device", "cpu", "--no-progress"]


def assert_same_losses(a, b, tol=TOL, first=None):
    a, b = a[:first], b[:first]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
        assert abs(x["rewards/margins"] - y["rewards/margins"]) <= 10 * tol
        assert x["rewards/accuracies"] == y["rewards/accuracies"]



def env_for_subprocess(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def torchrun(args, nproc=2, env=None, timeout=240, extra=("--standalone",), fault=None):
    """train.py under torchrun; fault="kill@N" runs it through tests/fault_train.py, which
    installs a trainer hook that SIGKILLs rank 0 after step N."""
    script = ([os.path.join(REPO, "tests", "fault_train.py"), fault] if fault
              else [os.path.join(REPO, "train.py")])
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc_per_node", str(nproc),
           *script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or env_for_subprocess(), capture_output=True,
                          text=True, timeout=timeout)



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = str(root / "model")
    # sharpen=1: unsharpened attention, as these tests compare process counts, where fp32
    # reduction order differs; sharper scores amplify it past TOL by step 7
    make_hf_model(model, "llama", sharpen=1.0)
    pairs = write_pairs(str(root / "pairs.jsonl"))
    base = str(root / "base")
    write_pairs(os.path.join(base, "iter0", "pairs.jsonl"))
    rc = train.main(common(model) + ["--run-dir", base, "--keep-checkpoints-after-export"])
    assert rc == 0
    return {"root": root, "model": model, "pairs": pairs, "base": base, "base_metrics": metrics(base)}


def fresh_run(setup, name):
    run = str(setup["root"] / name)
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(os.path.join(run, "iter0"))
    shutil.copy(setup["pairs"], os.path.join(run, "iter0", "pairs.jsonl"))
    return run


# ---------------------------------------------------------------------- numbers
@pytest.mark.slow
def test_step0_loss_is_ln2_and_online_equals_precompute(setup):
    base = setup["base_metrics"]
    assert len(base) == 8  # 16 pairs / batch 4 = 4 steps per epoch, 2 epochs
    # precompute: the reference pass batches pairs differently -> last-bit differences
    assert abs(base[0]["loss"] - math.log(2)) < 1e-6
    run = fresh_run(setup, "online")
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--ref-mode", "online"]) == 0
    online = metrics(run)
    # online: same rows, same weights -> Δ = 0 exactly -> ln 2 in float32
    assert online[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert_same_losses(online, base)
    assert base[-1]["loss"] != base[0]["loss"]  # it trained
    assert not os.path.exists(os.path.join(run, "iter0", "ref_logps.jsonl"))
    refs = [json.loads(line) for line in open(os.path.join(setup["base"], "iter0", "ref_logps.jsonl"))]
    assert len(refs) == 16 and all(r["key"].startswith("iter0/") for r in refs)


@pytest.mark.slow
def test_activation_checkpointing_same_losses(setup):
    run = fresh_run(setup, "ac")
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--activation-checkpointing",
                                                "--max-steps", "3"]) == 0
    # max_steps changes the schedule length, so compare against a plain run of 3 steps too
    run2 = fresh_run(setup, "noac")
    assert train.main(common(setup["model"]) + ["--run-dir", run2, "--max-steps", "3"]) == 0
    a, b = metrics(run), metrics(run2)
    assert_same_losses(a, b, tol=1e-6)
    for x, y in zip(a, b):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_compile_train_same_losses(setup):
    """--compile-train (each block through torch.compile's inductor, then FSDP2) trains the
    eager run's losses within TOL over 4 steps: the reference pass (eval, no grad) and the
    policy's forward and backward all go through the compiled blocks."""
    run = fresh_run(setup, "compiled")
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--compile-train", "--max-steps", "4"]) == 0
    run2 = fresh_run(setup, "eager4")
    assert train.main(common(setup["model"]) + ["--run-dir", run2, "--max-steps", "4"]) == 0
    a, b = metrics(run), metrics(run2)
    assert len(a) == 4
    assert_same_losses(a, b)
    for x, y in zip(a, b):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_compile_train_without_a_cpp_compiler_is_one_clear_line(setup, monkeypatch, capsys):
    """On the CPU inductor needs a C++ compiler: without one, train.py says so in one line
    (exit 2) before any step, instead of inductor's traceback at the first forward."""
    import torch._inductor.cpp_builder as builder

    def missing():
        raise RuntimeError("Failed to find C++ compiler. Please specify via CXX environment variable.")
    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    run = fresh_run(setup, "nocxx")
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--compile-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs a C++ compiler" in err[-1] and "--compile-train" in err[-1], err[-3:]
    assert not os.path.exists(os.path.join(run, "iter0", "metrics.jsonl"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup):
    run = fresh_run(setup, "tr2")
    r = torchrun(common(setup["model"]) + ["--run-dir", run, "--micro-batch-size", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout
    ms = metrics(run)
    assert_same_losses(ms, setup["base_metrics"])
    for x, y in zip(ms, setup["base_metrics"]):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_match(setup):
    run = fresh_run(setup, "nodes")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minispin-test",
           os.path.join(REPO, "train.py"), *common(setup["model"]), "--run-dir", run,
           "--activation-checkpointing"]   # sharded + checkpointed: still the same losses
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env_for_subprocess(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert any("on 2 process(es)" in out for out, _ in outs)
    assert_same_losses(metrics(run), setup["base_metrics"])


@pytest.mark.slow
def test_kill_midway_and_resume(setup):
    """SIGKILL rank 0 after step 5 (checkpoints at 3 and 6): the job dies; the same command
    resumes from step_3 and the remaining losses equal the uninterrupted run's."""
    run = fresh_run(setup, "kill")
    args = common(setup["model"]) + ["--run-dir", run, "--micro-batch-size", "2"]
    r = torchrun(args, fault="kill@5")
    assert r.returncode != 0
    ckpt = os.path.join(run, "iter0", "ckpt")
    assert sorted(os.listdir(ckpt)) == ["step_3"]
    assert len(metrics(run)) == 5  # steps 4 and 5 were logged, then lost with the crash
    assert not os.path.exists(os.path.join(run, "iter0", "model"))
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    ms = metrics(run)
    assert [m["step"] for m in ms] == list(range(1, 9))  # steps 4, 5 rewritten, none twice
    assert_same_losses(ms, setup["base_metrics"])
    assert os.path.isfile(os.path.join(run, "iter0", "model", "config.json"))


def nan_at(n):
    """A trainer hook: the loss of step n (1-based) becomes NaN."""
    from minispin.run.resume import add_hook
    add_hook("loss", lambda step, loss: loss * float("nan") if step + 1 == n else loss)


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(setup, capsys):
    from minispin.run.resume import clear_hooks
    run = fresh_run(setup, "nan")
    args = common(setup["model"]) + ["--run-dir", run, "--checkpoint-every", "2"]
    nan_at(5)
    try:
        assert train.main(args) == 1
    finally:
        clear_hooks()
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 5" in err and "step_4" in err and "left intact" in err
    ckpt = os.path.join(run, "iter0", "ckpt")
    assert sorted(os.listdir(ckpt)) == ["step_2", "step_4"]  # nothing after step 4, no .tmp
    assert len(metrics(run)) == 4 and not os.path.exists(os.path.join(run, "iter0", "model"))
    assert train.main(args) == 0  # the checkpoint is intact: the run resumes and finishes
    assert "resumed from" in capsys.readouterr().out
    assert_same_losses(metrics(run), setup["base_metrics"], tol=1e-6)


@pytest.mark.slow
def test_resume_refuses_changed_settings(setup, capsys):
    from minispin.run.resume import clear_hooks
    run = fresh_run(setup, "changed")
    args = common(setup["model"]) + ["--run-dir", run, "--checkpoint-every", "2"]
    nan_at(3)
    try:
        assert train.main(args) == 1
    finally:
        clear_hooks()
    capsys.readouterr()
    assert train.main(args + ["--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "beta: 0.1 -> 0.5" in err and "start fresh" in err and len(err.strip().splitlines()) == 1
    # regenerated pairs (another sample of y') under the same settings: refused, naming the file
    pairs = os.path.join(run, "iter0", "pairs.jsonl")
    write_pairs(pairs, seed=1)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"the pairs of iter0 ({pairs}) changed" in err and "start fresh" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_pair_noise_reaches_the_reference_and_precompute_equals_online(setup):
    """A pair's "noise" σ (set by the noise/adaptive modes) noises the REFERENCE logits of
    its real answer with a frozen per-pair draw: precomputed and online references agree,
    noised pairs move the step-1 loss away from ln 2, clean pairs do not."""
    recs = [json.loads(line) for line in open(setup["pairs"])]
    for i, r in enumerate(recs):
        r["noise"] = 0.5 if i % 2 == 0 else 0.0
    out = []
    for mode in ("precompute", "online"):
        run = fresh_run(setup, f"noise-{mode}")
        with open(os.path.join(run, "iter0", "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        assert train.main(common(setup["model"]) + ["--run-dir", run, "--ref-mode", mode,
                                                    "--max-steps", "2"]) == 0
        out.append(metrics(run))
    assert_same_losses(out[0], out[1])
    assert abs(out[0][0]["loss"] - math.log(2)) > 1e-3
    refs = {json.loads(line)["key"]: json.loads(line) for line in
            open(os.path.join(setup["root"], "noise-precompute", "iter0", "ref_logps.jsonl"))}
    clean = {json.loads(line)["key"]: json.loads(line) for line in
             open(os.path.join(setup["base"], "iter0", "ref_logps.jsonl"))}
    for i in range(16):
        k = f"iter0/p{i}"
        if i % 2:
            assert abs(refs[k]["real"] - clean[k]["real"]) < 1e-4
        else:
            assert abs(refs[k]["real"] - clean[k]["real"]) > 1e-3
        assert abs(refs[k]["generated"] - clean[k]["generated"]) < 1e-4  # side "real" only


@pytest.mark.slow
def test_mistral_sliding_window_trains_and_exports(tmp_path):
    """A Mistral whose window (16) is shorter than the rows: precompute == online, and the
    export equals transformers' logits past the window."""
    from transformers import AutoModelForCausalLM
    from minispin import load_model
    model = str(tmp_path / "mistral")
    make_hf_model(model, "mistral", num_key_value_heads=2, sliding_window=16)
    runs = []
    for mode in ("precompute", "online"):
        run = str(tmp_path / mode)
        write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
        assert train.main(common(model) + ["--run-dir", run, "--ref-mode", mode, "--max-steps", "2"]) == 0
        runs.append(run)
    assert_same_losses(metrics(runs[0]), metrics(runs[1]))
    out = os.path.join(runs[0], "iter0", "model")
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        b = load_model(out)(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- outputs
def test_export_loads_in_transformers_with_equal_logits(setup):
    from transformers import AutoModelForCausalLM
    from minispin import load_model
    out = os.path.join(setup["base"], "iter0", "model")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out)
    first = load_model(setup["model"])
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hf(ids).logits
        b = ours(ids)
        c = first(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (b - c).abs().max() > 1e-3  # the export is the trained model, not θ_0
    # the ckpt folder was kept on request; its newest step is the last one
    assert os.path.isdir(os.path.join(setup["base"], "iter0", "ckpt", "step_8"))
    info = json.load(open(os.path.join(setup["base"], "iter0", "train_info.json")))
    assert info["total_steps"] == 8 and info["accumulation"] == 4


def test_rerun_of_a_finished_iteration_is_skipped(setup, capsys):
    assert train.main(common(setup["model"]) + ["--run-dir", setup["base"]]) == 0
    assert "already trained" in capsys.readouterr().out


def test_next_step_commands_are_spelt_as_the_run_was_started(monkeypatch):
    from minispin.run.iteration import command
    from minispin.run.recipe import resolve
    recipe = resolve()
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert command(recipe, "generate.py", 1) == "python generate.py --iter 1"
    assert command(recipe, "judge.py", 1, world=8) == "torchrun --nproc_per_node 8 judge.py --iter 1"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/minispin-train"])
    assert command(recipe, "generate.py", 1) == "minispin-generate --iter 1"
    assert command(recipe, "train.py", 0, world=8) == "torchrun --nproc_per_node 8 -m minispin.cli.train --iter 0"


@pytest.mark.slow
def test_iteration_one_starts_from_theta1_and_mixes_iteration_zero(setup, capsys):
    run = str(setup["root"] / "iters")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(os.path.join(setup["base"], "iter0"), os.path.join(run, "iter0"),
                    ignore=shutil.ignore_patterns("ckpt"))
    base = common(setup["model"]) + ["--run-dir", run]
    # missing pairs: the message is the command that makes them
    assert train.main(base + ["--iter", "1", "--no-generate"]) == 2
    err = capsys.readouterr().err
    assert "iter1/pairs.jsonl not found" in err and "python generate.py --iter 1 --run-dir" in err
    assert "--generate" in err
    # θ_2 does not exist yet
    assert train.main(base + ["--iter", "2"]) == 2
    assert "train iteration 1 first" in capsys.readouterr().err
    write_pairs(os.path.join(run, "iter1", "pairs.jsonl"), seed=1)
    assert train.main(base + ["--iter", "1", "--max-steps", "2"]) == 0
    info = json.load(open(os.path.join(run, "iter1", "train_info.json")))
    assert info["theta"] == os.path.join(run, "iter0", "model")
    assert {k: v["pairs"] for k, v in info["sources"].items()} == {"iter1": 16, "iter0": 16}
    keys = {json.loads(line)["key"].split("/")[0] for line in open(os.path.join(run, "iter1", "ref_logps.jsonl"))}
    assert keys == {"iter0", "iter1"}  # the reference θ_1 scores both iterations' pairs
    ms = metrics(run, 1)
    assert abs(ms[0]["loss"] - math.log(2)) < 1e-6  # policy starts as its reference again
    # without mixing
    assert train.main(base + ["--iter", "1", "--max-steps", "1", "--no-mix-previous", "--force",
                              "--out", os.path.join(run, "nomix")]) == 0
    info = json.load(open(os.path.join(run, "iter1", "train_info.json")))
    assert list(info["sources"]) == ["iter1"]


@pytest.mark.slow
def test_sft_mode_learns_the_real_answers(tmp_path, setup):
    data = tmp_path / "sft.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"say {i}", "completion": " ".join(rng.choices(WORDS[:6], k=8))}) + "\n")
    run = str(tmp_path / "run")
    args = common(setup["model"]) + ["--sft", "--run-dir", run, "--data", str(data), "--epochs", "4",
                                     "--optimizer", "adamw", "--lr", "3e-3", "--warmup-ratio", "0"]
    assert train.main(args) == 0
    ms = metrics(run, sub="sft")
    assert len(ms) == 16 and ms[-1]["loss"] < 0.6 * ms[0]["loss"]
    assert os.path.isfile(os.path.join(run, "sft", "model", "config.json"))


# ---------------------------------------------------------------------- bad input
def test_pairs_line_without_required_field_names_file_and_line(tmp_path, setup, capsys):
    run = str(tmp_path / "bad")
    path = write_pairs(os.path.join(run, "iter0", "pairs.jsonl"), drop_field="generated", drop_line=3)
    assert train.main(common(setup["model"]) + ["--run-dir", run]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: pair is missing required field 'generated'" in err


@pytest.mark.slow
def test_truncation_is_applied_and_counted(tmp_path, setup, capsys):
    run = str(tmp_path / "trunc")
    path = write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    recs = [json.loads(line) for line in open(path)]
    recs[0]["prompt"][0]["content"] = " ".join(["cat"] * 200)   # long prompt -> keeps its end
    recs[1]["real"] = " ".join(["dog"] * 300)                   # long real answer -> cut
    recs[2]["generated"] = " ".join(["sun"] * 300)              # long generated answer -> cut
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--max-steps", "1",
                                                "--max-length", "128", "--max-prompt-length", "64"]) == 0
    out = capsys.readouterr().out
    info = json.load(open(os.path.join(run, "iter0", "train_info.json")))
    t = info["truncation"]
    assert (t["truncated_prompts"], t["truncated_real"], t["truncated_generated"]) == (1, 1, 1)
    assert "1 prompts, 1 real and 1 generated answers cut of 16 pairs" in out
    # the rule itself, on the same records
    from minispin.run.rows import tokenize_pairs
    from minispin.run.tokenizer import load_tokenizer
    tok = load_tokenizer(setup["model"])
    items, _ = tokenize_pairs(tok, recs[:3], "x", 128, 64)
    full_prompt, _ = tok.encode_chat(recs[0]["prompt"], add_generation_prompt=True, empty_system=True)
    assert items[0].prompt == [tok.bos_id] + full_prompt[-63:]          # <s> + the END
    assert items[0].prompt[-3:] == full_prompt[-3:]                     # "<|assistant|>\n" kept
    for it in items:
        assert len(it.prompt) + max(len(it.real), len(it.generated)) <= 128
    assert items[1].real[-1] != tok.eos_id and items[1].generated[-1] == tok.eos_id


def test_batch_size_must_divide(setup, capsys):
    run = str(setup["root"] / "div")
    write_pairs(os.path.join(run, "iter0", "pairs.jsonl"))
    assert train.main(common(setup["model"]) + ["--run-dir", run, "--micro-batch-size", "3"]) == 2
    assert "not a multiple" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--iter", "--sft", "--lr", "--batch-size", "--relabel", "--noise", "--dump-rows"):
        assert flag in text
    assert undocumented_flags(text) == []


# ---------------------------------------------------------------------- a small real task
@pytest.mark.slow
def test_spin_on_stories260k_loss_falls_and_accuracy_rises(tmp_path):
    """stories260K, its own samples y' for 32 GSM8K prompts vs the real answers y: SPIN learns
    to tell them apart — the loss falls from ln 2 and rewards/accuracies rises."""
    from minispin import generate, load_model, load_tokenizer
    from minispin.run.data import read_sft
    examples, _ = read_sft(os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl"), limit=32)
    tok = load_tokenizer(STORIES)
    model = load_model(STORIES)
    prompts = [tok.encode_chat(e.prompt, add_generation_prompt=True, empty_system=True)[0][-40:]
               for e in examples]
    outs = generate(model, prompts, max_new_tokens=24, temperature=1.0, eos_id=tok.eos_id, seed=0)
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "iter0"))
    with open(os.path.join(run, "iter0", "pairs.jsonl"), "w") as f:
        for e, o in zip(examples, outs):
            f.write(json.dumps({"id": e.id, "prompt": e.prompt, "real": e.real,
                                "generated": tok.decode(o), "gen": {}}) + "\n")
    args = ["--model", STORIES, "--run-dir", run, "--batch-size", "8", "--micro-batch-size", "8",
            "--max-length", "96", "--max-prompt-length", "48", "--epochs", "3", "--device", "cpu",
            "--no-progress", "--checkpoint-every", "100"]   # the tiny recipe's RMSprop, lr 5e-5, β 0.1
    assert train.main(args) == 0
    ms = metrics(run)
    assert len(ms) == 12
    assert abs(ms[0]["loss"] - math.log(2)) < 1e-5
    late = ms[-4:]
    assert sum(m["loss"] for m in late) / 4 < 0.5
    assert sum(m["rewards/accuracies"] for m in late) / 4 >= 0.8 > ms[0]["rewards/accuracies"]
    assert sum(m["rewards/margins"] for m in late) / 4 > 0.5
