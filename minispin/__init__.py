"""minispin: Self-Play Fine-Tuning (SPIN) for Llama/Mistral in plain PyTorch.

    from minispin import load_model, save_model, load_tokenizer
"""
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelArgs, read_config
from .model import KVCache, Transformer, build_model
from .sampling import generate
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["load_model", "save_model", "load_tokenizer", "read_config", "build_model",
           "ModelArgs", "Transformer", "KVCache", "Tokenizer", "ConfigError",
           "CheckpointError", "TokenizerError", "generate"]
__version__ = "0.1.0"
