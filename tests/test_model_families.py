"""Llama 3.x rope scaling, Qwen2 biases and Llama biases against transformers (the oracle):
inverse frequencies bit for bit, fp32 logits, greedy decoding, and export -> transformers."""
import copy
import dataclasses
import json
import os
import shutil

import pytest
import torch

from helpers import TOK512, STORIES, make_hf_model
from minispin import generate, load_model, save_model
from minispin.run.config import model_args_from_hf, read_config
from minispin.core.model import rope_frequencies

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# head_dim 32 != hidden 64 / 4 heads: taken as given, as Llama 3.2 / Mistral-Nemo configs do
LLAMA3 = dict(num_key_value_heads=2, head_dim=32, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
              max_position_embeddings=256, eos_token_id=[2, 3])
# family name -> (model_type, config overrides, sequence length for the logits check)
FAMILIES = {
    # 224 tokens: far past original_max_position_embeddings (32) and its blended band
    "llama3-rope": ("llama", LLAMA3, 224),
    "linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}), 160),
    # 150 tokens past max_position_embeddings 64: the NTK base grows with the sequence
    "dynamic-rope": ("llama", dict(num_key_value_heads=1, max_position_embeddings=64,
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 150),
    "llama-biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True), 80),
    "qwen2-untied": ("qwen2", dict(num_key_value_heads=2, rope_theta=1e6), 80),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True), 80),
}


def make_model(path, family, seed=0):
    """A random transformers model of the family, saved (with the tok512 tokenizer) to path.
    Biases are drawn non-zero (transformers initializes them to 0, which would hide a
    missing or misplaced bias) and q/k scaled up so that positions matter."""
    model_type, overrides, _ = FAMILIES[family]
    overrides = copy.deepcopy(overrides)  # transformers' config writes into the rope dict
    if model_type != "qwen2":
        hf = make_hf_model(path, model_type, seed=seed, **overrides)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from helpers import TINY
        torch.manual_seed(seed)
        hf = Qwen2ForCausalLM(Qwen2Config(**dict(TINY, bos_token_id=None, eos_token_id=2, **overrides)))
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(12.0)
        shutil.copy(TOK512, os.path.join(path, "tokenizer.model"))
    with torch.no_grad():
        biases = [p for n, p in hf.named_parameters() if n.endswith(".bias")]
        for p in biases:
            p.normal_(0.0, 0.3)
    assert bool(biases) == (family.startswith("qwen2") or family == "llama-biases")
    hf = hf.float().eval()
    hf.save_pretrained(path)
    return hf


def _x(T, n=2, seed=1):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_model(path, request.param)
    return request.param, str(path), hf, load_model(str(path))


