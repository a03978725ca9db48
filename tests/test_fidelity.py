"""The faithful recipes against restatements of uclaml/SPIN and the study, token for token.

* --dump-rows under configs/spin-official-zephyr.toml equals an independent restatement of
  uclaml/SPIN's spin/alignment/data.py apply_chat_template + spin/alignment/utils.py
  tokenize_batch_element, written here with the `tokenizers` library on the checkpoint's own
  tokenizer.json (the 2023-layout Mistral file) as the tokenizer;
* SPIN's generation (spin/generate.py: "### Instruction:" prompt without special tokens, left
  padding with eos, greedy, decode and strip) equals transformers' generate;
* the study's noise, a fresh draw at every step, resumes to the same numbers.
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

from helpers import REPO, STORIES, run_cli

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MISTRAL_JSON = os.path.join(REPO, "assets", "tokenizers", "mistral-7b-v0.1.tokenizer.json")
GSM8K = os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl")
EOS = 2


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny random Mistral with the real Mistral vocabulary and tokenizer.json."""
    from transformers import MistralConfig, MistralForCausalLM
    path = str(tmp_path_factory.mktemp("fidelity") / "mistral")
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        sliding_window=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).float().eval()
    with torch.no_grad():  # sharp attention and a wide logit spread: greedy has no near-ties
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    shutil.copy(MISTRAL_JSON, os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 2048}, f)
    return path


def gsm8k(n):
    with open(GSM8K) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def fidelity_pairs():
    """≥ 60 pairs with the cases that matter: GSM8K answers (many with double spaces),
    prompts and answers over 512 tokens, leading/trailing whitespace, an empty answer."""
    recs = gsm8k(64)
    rng = random.Random(0)
    pairs = []
    for i, r in enumerate(recs):
        other = recs[(i + 7) % len(recs)]["answer"]
        q, real, gen = r["question"], r["answer"], other
        if i % 8 == 1:
            q = " ".join([q] * 12)                          # a prompt of > 512 tokens
        if i % 8 == 2:
            real = " ".join([real] * 8)                     # a real answer of > 512 tokens
        if i % 8 == 3:
            gen = " ".join([gen] * 8)                       # a generated answer of > 512 tokens
        if i % 8 == 4:
            real, gen = "  " + real + " \n", "\n" + gen + "  "  # leading/trailing whitespace
        if i % 8 == 5:
            gen = gen.replace(" ", "  ", 3)                 # more double spaces
        if i % 8 == 6:
            q, gen = q + "\n\n", ""                         # an empty generated answer
        if i % 8 == 7:
            real = real.replace("\n", "</s>\n", 1)          # an eos written inside an answer
        pairs.append({"id": f"g{i}", "prompt": [{"role": "user", "content": q}], "real": real,
                      "generated": gen, "gen": {}})
    rng.shuffle(pairs)
    return pairs


def tokenize_batch_element_restated(tk, pair_id, prompt, real, generated, max_length=1024, max_prompt_length=512):
    """uclaml/SPIN's tokenize_batch_element (the study's SPIN/spin/alignment/utils.py is the
    same), restated: each text tokenizer(text, add_special_tokens=False) alone; attention 0
    at every eos; eos appended to each answer; keep_end truncation of the prompt; answers cut
    to max_length - max_prompt_length; labels -100 on the prompt."""
    def tok(text):
        ids = tk.encode(text, add_special_tokens=False).ids
        return {"input_ids": ids, "attention_mask": [0 if i == EOS else 1 for i in ids]}

    c, r, p = tok(real), tok(generated), tok(prompt)
    for t in (c, r):
        t["input_ids"].append(EOS)
        t["attention_mask"].append(1)
    longer = max(len(c["input_ids"]), len(r["input_ids"]))
    if len(p["input_ids"]) + longer > max_length:
        p = {k: v[-max_prompt_length:] for k, v in p.items()}
    if len(p["input_ids"]) + longer > max_length:
        c = {k: v[:max_length - max_prompt_length] for k, v in c.items()}
        r = {k: v[:max_length - max_prompt_length] for k, v in r.items()}
    out = []
    for side, a in (("real", c), ("generated", r)):
        ids = p["input_ids"] + a["input_ids"]
        labels = [-100] * len(p["input_ids"]) + a["input_ids"]
        out.append({"id": pair_id, "side": side, "input_ids": ids, "labels": labels,
                    "attention_mask": p["attention_mask"] + a["attention_mask"]})
    return out


