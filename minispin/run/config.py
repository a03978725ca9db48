"""Model shape, read from (and written back to) a Hugging Face `config.json`.

`ModelArgs` holds only what the forward pass needs. `model_args_from_hf` builds it from
the HF dict and accepts both dialects of the file:

* transformers >= 5 writes `dtype` and `rope_parameters: {rope_type, rope_theta, ...}`;
* older files write `torch_dtype`, a top-level `rope_theta` and `rope_scaling`. When both
  exist, `rope_scaling` wins, as in transformers.

Three families share one block, so they share one loader:

* llama (Llama 1-3.x): biases only if `attention_bias` (q/k/v/o) or `mlp_bias` say so;
* mistral: `sliding_window` (query i sees key j iff 0 <= i - j < window; null = none);
* qwen2 (Qwen2, Qwen2.5): q/k/v always carry a bias, o_proj and the MLP never do. Its
  per-layer sliding window (`use_sliding_window: true`) is refused; off, `sliding_window`
  is ignored, as transformers ignores it.

RoPE: "default", "linear" (positions divided by `factor`), "dynamic" (NTK: the base
grows with the sequence once it passes max_position_embeddings) and "llama3" (Llama
3.1's per-frequency interpolation). Each is checked for its required fields here, so the
model code can trust `rope_scaling`.

Anything we do not implement is refused with an error that names the field. A model
that loads but computes something else than transformers would be the worst outcome, so
the check is strict: an unknown model_type or rope type, an activation other than SiLU,
a field transformers would silently ignore (biases on Mistral, a window on Llama), and
every malformed value (a string where a number belongs, 0 heads, a config that is a
list) stop the load with one line: "path: field: what is wrong".

The original dict is kept in `ModelArgs.hf_config` so that `save_model` writes back a
config.json that transformers, vLLM and lm-eval read as the same model.
`read_generation_config` reads generation_config.json's stop ids and sampling defaults.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Tuple

import torch
from ..core.device import parse_dtype  # noqa: F401  (config.parse_dtype for its callers)
from ..core.model import ModelArgs
from .errors import MissingFileError, UserError, json_loads

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# fields each rope type needs besides rope_type (llama3's original_max_position_embeddings
# has a fallback, as in transformers: see _rope_scaling)
ROPE_FIELDS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# transformers' defaults for fields a config.json may leave out, per family
FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
}

class ConfigError(UserError):
    """A config.json we cannot (or must not) run. The message names file and field."""


# ------------------------------------------------------------------ value checks
# Each takes the value, the file and the field's name, and returns the value or raises
# "file: field: what is wrong". bool is excluded from numbers: in Python True == 1.
def _kind(value) -> str:
    return f"{value!r} (a {type(value).__name__})" if isinstance(value, str) else repr(value)


def _check_int(value, source, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: {name}: must be an integer >= {minimum}, got {_kind(value)}")
    return value


def _check_number(value, source, name, positive=True):
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        what = "a positive number" if positive else "a finite number"
        raise ConfigError(f"{source}: {name}: must be {what}, got {_kind(value)}")
    return float(value)


def _check_bool(value, source, name):
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name}: must be true or false, got {_kind(value)}")
    return value


def _check_token_ids(value, source, name) -> Tuple[int, ...]:
    """null, an id, or a non-empty list of ids -> a tuple (empty for null)."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not ids:
        raise ConfigError(f"{source}: {name}: an empty list; give an id, a list of ids or null")
    for i in ids:
        _check_int(i, source, name, minimum=0)
    return tuple(ids)


