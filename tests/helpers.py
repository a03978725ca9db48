"""Shared test helpers: tiny random HF models (made and saved by transformers, the oracle)."""
import os
import shutil
import socket

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(REPO, "assets", "models", "stories260K")
TOK512 = os.path.join(REPO, "assets", "tokenizers", "tok512.model")
MISTRAL_TOK = os.path.join(REPO, "assets", "tokenizers", "mistral-7b-v0.1.tokenizer.model")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)


def make_hf_model(path, model_type="llama", seed=0, sharpen=12.0, **overrides):
    """Save a random transformers Llama/Mistral (plus the tok512 tokenizer) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    cfg = dict(TINY, **overrides)
    torch.manual_seed(seed)
    if model_type == "mistral":
        cfg.setdefault("sliding_window", 16)
        model = MistralForCausalLM(MistralConfig(**cfg))
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1 so a missing norm weight would show
                p.uniform_(0.5, 1.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                # std-0.02 weights give near-uniform attention, where wrong positions (RoPE
                # layout, window, padding) barely move the logits; sharpen the scores
                p.mul_(sharpen)
    model = model.float().eval()
    model.save_pretrained(path)
    shutil.copy(TOK512, os.path.join(path, "tokenizer.model"))
    shutil.copy(os.path.join(STORIES, "tokenizer_config.json"), os.path.join(path, "tokenizer_config.json"))
    return model


def load_script(name):
    """scripts/<name>.py as a module, for tests of its functions (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_stories(dst):
    shutil.copytree(STORIES, dst)
    return dst


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now (for torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(script, *argv):
    """Run one of the repo's command-line tools in this process, as `python script argv`
    would (its output goes to this process's stdout/stderr, so capsys sees it); returns
    the exit status. Tests reach logic through minispin; this runs the CLI as a program."""
    import runpy
    import sys
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def undocumented_flags(help_text):
    """The options of an argparse --help text that come without a description."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not line.startswith("  -"):  # an option; descriptions are indented further
            continue
        parts = stripped.split("  ", 1)
        described = len(parts) == 2 and parts[1].strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not described and not (nxt.startswith(" " * 8) and not nxt.strip().startswith("-")):
            missing.append(parts[0])
    return missing
