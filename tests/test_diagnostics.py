"""Per-iteration diagnostics (minispin/study/diagnostics.py), recomputed independently: the
log-probs with transformers' own forward and a hand-written log-softmax, the text numbers
with code written here, from the files a tiny-model run leaves."""
import glob
import json
import math
import os
import shutil
from collections import Counter

import pytest
import torch

from helpers import REPO, run_cli

TINY = os.path.join(REPO, "configs", "tiny.toml")
SMALL = {"\nmax_new_tokens = 256": "\nmax_new_tokens = 40", "num_prompts = 64": "num_prompts = 8",
         "heldout_examples = 100": "heldout_examples = 6", "heldout_max_new_tokens = 256": "heldout_max_new_tokens = 40",
         "batch_size = 8 ": "batch_size = 4 ", "lr = 5e-6 ": "lr = 3e-4 "}
BETA, SEED = 0.1, 42


def small_recipe(folder) -> str:
    """configs/tiny.toml with fewer prompts, shorter answers and a learning rate that moves
    the 260K model in 4 steps."""
    text = open(TINY).read()
    for old, new in SMALL.items():
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(folder, "small.toml")
    with open(path, "w") as f:
        f.write(text.replace('model = "assets/', f'model = "{REPO}/assets/').replace('data = "assets/', f'data = "{REPO}/assets/')
                .replace('eval_data = "assets/', f'eval_data = "{REPO}/assets/'))
    return path


# ---------------------------------------------------------------------- pure functions
def test_distinct_2_counts_unique_word_bigrams_over_all_bigrams_within_each_text():
    from minispin.study.diagnostics import distinct_2
    # "a b a b": (a,b) (b,a) (a,b); "b a": (b,a); no bigram across the two texts
    assert distinct_2(["a b a b", "b a"]) == pytest.approx(2 / 4)
    assert distinct_2(["one"]) != distinct_2(["one"])   # no bigram at all: NaN


def test_reward_stats_and_kl_follow_their_definitions():
    from minispin.study.diagnostics import kl_per_token, mean_per_token, reward_stats
    # r(y) = 0.1*(−1 − −2) = 0.1, r(y') = 0.1*(−5 − −3) = −0.2: margin 0.3; second pair −0.1
    acc, margin = reward_stats([-1.0, -4.0], [-2.0, -4.0], [-5.0, -3.0], [-3.0, -4.0], 0.1)
    assert acc == 0.5 and margin == pytest.approx((0.3 - 0.1) / 2)
    assert kl_per_token([-1.0, -2.0], [-2.0, -2.5], [2, 3]) == pytest.approx(1.5 / 5)
    assert mean_per_token([-4.0, -3.0], [2, 3]) == pytest.approx((-2.0 - 1.0) / 2)


# ---------------------------------------------------------------------- a run, recomputed
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    recipe, run_dir = small_recipe(str(root)), str(root / "run")
    assert run_cli("train.py", "--config", recipe, "--run-dir", run_dir, "--no-progress") == 0
    return {"recipe": recipe, "run_dir": run_dir, "root": root}