def spin_rows_restated(tk, pair, max_length=1024, max_prompt_length=512):
    """uclaml/SPIN's rows, restated: apply_chat_template (zephyr, system "" inserted; each
    answer rendered alone with the "<|assistant|>\\n" prefix stripped), then
    tokenize_batch_element."""
    prompt = f"<|system|>\n</s>\n<|user|>\n{pair['prompt'][0]['content']}</s>\n<|assistant|>\n"
    return tokenize_batch_element_restated(tk, pair["id"], prompt, f"{pair['real']}</s>\n",
                                           f"{pair['generated']}</s>\n", max_length, max_prompt_length)


def test_dump_rows_under_the_official_recipe_equal_spins_rows(mistral, tmp_path, capsys):
    pairs = fidelity_pairs()
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "rows.jsonl"
    rc = run_cli("train.py", "--config", "spin-official-zephyr", "--model", mistral, "--pairs", src,
                 "--dump-rows", out, "--run-dir", tmp_path / "run", "--device", "cpu", "--no-progress")
    assert rc == 0, capsys.readouterr().err
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    tk = tokenizers.Tokenizer.from_file(MISTRAL_JSON)
    want = [row for p in pairs for row in spin_rows_restated(tk, p)]
    assert len(ours) == len(want) == 2 * len(pairs) >= 120
    for a, b in zip(ours, want):
        assert (a["id"], a["side"]) == (b["id"], b["side"])
        for k in ("input_ids", "labels", "attention_mask"):
            assert a[k] == b[k], (a["id"], a["side"], k)
    # the cases are really there: truncated prompts, cut answers, masked eos, the "▁" after </s>
    assert any(len(r["input_ids"]) - sum(x == -100 for x in r["labels"]) == 512 for r in ours)
    assert sum(r["labels"].count(-100) == 512 for r in ours) >= 8
    assert all(r["input_ids"][0] != 1 for r in ours)                      # no <s>
    assert all(r["attention_mask"][r["input_ids"].index(EOS)] == 0 for r in ours)
    first = ours[0]["input_ids"]
    assert first[first.index(EOS) + 1] == tk.token_to_id("▁")             # "</s>", "▁", "<0x0A>"


def test_minispin_rows_differ_where_the_fidelity_table_says(mistral, tmp_path):
    """The default rows start with <s>, attend everywhere and encode the answer as the
    prompt's continuation — the differences docs/fidelity.md lists."""
    pairs = fidelity_pairs()[:4]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "rows.jsonl"
    assert run_cli("train.py", "--config", "spin-official-zephyr", "--rows", "minispin", "--model", mistral,
                   "--pairs", src, "--dump-rows", out, "--run-dir", tmp_path / "run", "--device", "cpu",
                   "--no-progress") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["input_ids"][0] == 1 and set(r["attention_mask"]) == {1} for r in rows)