def test_logits_match_transformers(family):
    name, path, hf, ours = family
    T = FAMILIES[name][2]
    with torch.no_grad():
        got, want = ours(_x(T)), hf(_x(T)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_greedy_equals_transformers_generate(family):
    """Decoding crosses the scaled band (llama3) and max_position_embeddings (dynamic); a
    batch of ragged prompts (left padding, masks, the GQA path) against each prompt alone
    in transformers, stopping at the config's stop ids like transformers does. Dynamic NTK
    takes its length from the longest row of a call (in transformers too), so there each
    prompt is generated alone."""
    name, path, hf, ours = family
    g = torch.Generator().manual_seed(5)
    lengths = [40, 9, 23] if name != "dynamic-rope" else [40, 9, 60]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    new = 48
    got = generate(ours, prompts, new, temperature=0, batch_size=1 if name == "dynamic-rope" else 8)
    stops = set(ours.config.eos_token_ids)
    for p, o in zip(prompts, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        cut = next((j for j, t in enumerate(want) if t in stops), len(want))
        assert o == want[:cut]


def test_export_loads_in_transformers_with_our_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM
    name, path, _, ours = family
    with torch.no_grad():  # moved weights, so the test does not just reread the source
        moved = load_model(path)
        for p in moved.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(moved, str(tmp_path / "out"), tokenizer_from=path)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["model_type"] == FAMILIES[name][0]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    T = FAMILIES[name][2]
    with torch.no_grad():
        torch.testing.assert_close(hf(_x(T)).logits, moved(_x(T)), atol=1e-4, rtol=0)
    again = load_model(str(tmp_path / "out"))
    assert again.config.rope_scaling == moved.config.rope_scaling
    assert again.config.eos_token_ids == moved.config.eos_token_ids
    # a config.json written from ModelArgs alone (no original dict to copy) works too
    fresh = dataclasses.replace(moved.config, hf_config={})
    save_model(moved, str(tmp_path / "fresh"), config=fresh)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fresh"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_x(T)).logits, moved(_x(T)), atol=1e-4, rtol=0)
    assert dataclasses.replace(read_config(str(tmp_path / "fresh")), hf_config={}) == \
        dataclasses.replace(fresh, dtype="float32")


def test_the_family_features_matter(family):
    """Guards the parity tests: without its scaling or its biases the same weights give
    other logits, so the tests above really check them."""
    name, path, _, ours = family
    T = FAMILIES[name][2]
    with torch.no_grad():
        good = ours(_x(T))
        if "rope" in name:
            saved, ours.config.rope_scaling = ours.config.rope_scaling, None
            try:
                plain = ours(_x(T))
            finally:
                ours.config.rope_scaling = saved
        else:
            biases = {n: p.clone() for n, p in ours.named_parameters() if n.endswith(".bias")}
            for n in biases:
                ours.get_parameter(n).zero_()
            try:
                plain = ours(_x(T))
            finally:
                for n, b in biases.items():
                    ours.get_parameter(n).copy_(b)
    assert (good - plain).abs().max() > 1e-2


def test_config_reads_the_family(family):
    name, path, hf, ours = family
    a = ours.config
    if name == "llama3-rope":
        assert a.head_dim == 32 and a.n_heads * a.head_dim == 128 != a.dim
        assert a.eos_token_id == 2 and a.eos_token_ids == (2, 3)
        assert a.rope_scaling == LLAMA3_ROPE
    if name.startswith("qwen2"):
        assert a.qkv_bias and not a.o_bias and not a.mlp_bias and a.sliding_window is None
        assert a.tie_word_embeddings == (name == "qwen2-tied") and a.rope_theta == 1e6
        assert ours.model.layers[0].self_attn.o_proj.bias is None


# ------------------------------------------------------------------ rope, bit for bit
def _hf_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, **kw)


@pytest.mark.parametrize("theta,head_dim,rope", [
    (500000.0, 128, dict(LLAMA3_ROPE, original_max_position_embeddings=8192)),  # Llama 3.1's own
    (500000.0, 64, dict(LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=8192)),  # 3.2
    (10000.0, 32, LLAMA3_ROPE),
    (10000.0, 32, {"rope_type": "linear", "factor": 2.5}),
])
def test_rope_frequencies_equal_transformers(theta, head_dim, rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = _hf_config(head_dim=head_dim, rope_theta=theta, rope_scaling=dict(rope), max_position_embeddings=16384)
    want, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    args = model_args_from_hf(cfg.to_dict())
    assert scale == 1.0 and torch.equal(rope_frequencies(args, torch.arange(10)), want)


@pytest.mark.parametrize("seq_len", [30, 64, 65, 150, 4000])
def test_dynamic_ntk_frequencies_equal_transformers(seq_len):
    """Below max_position_embeddings (64) the plain frequencies, above it transformers'
    NTK formula for the call's length, bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = _hf_config(head_dim=32, rope_theta=10000.0, max_position_embeddings=64,
                     rope_scaling={"rope_type": "dynamic", "factor": 3.0})
    fn = ROPE_INIT_FUNCTIONS["dynamic"]
    want = fn(cfg, "cpu")[0] if seq_len <= 64 else fn(cfg, "cpu", seq_len=torch.tensor(seq_len))[0]
    args = model_args_from_hf(cfg.to_dict())
    positions = torch.arange(seq_len)[None].expand(2, seq_len).clone()
    positions[1] = 0  # the longest row decides, as with transformers' max over position_ids
    assert torch.equal(rope_frequencies(args, positions), want)


# ------------------------------------------------------------------ config dialects
def test_old_dialect_reads_like_the_new(tmp_path):
    """rope_scaling + top-level rope_theta (transformers < 5) is the same model as
    rope_parameters; transformers itself agrees on the logits."""
    from transformers import AutoModelForCausalLM
    new = tmp_path / "new"
    hf = make_model(new, "llama3-rope")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    cfg = json.load(open(old / "config.json"))
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    json.dump(cfg, open(old / "config.json", "w"))
    a, b = read_config(str(new)), read_config(str(old))
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling) == (500000.0, LLAMA3_ROPE)
    hf_old = AutoModelForCausalLM.from_pretrained(str(old), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(old))(_x(100)), hf_old(_x(100)).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_old(_x(100)).logits, hf(_x(100)).logits, atol=0, rtol=0)


def test_llama3_original_max_positions_falls_back_like_transformers(tmp_path):
    """Without original_max_position_embeddings in the rope dict transformers takes a
    top-level one, else max_position_embeddings; so do we."""
    base = json.load(open(os.path.join(STORIES, "config.json")))
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    assert model_args_from_hf(dict(base, rope_scaling=rope)).rope_scaling[
        "original_max_position_embeddings"] == base["max_position_embeddings"]
    top = dict(base, rope_scaling=dict(LLAMA3_ROPE), original_max_position_embeddings=100)
    assert model_args_from_hf(top).rope_scaling["original_max_position_embeddings"] == 100
    cfg = _hf_config(rope_scaling=dict(rope), max_position_embeddings=300, rope_theta=10000.0)
    assert cfg.rope_parameters["original_max_position_embeddings"] == 300