def _rope_scaling(cfg: dict, source: str, max_positions: int):
    """(rope_theta, rope_scaling dict or None) from either dialect, checked."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key}: must be an object {{...}}, got {_kind(params)}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _check_number(theta, source, f"{key}.rope_theta" if "rope_theta" in params else "rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    type_key = f"{key}.{'rope_type' if 'rope_type' in params else 'type'}"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: {type_key}: '{rope_type}' is not supported "
                          f"(minispin implements {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise ConfigError(f"{source}: partial_rotary_factor: only 1.0 is supported (got {partial!r})")
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type}
    for name in ROPE_FIELDS[rope_type]:
        if params.get(name) is None:
            raise ConfigError(f"{source}: {key}.{name}: required for rope type '{rope_type}' but missing")
        scaling[name] = _check_number(params[name], source, f"{key}.{name}")
    if rope_type == "llama3":
        # transformers: a top-level original_max_position_embeddings wins, then the one in
        # the rope dict, then max_position_embeddings
        name = "original_max_position_embeddings"
        where = name if name in cfg else f"{key}.{name}" if name in params else "max_position_embeddings"
        orig = cfg.get(name, params.get(name, max_positions))
        scaling[name] = _check_int(orig, source, where)
    return theta, scaling


def model_args_from_hf(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a config.json dict, every field checked (module docstring)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: top level: must be a JSON object {{...}}, got a "
                          f"{type(cfg).__name__}")

    def need(key, check=_check_int):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: {key}: required but missing")
        return check(cfg[key], source, key)

    def optional(key, default, check=_check_int):
        return default if cfg.get(key) is None else check(cfg[key], source, key)

    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: model_type: required but missing")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type: '{model_type}' is not supported "
                          f"(minispin implements {', '.join(SUPPORTED_MODEL_TYPES)})")
    defaults = FAMILY_DEFAULTS[model_type]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act: '{act}' is not supported (only 'silu')")
    # pretraining_tp > 1 makes transformers split matmuls into slices: the same maths,
    # so it is accepted rather than refusing a common Llama-2 config.

    # biases: Llama reads attention_bias/mlp_bias; transformers ignores both on
    # Mistral and Qwen2, so a true there is an ambiguity we refuse
    attention_bias = optional("attention_bias", False, _check_bool)
    mlp_bias = optional("mlp_bias", False, _check_bool)
    if model_type != "llama":
        for key, value in (("attention_bias", attention_bias), ("mlp_bias", mlp_bias)):
            if value:
                raise ConfigError(f"{source}: {key}: true is not supported on {model_type} "
                                  "(transformers ignores it there; remove it or set false)")

    dim = need("hidden_size")
    n_layers = need("num_hidden_layers")
    n_heads = need("num_attention_heads")
    n_kv = optional("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{source}: num_key_value_heads: {n_kv} does not divide "
                          f"num_attention_heads ({n_heads})")
    head_dim = optional("head_dim", dim // n_heads)
    if head_dim % 2 or head_dim == 0:
        raise ConfigError(f"{source}: head_dim: {head_dim} must be even and positive (RoPE "
                          "rotates pairs; hidden_size // num_attention_heads when not given)")
    max_positions = optional("max_position_embeddings", defaults["max_position_embeddings"])
    theta, scaling = _rope_scaling(cfg, source, max_positions)

    window = None
    if model_type == "mistral":
        window = optional("sliding_window", None)
    elif model_type == "qwen2":
        if optional("use_sliding_window", False, _check_bool):
            raise ConfigError(f"{source}: use_sliding_window: true is not supported (Qwen2's "
                              "per-layer sliding window; minispin runs qwen2 with full attention)")
    elif cfg.get("sliding_window"):
        raise ConfigError(f"{source}: sliding_window: set on a llama model; transformers "
                          "ignores it there, so we refuse the ambiguity (remove it)")

    eos_ids = _check_token_ids(cfg.get("eos_token_id", defaults["eos_token_id"]), source, "eos_token_id")
    bos = cfg.get("bos_token_id", defaults["bos_token_id"])
    bos = None if bos is None else _check_int(bos, source, "bos_token_id", minimum=0)
    pad = optional("pad_token_id", None, lambda v, s, n: _check_int(v, s, n, minimum=0))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return ModelArgs(
        model_type=model_type, vocab_size=need("vocab_size"), dim=dim,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate_size=need("intermediate_size"),
        norm_eps=optional("rms_norm_eps", 1e-6, _check_number), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=max_positions,
        sliding_window=window, qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias, mlp_bias=mlp_bias,
        tie_word_embeddings=optional("tie_word_embeddings", False, _check_bool),
        bos_token_id=bos, eos_token_id=eos_ids[0] if eos_ids else None,
        eos_token_ids=eos_ids, pad_token_id=pad, dtype=str(dtype).replace("torch.", ""),
        hf_config=dict(cfg),
    )


def hf_config(args: ModelArgs, dtype: Optional[torch.dtype] = None) -> dict:
    """The config.json to write next to saved weights (both dtype spellings)."""
    cfg = dict(args.hf_config) if args.hf_config else _fresh_hf(args)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        cfg["torch_dtype"] = name
        cfg["dtype"] = name
    return cfg


def _fresh_hf(args: ModelArgs) -> dict:
    eos = list(args.eos_token_ids) if len(args.eos_token_ids) > 1 else args.eos_token_id
    cfg = {
        "architectures": [ARCHITECTURES[args.model_type]], "model_type": args.model_type,
        "vocab_size": args.vocab_size, "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "intermediate_size": args.intermediate_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": args.bos_token_id, "eos_token_id": eos, "torch_dtype": args.dtype,
    }
    if args.model_type == "llama":
        cfg.update(attention_bias=args.o_bias, mlp_bias=args.mlp_bias)
    if args.pad_token_id is not None:
        cfg["pad_token_id"] = args.pad_token_id
    if args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
    if args.rope_scaling:
        cfg["rope_scaling"] = dict(args.rope_scaling)
    return cfg


def _read_json(path: str, what: str):
    """Parse a JSON file; bad bytes or syntax -> ConfigError naming the file and place."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start}: not valid UTF-8 (re-save {what} as UTF-8)") from None
    try:
        return json_loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def read_config(model_dir: str) -> ModelArgs:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise MissingFileError(f"model folder '{model_dir}' does not exist")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: config.json is missing (a model folder needs config.json "
                                "and model.safetensors or model.safetensors.index.json)")
    return model_args_from_hf(_read_json(path, "config.json"), source=path)


