"""Model shape, read from (and written back to) a Hugging Face `config.json`.

`ModelArgs` holds only what the forward pass needs. It is built from the HF dict by
`ModelArgs.from_hf`, which accepts both dialects of the file:

* transformers >= 5 writes `dtype` and `rope_parameters: {rope_type, rope_theta}`;
* older files write `torch_dtype`, top-level `rope_theta` and `rope_scaling`.

Anything we do not implement is refused with an error that names the field. A model
that loads but computes something else than transformers would be the worst outcome, so
the check is strict: attention/MLP biases, an activation other than SiLU, an unknown
rope type, or a model_type other than llama/mistral all stop the load.

The original dict is kept in `ModelArgs.hf_config` so that `save_model` writes back a
config.json that transformers, vLLM and lm-eval read as the same model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ConfigError(UserError):
    """A config.json we cannot (or must not) run. The message names file and field."""


def parse_dtype(dtype: Any) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[key]


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # "linear" rope scaling divides positions by this
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None  # Mistral: query i sees key j iff 0 <= i-j < window
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    dtype: str = "float32"  # the dtype the checkpoint was saved in
    hf_config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type '{model_type}' is not supported "
                              f"(minispin implements {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key, False):
                raise ConfigError(f"{source}: '{key}': true is not supported (Llama/Mistral have no biases)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act '{act}' is not supported (only 'silu')")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            # transformers splits matmuls into slices when this is > 1; the maths is the same,
            # so we accept it and note it here rather than refuse a common Llama-2 config.
            pass

        # rope: new dialect first, then the old one
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
        factor = 1.0
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                where = "rope_parameters.rope_type" if cfg.get("rope_parameters") else "rope_scaling.type"
                raise ConfigError(f"{source}: {where} '{rtype}' is not supported "
                                  f"(minispin implements {', '.join(SUPPORTED_ROPE_TYPES)})")
            if rtype == "linear":
                factor = float(scaling["factor"])

        dim = need("hidden_size")
        n_heads = need("num_attention_heads")
        n_kv = cfg.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_attention_heads ({n_heads}) must be a multiple "
                              f"of num_key_value_heads ({n_kv})")
        head_dim = cfg.get("head_dim") or dim // n_heads
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "llama" and cfg.get("sliding_window"):
            raise ConfigError(f"{source}: sliding_window is set on a llama model; "
                              "transformers ignores it there, so we refuse the ambiguity")
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):  # some configs list several stop ids; the first is the eos
            eos = eos[0]
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type, vocab_size=need("vocab_size"), dim=dim,
            n_layers=need("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, intermediate_size=need("intermediate_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling_factor=factor,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            sliding_window=window, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"), dtype=str(dtype).replace("torch.", ""),
            hf_config=dict(cfg),
        )

    def to_hf(self, dtype: Optional[torch.dtype] = None) -> dict:
        """The config.json to write next to saved weights (both dtype spellings)."""
        cfg = dict(self.hf_config) if self.hf_config else self._fresh_hf()
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            cfg["torch_dtype"] = name
            cfg["dtype"] = name
        return cfg

    def _fresh_hf(self) -> dict:
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        cfg = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": self.dtype,
        }
        if self.pad_token_id is not None:
            cfg["pad_token_id"] = self.pad_token_id
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.rope_scaling_factor != 1.0:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_scaling_factor}
        return cfg


def read_config(model_dir: str) -> ModelArgs:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder '{model_dir}' does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config.json is missing (a model folder needs config.json "
                                "and model.safetensors or model.safetensors.index.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    return ModelArgs.from_hf(cfg, source=path)
