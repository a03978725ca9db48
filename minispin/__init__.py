"""minispin: Self-Play Fine-Tuning (SPIN) for Llama/Mistral in plain PyTorch.

    from minispin import load_model, save_model, load_tokenizer
"""
from .core.model import KVCache, ModelArgs, Transformer, build_model
from .core.sampling import generate
from .run.checkpoint import CheckpointError, load_model, save_model
from .run.config import ConfigError, read_config
from .run.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["load_model", "save_model", "load_tokenizer", "read_config", "build_model",
           "ModelArgs", "Transformer", "KVCache", "Tokenizer", "ConfigError",
           "CheckpointError", "TokenizerError", "generate"]
__version__ = "0.1.0"