@pytest.mark.slow
def test_spin_rows_train_with_transformers_log_probs(mistral, tmp_path, capsys):
    """Training on uclaml/SPIN's rows (attention 0 on every eos inside them): the reference
    pass's log-probs of θ_0 equal transformers' forward of the dumped rows with their
    attention_mask, and the first step's loss is ln 2."""
    from transformers import AutoModelForCausalLM
    pairs = fidelity_pairs()[:8]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run, rows = tmp_path / "run", tmp_path / "rows.jsonl"
    argv = ["--config", "spin-official-zephyr", "--model", mistral, "--pairs", src, "--run-dir", run,
            "--device", "cpu", "--no-progress", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-steps", "2", "--lr", "1e-3", "--max-length", "256", "--max-prompt-length", "128",
            "--checkpoint-every", "0", "--heldout-examples", "0", "--mixed-precision", "fp32",
            "--ref-mode", "precompute"]
    assert run_cli("train.py", *argv, "--dump-rows", rows) == 0, capsys.readouterr().err
    assert run_cli("train.py", *argv) == 0, capsys.readouterr().err
    ref = {}
    for line in (run / "iter0" / "ref_logps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ref[rec["key"]] = rec
    model = AutoModelForCausalLM.from_pretrained(mistral, dtype=torch.float32).eval()
    dumped = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(dumped) == 16 and any(0 in r["attention_mask"] for r in dumped)
    for r in dumped:
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.tensor([r["attention_mask"]])).logits[0]
        logp = torch.log_softmax(logits[:-1].double(), -1)
        counted = [t for t in range(1, len(r["labels"])) if r["labels"][t] != -100]
        want = float(sum(logp[t - 1, r["input_ids"][t]] for t in counted))
        got = ref[f"{r['source']}/{r['id']}"][r["side"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-3), (r["id"], r["side"])
    first = json.loads((run / "iter0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_spin_generation_equals_transformers_generate(mistral, tmp_path):
    """spin/generate.py on the same weights: the "### Instruction:" prompt tokenized without
    special tokens, left padding with eos (pad_to_multiple_of 8), greedy generate, then
    batch_decode, .replace("</s>", "") and .lstrip()."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from minispin.run import distributed as D
    from minispin.run.pairs import generate_pairs_file
    from minispin.run.recipe import resolve
    recs = gsm8k(12)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_new = 24
    recipe = resolve("spin-official-zephyr", {"model": mistral, "data": str(data), "num_prompts": 12,
                                              "max_new_tokens": n_new, "gen_batch_size": 5})
    env = D.init_distributed("cpu")
    try:
        out = tmp_path / "pairs.jsonl"
        generate_pairs_file(recipe, 0, env, out=str(out), progress=False)
    finally:
        D.close_distributed(env)
    ours = {p["real"]: p["generated"] for p in map(json.loads, out.read_text().splitlines())}

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(mistral, "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(mistral, dtype=torch.float32).eval()
    prompts = ["### Instruction: " + r["question"] + "\n\n### Response: " for r in recs]
    theirs = {}
    for i in range(0, len(prompts), 4):
        tok.padding_side = "left"
        enc = tok(prompts[i:i + 4], return_tensors="pt", padding="longest", pad_to_multiple_of=8,
                  add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=n_new, pad_token_id=tok.eos_token_id, do_sample=False)
        texts = tok.batch_decode([o[len(x):] for x, o in zip(enc["input_ids"], gen)])
        for r, t in zip(recs[i:i + 4], texts):
            theirs[r["answer"]] = t.replace("</s>", "").lstrip()
    assert ours == theirs
    assert len({t for t in ours.values()}) > 3  # not all the same string


@pytest.mark.slow
def test_fresh_noise_draws_anew_each_step_and_resumes_identically(tmp_path):
    """The study's noise: N(0, 0.5²) on the reference's real logits, a new draw at every step
    (online reference). Killed after step 3 and resumed, the run equals an uninterrupted one."""
    from test_fixes import make_pairs, write  # noqa: F401  (the fixes tests' synthetic pairs)
    common = ["--model", STORIES, "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "80",
              "--max-prompt-length", "48", "--lr", "1e-3", "--epochs", "2", "--checkpoint-every", "2",
              "--device", "cpu", "--no-progress", "--heldout-examples", "0", "--ref-mode", "online",
              "--noise", "ref-logit=0.5,side=real,mode=fresh"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    runs = {}
    for name in ("whole", "killed"):
        run = tmp_path / name
        write(str(run / "iter0" / "pairs.jsonl"), make_pairs())
        script = ["train.py"] if name == "whole" else ["tests/fault_train.py", "kill@3"]
        r = subprocess.run([sys.executable, *script, *common, "--run-dir", str(run)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        if name == "killed":
            assert r.returncode != 0 and not (run / "iter0" / "model").exists()
            r = subprocess.run([sys.executable, "train.py", *common, "--run-dir", str(run)], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
            assert "resumed from" in r.stdout
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = [json.loads(line) for line in (run / "iter0" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "tokens/s")} for m in ms]  # noqa: E731
    assert strip(runs["killed"]) == strip(runs["whole"])
    assert len(runs["whole"]) == 8
