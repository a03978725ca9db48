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


@pytest.mark.slow
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
    assert "config.json: model_type: 'gpt2' is not supported" in _one_line(e)


@pytest.mark.parametrize("edit,needle", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type: 'yarn' is not supported"),
    (dict(rope_scaling={"type": "longrope", "factor": 4.0}), "rope_scaling.type: 'longrope' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters.rope_type: 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor: only 1.0"),
    (dict(hidden_act="gelu"), "hidden_act: 'gelu' is not supported"),
    (dict(model_type="mistral", attention_bias=True), "attention_bias: true is not supported on mistral"),
    (dict(model_type="qwen2", mlp_bias=True), "mlp_bias: true is not supported on qwen2"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16), "use_sliding_window: true"),
    (dict(sliding_window=16), "sliding_window: set on a llama model"),
])
def test_unsupported_features_are_refused(tmp_path, edit, needle):
    d = _broken(tmp_path, edit_config=lambda c: c.update(edit))
    with pytest.raises(ConfigError) as e:
        load_model(d)
    assert needle in _one_line(e) and os.path.join(d, "config.json") in str(e.value)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# config.json edits -> the "field: what is wrong" part of the one-line error
BAD_CONFIGS = {
    "a-list": (lambda c: [c], "top level: must be a JSON object"),
    "string-size": (lambda c: dict(c, hidden_size="64"), "hidden_size: must be an integer >= 1, got '64' (a str)"),
    "zero-heads": (lambda c: dict(c, num_attention_heads=0), "num_attention_heads: must be an integer >= 1, got 0"),
    "negative-layers": (lambda c: dict(c, num_hidden_layers=-2), "num_hidden_layers: must be an integer >= 1, got -2"),
    "zero-kv-heads": (lambda c: dict(c, num_key_value_heads=0), "num_key_value_heads: must be an integer >= 1"),
    "float-vocab": (lambda c: dict(c, vocab_size=512.0), "vocab_size: must be an integer >= 1, got 512.0"),
    "bool-size": (lambda c: dict(c, intermediate_size=True), "intermediate_size: must be an integer >= 1, got True"),
    "kv-not-dividing": (lambda c: dict(c, num_key_value_heads=3), "num_key_value_heads: 3 does not divide"),
    "odd-head-dim": (lambda c: dict(c, head_dim=7), "head_dim: 7 must be even"),
    "missing-vocab": (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "vocab_size: required but missing"),
    "no-model-type": (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "model_type: required but missing"),
    "string-eps": (lambda c: dict(c, rms_norm_eps="1e-5"), "rms_norm_eps: must be a positive number"),
    "nan-theta": (lambda c: dict(c, rope_theta=float("nan")), "rope_theta: must be a positive number"),
    "string-tie": (lambda c: dict(c, tie_word_embeddings="true"), "tie_word_embeddings: must be true or false"),
    "eos-string": (lambda c: dict(c, eos_token_id="2"), "eos_token_id: must be an integer >= 0"),
    "eos-empty": (lambda c: dict(c, eos_token_id=[]), "eos_token_id: an empty list"),
    "rope-no-factor": (lambda c: dict(c, rope_scaling={"rope_type": "linear"}), "rope_scaling.factor: required for rope type 'linear'"),
    "rope-string-factor": (lambda c: dict(c, rope_scaling={"type": "dynamic", "factor": "2"}),
                           "rope_scaling.factor: must be a positive number, got '2' (a str)"),
    "llama3-no-low": (lambda c: dict(c, rope_parameters={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                                         "rope_theta": 5e5}),
                      "rope_parameters.low_freq_factor: required for rope type 'llama3'"),
    "rope-not-dict": (lambda c: dict(c, rope_scaling=["linear", 2]), "rope_scaling: must be an object"),
    "invalid-json": ('{"model_type": "llama",\n "hidden_size": 64,,\n}', "line 2: not valid JSON"),
    "invalid-utf8": (b'{"model_type": "llama\xff"}', "byte 21: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, case):
    edit, needle = BAD_CONFIGS[case]
    d = tmp_path / "bad"
    shutil.copytree(STORIES, d)
    if callable(edit):
        edit = json.dumps(edit(json.load(open(d / "config.json"))))
    _write(d / "config.json", edit)
    with pytest.raises(ConfigError) as e:
        load_model(str(d))
    assert _one_line(e).startswith(f"{d / 'config.json'}: {needle}")


def _header(path):
    """(header dict, header length, raw bytes) of a safetensors file, read by hand."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), n, raw


def _edit_header(path, key, edit):
    """Rewrite one entry of a safetensors header in place (data untouched)."""
    header, n, raw = _header(path)
    edit(header[key])
    text = json.dumps(header).encode()
    _write(path, len(text).to_bytes(8, "little") + text + raw[8 + n:])


EMB = "model.embed_tokens.weight"  # (512, 64) F32 in stories260K: 131072 bytes
BAD_HEADERS = {
    "dtype-lies": (lambda m: m.update(dtype="F64"), "data_offsets span 131072 bytes but F64 (512, 64) needs 262144"),
    "shape-lies": (lambda m: m.update(shape=[512, 65]), "data_offsets span 131072 bytes but F32 (512, 65) needs 133120"),
    "size-lies": (lambda m: m.update(data_offsets=[m["data_offsets"][0], m["data_offsets"][1] - 4]), "needs 131072"),
    "unknown-dtype": (lambda m: m.update(dtype="F8_E9M9"), "unsupported dtype 'F8_E9M9'"),
    "no-offsets": (lambda m: m.pop("data_offsets"), "no data_offsets"),
    "reversed-offsets": (lambda m: m.update(data_offsets=m["data_offsets"][::-1]), "is not [begin, end]"),
    "string-shape": (lambda m: m.update(shape="512x64"), "shape '512x64' is not a list of sizes"),
    "beyond-end": (lambda m: m.update(data_offsets=[10 ** 9, 10 ** 9 + 131072]), "truncated safetensors file: tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_lying_safetensors_header_names_file_and_tensor(tmp_path, case):
    edit, needle = BAD_HEADERS[case]
    d = _broken(tmp_path)
    path = os.path.join(d, "model.safetensors")
    _edit_header(path, EMB, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = _one_line(e)
    assert msg.startswith(f"{path}: ") and f"'{EMB}'" in msg and needle in msg


def test_truncated_shard_names_file_and_tensor(tmp_path):
    make_hf_model(tmp_path / "src", "llama")
    save_model(load_model(str(tmp_path / "src")), str(tmp_path / "sharded"), max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    victim = str(tmp_path / "sharded" / shards[1])
    header = _header(victim)[0]
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor cut short
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 10)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "sharded"))
    msg = _one_line(e)
    assert msg.startswith(f"{victim}: truncated") and f"tensor '{last}'" in msg


# ------------------------------------------------------------------ generation_config.json
def test_generation_config_read_and_checked(tmp_path):
    from minispin.run.config import read_generation_config
    assert read_generation_config(str(tmp_path)) == {}  # no file
    _write(tmp_path / "generation_config.json", json.dumps({
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
        "temperature": 0.6, "top_p": 0.9, "top_k": None, "transformers_version": "4.45.0"}))
    assert read_generation_config(str(tmp_path)) == {
        "eos_token_id": [128001, 128008, 128009], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    _write(tmp_path / "generation_config.json", '{"eos_token_id": 2, "max_new_tokens": 256, "top_k": 50}')
    assert read_generation_config(str(tmp_path)) == {"eos_token_id": 2, "max_new_tokens": 256, "top_k": 50}


@pytest.mark.parametrize("text,needle", [
    ('{"eos_token_id": 2,}', "line 1: not valid JSON"),
    ('[2]', "top level: must be a JSON object"),
    ('{"eos_token_id": "2"}', "eos_token_id: must be an integer >= 0"),
    ('{"temperature": -0.5}', "temperature: must be a number >= 0"),
    ('{"top_p": 1.5}', "top_p: must be in (0, 1]"),
    ('{"top_p": 0}', "top_p: must be a positive number"),
    ('{"top_k": "5"}', "top_k: must be an integer >= 0"),
    ('{"max_new_tokens": 0}', "max_new_tokens: must be an integer >= 1"),
    ('{"do_sample": "yes"}', "do_sample: must be true or false"),
])
def test_bad_generation_config_is_one_line(tmp_path, text, needle):
    from minispin.run.config import read_generation_config
    path = tmp_path / "generation_config.json"
    _write(path, text)
    with pytest.raises(ConfigError) as e:
        read_generation_config(str(tmp_path))
    assert _one_line(e).startswith(f"{path}: {needle}")


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
