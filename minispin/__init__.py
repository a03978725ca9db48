"""minispin: Self-Play Fine-Tuning (SPIN) for Llama/Mistral/Qwen2 in plain PyTorch.

    from minispin import load_model, save_model, load_tokenizer, generate

The names below are looked up on first use (PEP 562), so `import minispin.core.model`
loads the core alone, not the run's checkpoint and tokenizer code.
"""
import importlib

_HOMES = {
    "ModelArgs": "minispin.core.model", "Transformer": "minispin.core.model",
    "KVCache": "minispin.core.model", "build_model": "minispin.core.model",
    "generate": "minispin.core.sampling",
    "load_model": "minispin.run.checkpoint", "save_model": "minispin.run.checkpoint",
    "CheckpointError": "minispin.run.checkpoint",
    "read_config": "minispin.run.config", "ConfigError": "minispin.run.config",
    "load_tokenizer": "minispin.run.tokenizer", "Tokenizer": "minispin.run.tokenizer",
    "TokenizerError": "minispin.run.tokenizer",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'minispin' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