def hf_logps(model, prompt, answer):
    """log p(answer | prompt) from transformers' logits, log-softmax by hand."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    logz = torch.logsumexp(logits, dim=-1)
    return float((logits[torch.arange(len(answer)), torch.tensor(answer)] - logz).sum())


@pytest.mark.slow
def test_every_diagnostic_equals_its_recomputation_from_the_run_files_and_transformers(run):
    from transformers import AutoModelForCausalLM

    from minispin import load_model, load_tokenizer
    from minispin.run.data import read_pairs, read_sft
    from minispin.run.pairs import decode_answer
    from minispin.run.rows import tokenize_pairs, tokenize_sft
    from minispin.core.sampling import generate, row_seed
    work = os.path.join(run["run_dir"], "iter0")
    diag = json.load(open(os.path.join(work, "summary.json")))["diagnostics"]
    theta0, theta1 = f"{REPO}/assets/models/tiny-sft", os.path.join(work, "model")
    hf0, hf1 = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (theta0, theta1))
    tok = load_tokenizer(theta0)

    pairs = read_pairs(os.path.join(work, "pairs.jsonl"))
    items, stats = tokenize_pairs(tok, pairs, "iter0", 512, 256)
    assert stats.generated == 0 and stats.real == 0
    for side in ("real", "generated"):
        for name, hf in (("before", hf0), ("after", hf1)):
            per_token = [hf_logps(hf, p.prompt, getattr(p, side)) / len(getattr(p, side)) for p in items]
            assert diag[f"logp_{side}_{name}"] == pytest.approx(sum(per_token) / len(per_token), abs=1e-4)
    assert diag["logp_real_after"] != pytest.approx(diag["logp_real_before"], abs=1e-3)   # θ_1 moved
    lengths = [len(tok.encode(p["generated"], continuation=True)) + 1 for p in pairs]       # + eos
    assert diag["generated_length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    bigrams = Counter(b for p in pairs for b in zip(p["generated"].split(), p["generated"].split()[1:]))
    assert diag["generated_distinct_2"] == pytest.approx(len(bigrams) / sum(bigrams.values()))

    # held-out: y' ~ θ_0 as the recipe samples (T = 1, seed 42 per example id), then the reward
    examples, _ = read_sft(f"{REPO}/assets/data/gsm8k/test.jsonl", limit=6)
    prompts = [it.prompt for it in tokenize_sft(tok, examples, 512, 256)[0]]
    m0 = load_model(theta0)
    ys = generate(m0, prompts, 40, temperature=1.0, eos_id=tok.eos_ids, seeds=[row_seed(SEED, e.id) for e in examples])
    held = [{"id": e.id, "prompt": e.prompt, "real": e.real, "generated": decode_answer(tok, y)}
            for e, y in zip(examples, ys)]
    margins = []
    for p in tokenize_pairs(tok, held, "heldout", 512, 256)[0]:
        r_real = BETA * (hf_logps(hf1, p.prompt, p.real) - hf_logps(hf0, p.prompt, p.real))
        r_gen = BETA * (hf_logps(hf1, p.prompt, p.generated) - hf_logps(hf0, p.prompt, p.generated))
        margins.append(r_real - r_gen)
    assert diag["reward_accuracy_heldout"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert diag["reward_margin_heldout"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    # KL(θ_1 ‖ θ_0): θ_1's own samples at T = 1 (seed 43), eos counted when it was sampled
    m1 = load_model(theta1)
    samples = generate(m1, prompts, 40, temperature=1.0, eos_id=tok.eos_ids,
                       seeds=[row_seed(SEED + 1, e.id) for e in examples])
    samples = [s + [tok.eos_id] if len(s) < 40 else s for s in samples]
    diff = sum(hf_logps(hf1, p, s) - hf_logps(hf0, p, s) for p, s in zip(prompts, samples))
    assert diag["kl_heldout"] == pytest.approx(diff / sum(map(len, samples)), abs=1e-5)
    assert "judge_prefers_generated" not in diag   # no judging in this run


@pytest.mark.slow
def test_judge_keys_come_from_the_judged_file_and_noised_or_bf16_reference_values_are_recomputed(run, capsys):
    """A judged file of this iteration's pairs gives the judge keys; with reference noise, or
    from a bf16 pass, the stored reference values are not fp32 log p_θt, so they are
    recomputed (here they are made garbage first)."""
    from minispin.run import recipe as R
    from minispin.study.diagnostics import iteration_diagnostics
    run_dir = str(run["root"] / "noised")
    shutil.copytree(run["run_dir"], run_dir)
    work = os.path.join(run_dir, "iter0")
    pairs = [json.loads(line) for line in open(os.path.join(work, "pairs.jsonl"))]
    scores = [(7, 3), (2, 9), (5, 5), (1, 8), (4, None), (6, 2), (3, 4), (8, 1)]   # (real, generated)
    with open(os.path.join(work, "judged.jsonl"), "w") as f:
        for p, (r, g) in zip(pairs, scores):
            f.write(json.dumps(dict(p, scores={"real": r, "generated": g})) + "\n")
    scored = [(r, g) for r, g in scores if g is not None]
    plain = json.load(open(os.path.join(work, "summary.json")))["diagnostics"]
    ref = os.path.join(work, "ref_logps.jsonl")
    recs = [json.loads(line) for line in open(ref)]
    with open(ref, "w") as f:
        for rec in recs:
            f.write(json.dumps(dict(rec, real=-999.0, generated=-999.0)) + "\n")
    recipe = R.resolve(run["recipe"], {"run_dir": run_dir, "noise": "ref-logit=0.5,side=real",
                                       "heldout_examples": 0}, iteration=0)
    diag = iteration_diagnostics(recipe, 0)
    assert diag["judge_prefers_generated"] == pytest.approx(sum(g > r for r, g in scored) / len(scored))
    assert diag["judge_margin_mean"] == pytest.approx(sum(g - r for r, g in scored) / len(scored))
    assert "logp_real_before" not in diag   # no held-out check: no model-based keys
    recipe = R.resolve(run["recipe"], {"run_dir": run_dir, "noise": "ref-logit=0.5,side=real"}, iteration=0)
    diag = iteration_diagnostics(recipe, 0)
    for key in ("logp_real_before", "logp_generated_before", "logp_real_after", "kl_heldout"):
        assert diag[key] == pytest.approx(plain[key], abs=1e-5)
    assert not math.isnan(diag["judge_margin_mean"])
    # diagnostics = false: the held-out check still runs, the model-based keys are not measured
    recipe = R.resolve(run["recipe"], {"run_dir": run_dir, "diagnostics": False}, iteration=0)
    diag = iteration_diagnostics(recipe, 0)
    assert set(diag) == {"generated_length_mean", "generated_distinct_2", "judge_prefers_generated",
                         "judge_margin_mean"}, diag
    # a bf16 training pass's stored values are not the fp32 log p_θt either: recomputed too
    recipe = R.resolve(run["recipe"], {"run_dir": run_dir, "mixed_precision": "bf16"}, iteration=0)
    assert iteration_diagnostics(recipe, 0)["logp_generated_before"] == pytest.approx(plain["logp_generated_before"],
                                                                                      abs=1e-5)


@pytest.mark.slow
def test_diagnostics_and_sample_pairs_reach_tensorboard_as_scalars_and_text_and_wandb_as_a_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from test_tensorboard import read_events, wandb_records, write_pairs

    from helpers import make_hf_model
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_CONSOLE", "off"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(k, v)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    model, run_dir = str(tmp_path / "model"), str(tmp_path / "run")
    make_hf_model(model, "llama")
    write_pairs(os.path.join(run_dir, "iter0", "pairs.jsonl"))
    assert run_cli("train.py", "--model", model, "--run-dir", run_dir, "--batch-size", "4", "--micro-batch-size", "2",
                   "--max-length", "80", "--max-prompt-length", "48", "--lr", "1e-3", "--epochs", "1",
                   "--heldout-examples", "2", "--device", "cpu", "--no-progress",
                   "--report-to", "tensorboard,wandb") == 0
    work = os.path.join(run_dir, "iter0")
    summary = json.load(open(os.path.join(work, "summary.json")))
    diag, steps = summary["diagnostics"], summary["steps"]
    assert {"logp_real_after", "kl_heldout", "generated_distinct_2"} <= set(diag)
    pairs = [json.loads(line) for line in open(os.path.join(work, "pairs.jsonl"))][:3]
    logps = {r["key"]: r for r in map(json.loads, open(os.path.join(work, "pair_logps.jsonl")))}
    rewards = [(0.1 * (logps[f"iter0/{p['id']}"]["real_after"] - logps[f"iter0/{p['id']}"]["real_before"]))
               for p in pairs]

    acc = read_events(work)
    for key, value in diag.items():
        got = acc.Scalars(f"diagnostics/{key}")
        assert [e.step for e in got] == [steps] and got[0].value == pytest.approx(value, rel=1e-6), key
    assert acc.Scalars("heldout/answer_nll")[0].value == pytest.approx(summary["heldout"]["after"]["answer_nll"], rel=1e-6)
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    for p, r in zip(pairs, rewards):
        assert f"| {p['id']} | {p['prompt'][0]['content']} | {p['real']} | {p['generated']} |" in text
        assert f"{r:.4g}" in text

    files = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 2
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
               for f in files for rec in wandb_records(f) if rec.WhichOneof("record_type") == "history"]
    after = [h for h in history if "samples/path" in h]
    assert len(after) == 1 and after[0]["_step"] == steps
    assert any(h.get("diagnostics/kl_heldout") == pytest.approx(diag["kl_heldout"]) for h in history)
    table_path = glob.glob(os.path.join(work, "wandb", "offline-run-*", "files", after[0]["samples/path"]))
    table = json.load(open(table_path[0]))
    assert table["columns"][:4] == ["id", "prompt", "real", "generated"]
    assert [row[0] for row in table["data"]] == [p["id"] for p in pairs]
    assert [row[table["columns"].index("reward_real")] for row in table["data"]] == pytest.approx(rewards)


@pytest.mark.slow
def test_a_run_stopped_in_its_diagnostics_measures_them_when_run_again(run, tmp_path):
    """A summary written before the diagnostics (the run was killed in them) is not taken as
    finished: the same command writes the diagnostics, and nothing is trained again."""
    run_dir = str(tmp_path / "stopped")
    shutil.copytree(run["run_dir"], run_dir)
    path = os.path.join(run_dir, "iter0", "summary.json")
    full = json.load(open(path))
    json.dump({k: v for k, v in full.items() if k != "diagnostics"}, open(path, "w"))
    steps = len(open(os.path.join(run_dir, "iter0", "metrics.jsonl")).readlines())
    assert run_cli("train.py", "--config", run["recipe"], "--run-dir", run_dir, "--no-progress") == 0
    again = json.load(open(path))
    assert again["diagnostics"] == pytest.approx(full["diagnostics"])
    assert len(open(os.path.join(run_dir, "iter0", "metrics.jsonl")).readlines()) == steps
