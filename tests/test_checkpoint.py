"""Checkpoints: sharded == single, round trips through transformers, and clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import STORIES, make_hf_model
from minispin import CheckpointError, ConfigError, TokenizerError, load_model, load_tokenizer, save_model


def _x(n=2, t=70):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(3))


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    make_hf_model(tmp_path / "src", "mistral", num_key_value_heads=2, sliding_window=16)
    single = load_model(str(tmp_path / "src"))
    save_model(single, str(tmp_path / "sharded"), tokenizer_from=str(tmp_path / "src"), max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    sharded = load_model(str(tmp_path / "sharded"))
    for (k1, a), (k2, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(single(_x()), sharded(_x()))


@pytest.mark.parametrize("tied", [False, True])
def test_our_save_loads_in_transformers_with_our_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    make_hf_model(tmp_path / "src", "llama", num_key_value_heads=2, tie_word_embeddings=tied)
    ours = load_model(str(tmp_path / "src"))
    with torch.no_grad():  # change the weights so the test does not just reread the source
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(ours, str(tmp_path / "out"), tokenizer_from=str(tmp_path / "src"), max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "out" / "tokenizer.model")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_x()).logits, ours(_x()), atol=1e-4, rtol=0)
    again = load_model(str(tmp_path / "out"))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_in_bf16_writes_bf16_and_config_dtype(tmp_path):
    m = load_model(STORIES)
    save_model(m, str(tmp_path / "bf"), dtype="bf16")
    cfg = json.load(open(tmp_path / "bf" / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "bf" / "model.safetensors")).values())


def test_new_config_dialect_is_read(tmp_path):
    """transformers >= 5 writes dtype and rope_parameters.rope_theta."""
    shutil.copytree(STORIES, tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg.pop("rope_theta"), cfg.pop("torch_dtype")
    cfg["dtype"] = "float32"
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    json.dump(cfg, open(tmp_path / "m" / "config.json", "w"))
    m = load_model(str(tmp_path / "m"))
    assert m.config.rope_theta == 1234.0 and m.config.dtype == "float32"


def test_ignores_rotary_buffers_and_never_globs(tmp_path):
    shutil.copytree(STORIES, tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    # a stray file with other key names (as Mistral repos ship) must be ignored
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "m" / "consolidated.safetensors"))
    ref = load_model(STORIES)
    m = load_model(str(tmp_path / "m"))
    assert torch.equal(m.model.embed_tokens.weight, ref.model.embed_tokens.weight)


# ------------------------------------------------------------------ bad input
def _broken(tmp_path, edit_config=None, edit_state=None):
    d = tmp_path / "bad"
    shutil.copytree(STORIES, d)
    if edit_config:
        cfg = json.load(open(d / "config.json"))
        edit_config(cfg)
        json.dump(cfg, open(d / "config.json", "w"))
    if edit_state:
        sd = load_file(str(d / "model.safetensors"))
        edit_state(sd)
        save_file(sd, str(d / "model.safetensors"))
    return str(d)


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_config(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError) as e:
        load_model(str(d))
    assert "config.json is missing" in _one_line(e) and str(d) in str(e.value)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_unknown_model_type(tmp_path):
    d = _broken(tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ConfigError) as e:
        load_model(d)
    assert "model_type 'gpt2'" in _one_line(e) and "config.json" in str(e.value)


@pytest.mark.parametrize("field,value,needle", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.type 'yarn'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
])
def test_unsupported_features_are_refused(tmp_path, field, value, needle):
    d = _broken(tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(ConfigError) as e:
        load_model(d)
    assert needle in _one_line(e)


def test_missing_tensor(tmp_path):
    d = _broken(tmp_path, edit_state=lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert "missing 1: model.layers.2.mlp.up_proj.weight" in _one_line(e)


def test_wrong_shape_and_unexpected(tmp_path):
    def edit(sd):
        sd["model.norm.weight"] = torch.ones(65)
        sd["model.extra.weight"] = torch.ones(1)
    d = _broken(tmp_path, edit_state=edit)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "model.norm.weight: file (65,) vs model (64,)" in msg and "unexpected 1: model.extra.weight" in msg


def test_truncated_safetensors(tmp_path):
    d = _broken(tmp_path)
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert "truncated" in _one_line(e) and "model.safetensors" in str(e.value)


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as e:
        load_model(str(d))
    assert "pickle" in _one_line(e) and "pytorch_model.bin" in str(e.value)


def test_tokenizer_vocab_mismatch(tmp_path):
    from helpers import MISTRAL_TOK
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    shutil.copy(MISTRAL_TOK, d / "tokenizer.model")  # 32000 pieces, config says 512
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(str(d))
    assert "32000" in _one_line(e) and "vocab_size 512" in str(e.value)