# generation_config.json keys we read, with their checks; others (transformers_version,
# bos/pad ids, ...) are not settings minispin's sampler has
def _check_eos(value, source, name):
    _check_token_ids(value, source, name)
    return value  # as given: generate()'s eos_id takes an id or a list


def _check_temperature(value, source, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{source}: {name}: must be a number >= 0, got {_kind(value)}")
    return float(value)


def _check_top_p(value, source, name):
    value = _check_number(value, source, name)
    if value > 1:
        raise ConfigError(f"{source}: {name}: must be in (0, 1], got {value!r}")
    return value


GENERATION_KEYS = {
    "eos_token_id": _check_eos,
    "do_sample": _check_bool,
    "temperature": _check_temperature,
    "top_p": _check_top_p,
    "top_k": lambda v, s, n: _check_int(v, s, n, minimum=0),
    "max_new_tokens": _check_int,
}


def read_generation_config(model_dir: str) -> dict:
    """generation_config.json's stop ids and sampling defaults, checked; {} without the file.

    Returns only the keys the file sets (null counts as unset), with their HF names and
    meanings: eos_token_id (an id or a list of ids, as generate()'s eos_id takes them),
    do_sample, temperature (>= 0), top_p (in (0, 1]), top_k (>= 0, 0 = off), max_new_tokens.
    """
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    cfg = _read_json(path, "generation_config.json")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level: must be a JSON object {{...}}, got a {type(cfg).__name__}")
    out = {}
    for key, check in GENERATION_KEYS.items():
        value = cfg.get(key)
        if value is None:
            continue
        out[key] = check(value, path, key)
    return out
