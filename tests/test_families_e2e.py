"""The Llama-3 and Qwen2 families through the commands: generate, train, export, evaluate.

Each family is a tiny random transformers model with a byte-level BPE tokenizer.json
trained here with `tokenizers`, the checkpoint's own chat template (Llama-3.1's, Qwen2.5's)
and a generation_config.json that lists several stop ids and its own sampling defaults.
Oracles: transformers (the chat template's ids, the exported model's logits) and the
checkpoint's files (the sampling settings the run must record).
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from helpers import REPO, TINY, run_cli  # noqa: E402
from test_tokenizer_json import (BYTE_LEVEL_SPECIALS, LLAMA31, QWEN25,  # noqa: E402
                                 _train_byte_level, bundled_texts)
from minispin import load_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

GSM8K = os.path.join(REPO, "assets", "data", "gsm8k", "train.jsonl")
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # Llama-3-Instruct's own


def _family_folder(root, family, tok_json):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    vocab = tok_json["model"]["vocab"]
    ids = {t: vocab[t] for t in BYTE_LEVEL_SPECIALS}
    common = dict(TINY, vocab_size=len(vocab), max_position_embeddings=4096, num_key_value_heads=2)
    torch.manual_seed(0)
    if family == "llama3":
        stops = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
        hf = LlamaForCausalLM(LlamaConfig(**dict(
            common, head_dim=32, rope_theta=500000.0, bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})))
        tok_config = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA31)
    else:
        stops = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        hf = Qwen2ForCausalLM(Qwen2Config(**dict(
            common, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"])))
        tok_json = dict(tok_json, post_processor={"type": "ByteLevel", "add_prefix_space": False,
                                                  "trim_offsets": False, "use_regex": False})
        tok_config = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          chat_template=QWEN25)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)   # transformers starts them at 0, which would hide them
    folder = os.path.join(root, family)
    hf.float().eval().save_pretrained(folder)
    files = {"tokenizer.json": tok_json,
             "tokenizer_config.json": dict(tokenizer_class="PreTrainedTokenizerFast", **tok_config),
             "generation_config.json": dict(SAMPLING, eos_token_id=stops)}
    for name, data in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
    return folder, stops


@pytest.fixture(scope="module")
def byte_level():
    return _train_byte_level(bundled_texts()[:3000:2])


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def trained(request, byte_level, tmp_path_factory):
    """θ_0 of the family, and iteration 0 run on it by train.py (generating its pairs)."""
    root = str(tmp_path_factory.mktemp(request.param))
    theta0, stops = _family_folder(root, request.param, byte_level)
    recipe = os.path.join(root, "recipe.toml")
    with open(recipe, "w") as f:   # no sampling keys: generation_config.json's must apply
        f.write(f'name = "{request.param}"\nmodel = "{theta0}"\ndata = "{GSM8K}"\n'
                'num_prompts = 6\nmax_new_tokens = 24\nmax_length = 320\nmax_prompt_length = 256\n'
                'generate = true\nbatch_size = 4\nmicro_batch_size = 2\nmax_steps = 2\nlr = 1e-3\n'
                'checkpoint_every = 0\nheldout_examples = 0\n')
    run_dir = os.path.join(root, "run")
    argv = ["--config", recipe, "--run-dir", run_dir, "--device", "cpu", "--no-progress"]
    assert run_cli("train.py", *argv, "--dump-rows", os.path.join(root, "rows.jsonl")) == 0
    assert run_cli("train.py", *argv) == 0
    return request.param, theta0, stops, run_dir, root


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_generation_takes_the_checkpoints_sampling_defaults_and_stop_ids(trained):
    family, theta0, stops, run_dir, _ = trained
    pairs = _jsonl(os.path.join(run_dir, "iter0", "pairs.jsonl"))
    assert len(pairs) == 6
    for p in pairs:
        g = p["gen"]
        assert (g["temperature"], g["top_p"], g["top_k"], g["max_new_tokens"]) == (0.6, 0.9, 0, 24)
    from minispin.run.recipe import resolve
    # a key the recipe or a flag sets wins over the file; do_sample false means greedy
    assert resolve(os.path.join(trained[4], "recipe.toml"), {"temperature": 1.0}).generation.temperature == 1.0
    with open(os.path.join(theta0, "generation_config.json")) as f:
        gen_config = json.load(f)
    try:
        with open(os.path.join(theta0, "generation_config.json"), "w") as f:
            json.dump(dict(gen_config, do_sample=False), f)
        r = resolve(os.path.join(trained[4], "recipe.toml"))
        assert (r.generation.temperature, r.generation.top_p) == (0.0, 0.9)
        assert r.sampling_from.endswith("generation_config.json")
    finally:
        with open(os.path.join(theta0, "generation_config.json"), "w") as f:
            json.dump(gen_config, f)
    from minispin import load_tokenizer
    tok = load_tokenizer(theta0)
    assert sorted(tok.eos_ids) == sorted(set(stops))


def test_training_rows_use_the_checkpoints_template(trained):
    """The prompt of every row is transformers' apply_chat_template of SPIN's conversation:
    an empty system turn (empty_system, on by default as in uclaml/SPIN's data.py; it drops
    Qwen2.5's default system text), then the question."""
    from transformers import PreTrainedTokenizerFast
    family, theta0, _, _, root = trained
    hf_tok = PreTrainedTokenizerFast.from_pretrained(theta0)
    questions = [json.loads(line)["question"] for line in open(GSM8K)][:6]
    want = {tuple(hf_tok.apply_chat_template([{"role": "system", "content": ""},
                                              {"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)) for q in questions}
    rows = _jsonl(os.path.join(root, "rows.jsonl"))
    assert len(rows) == 12
    for row in rows:
        n_prompt = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert tuple(row["input_ids"][:n_prompt]) in want, family
        assert row["input_ids"][n_prompt:n_prompt + 1] != []


def test_export_loads_in_transformers_with_our_logits(trained):
    from transformers import AutoModelForCausalLM
    family, theta0, _, run_dir, _ = trained
    export = os.path.join(run_dir, "iter0", "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(export, name)), name
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == ("qwen2" if family == "qwen2" else "llama")
    if family == "llama3":
        rope = config.get("rope_scaling") or config["rope_parameters"]   # transformers 4 | 5
        assert rope["rope_type"] == "llama3" and config["head_dim"] == 32
    before, after = load_file(os.path.join(theta0, "model.safetensors")), \
        load_file(os.path.join(export, "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)   # it trained
    hf = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    ours = load_model(export)
    x = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_evaluate_exported_model_like_lm_evals_hf_backend(trained):
    from test_evaluation import _compare, _hf, _ours, _run
    family, _, _, run_dir, root = trained
    export = os.path.join(run_dir, "iter0", "model")
    n_ll, n_gen, _ = _compare(_run(_ours(export), ["arc_easy", "gsm8k"], 2),
                              _run(_hf(export), ["arc_easy", "gsm8k"], 2))
    assert n_ll > 0 and n_gen > 0
    out = os.path.join(root, "eval")
    assert run_cli("evaluate.py", "--model", export, "--offline", "--limit", "2",
                   "--tasks", "arc_easy", "--output", out) == 0
    assert os.path.isfile(os.path.join(out, "results.md"))
